"""A bf16 model's attention computed in bf16 vs fp32 by the CPU kernel (``kernels.cpu.compute_dtype``),
on Gemma3-270M cast to bf16 and the long-range code text.

Timing: each method's ``attend`` over the 3 global layers' captured q, k, v, with native bf16 forced
on (bf16 compute) and off (fp32 compute), all variants in turn per round (odd rounds reversed), the
first round dropped as warm-up; medians. Quality: perplexity of the first and second half of the text
with each method and compute dtype.

    python scripts/bf16_compute.py --tokens 8192 --out-time docs/results/kernel_bf16_compute_ab_....json \
        --out-ppl docs/results/ppl_bf16_compute_....json
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch
from longrange_ppl import code_text
from quality_approx import attention_seconds, capture_global_layers, halves

import sparse_llm
from sparse_llm.backends import get_method
from sparse_llm.kernels import cpu
from sparse_llm.models import load
from sparse_llm.results import atomic_write_json, run_metadata


@contextmanager
def native_bf16(native: bool):
    """The kernel sees a CPU with (True) or without (False) native bf16: bf16 or fp32 compute."""
    real = cpu.cpu_has_native_bf16
    cpu.cpu_has_native_bf16 = lambda: native
    try:
        yield
    finally:
        cpu.cpu_has_native_bf16 = real


class _Attend:
    """A method's ``attend`` under one compute dtype, for ``attention_seconds``."""

    def __init__(self, method, native: bool):
        self.method, self.native = method, native

    def attend(self, q, k, v, call):
        with native_bf16(self.native):
            return self.method.attend(q, k, v, call)


def label(name: str, native: bool) -> str:
    return f"{name} {'bf16' if native else 'fp32'} compute"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--methods", default="dense,streaming,block_topk,xattention,dma,flexprefill")
    parser.add_argument("--ppl-methods", default="dense,block_topk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-time", required=True)
    parser.add_argument("--out-ppl", required=True)
    args = parser.parse_args()

    model, tokenizer = load("gemma3-270m")
    model = model.to(torch.bfloat16)
    ids = tokenizer(code_text("gemma"), return_tensors="pt").input_ids[:, : args.tokens]
    meta = run_metadata(torch.device("cpu"))

    layers = capture_global_layers(model, ids)
    variants = {
        label(name, native): _Attend(get_method(name), native)
        for name in args.methods.split(",")
        for native in (False, True)
    }
    raw = attention_seconds(layers, variants, args.rounds + 1)
    seconds = {key: statistics.median(times[1:]) for key, times in raw.items()}
    for name in args.methods.split(","):
        fp32, bf16 = seconds[label(name, False)], seconds[label(name, True)]
        print(f"{name:12s} fp32 compute {fp32:.3f} s  bf16 compute {bf16:.3f} s  ratio {bf16 / fp32:.2f}")
    what = (
        f"attend() over the 3 global layers of Gemma3-270M in bf16, {args.tokens}-token code text, "
        f"fp32 vs bf16 compute interleaved, {args.rounds} rounds after a warm-up, medians"
    )
    atomic_write_json(args.out_time, {"what": what, "seconds": seconds, "raw": raw, **meta})

    ppl = {}
    for name in args.ppl_methods.split(","):
        for native in (False, True):
            with native_bf16(native), sparse_llm.sparse_attention(model, name):
                ppl[label(name, native)] = halves(model, ids)
            print(label(name, native), ppl[label(name, native)])
    what = f"perplexity, 1st / 2nd half of the {args.tokens}-token code text, Gemma3-270M in bf16"
    atomic_write_json(args.out_ppl, {"what": what, "ppl": ppl, **meta})


if __name__ == "__main__":
    main()
