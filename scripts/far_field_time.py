"""Attention time of selection methods with and without the mean-key far field (``far_keys="mean"``),
on the q, k, v of Gemma3-270M's global layers captured from one prefill of the long-range code text.

Each variant's ``attend`` (selection, kernel and far field) runs over the captured layers, all variants
in turn per round (the machine's speed drifts); the median over rounds is reported as a fraction of
the ``dense`` method's time, beside the exact and far densities (means over the layers). The
selection alone (``block_mask``) is timed too, as a share of the attention it saves (dense time less
the method's kernel and far field), the bench's split.

    python scripts/far_field_time.py --tokens 8192 --budget 1024 [--far-groups 4,8,4:1024] \
        --out docs/results/far_field_time.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from longrange_ppl import code_text
from quality_approx import attention_seconds, capture_global_layers

from sparse_llm.backends import get_method
from sparse_llm.models import load
from sparse_llm.results import atomic_write_json, run_metadata


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--methods", default="block_topk,xattention,dma")
    parser.add_argument(
        "--far-groups",
        default="4,8",
        help="far fields to time (far_keys='mean'): far_group, or far_group:far_span for a pyramid",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model, tokenizer = load("gemma3-270m")
    ids = tokenizer(code_text("gemma"), return_tensors="pt").input_ids[:, : args.tokens]
    layers = capture_global_layers(model, ids)
    variants = [("dense", {})]
    for name in args.methods.split(","):
        variants.append((name, {"budget": args.budget, "far_keys": "none"}))
        for spec in args.far_groups.split(","):
            group, _, span = spec.partition(":")
            far = {"far_keys": "mean", "far_group": int(group), **({"far_span": int(span)} if span else {})}
            variants.append((name, {"budget": args.budget, **far}))
    methods = [get_method(name, **params) for name, params in variants]
    # one round more than asked: the first warms up and is dropped
    by_index = attention_seconds(layers, dict(enumerate(methods)), args.rounds + 1)
    times = [by_index[i] for i in range(len(methods))]
    dense_s = statistics.median(times[0][1:])
    by_index = attention_seconds(layers, dict(enumerate(methods)), args.rounds, step="block_mask")
    selection = [statistics.median(by_index[i]) for i in range(len(methods))]
    rows = []
    for (name, params), method, spent, chosen in zip(variants, methods, times, selection, strict=True):
        exact, far = [], []
        with torch.inference_mode():
            for q, k, v, call in layers:
                exact.append(method.attend(q, k, v, call)[1].density())
                far.append(method.layer_stats().get(call.layer_idx, {}).get("far_density", 0.0))
        density, far_density = statistics.mean(exact), statistics.mean(far)
        median = statistics.median(spent[1:])
        saved = dense_s - (median - chosen)  # attention (kernel + far field) saved, selection apart
        rows.append(
            {
                "method": name,
                "params": params,
                "density": density,
                "far_density": far_density,
                "seconds": median,
                "vs_dense": median / dense_s,
                "selection_seconds": chosen,
                "selection_over_saved": chosen / saved if name != "dense" and saved > 0 else None,
            }
        )
        share = rows[-1]["selection_over_saved"]
        print(
            f"| {name} | {params} | {density:.3f} + {far_density:.3f} | {median:.3f} s | "
            f"{median / dense_s:.2f} | {chosen:.3f} s | {'-' if share is None else f'{share:.2f}'} |"
        )
    if args.out:
        config = {"tokens": args.tokens, "layers": [c.layer_idx for *_, c in layers], "rounds": args.rounds}
        atomic_write_json(args.out, {**run_metadata(), "config": config, "results": rows})


if __name__ == "__main__":
    main()
