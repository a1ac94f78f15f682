"""The approximate methods (deltallm, lightning, lla) beside dense and streaming at the same exact budget.

On the embedded Gemma3-270M (fp32; 3 of its 18 layers are global, the others keep their 512-token
sliding window and run exactly), in one process:

- perplexity of the first ``--tokens`` tokens of the offline essay text, over its first and second
  half (the second is where keys far outside a local window exist), one forward per variant;
- with ``--rounds R``, end-to-end prefill time (``logits_to_keep=1``): every variant once per round
  (odd rounds in reverse order), interleaved over R rounds, so that the machine's drift hits all
  alike; the medians and the ratios to ``dense`` and to each variant's ``streaming`` twin (the same
  sink + local blocks) are reported;
- with ``--layer-rounds R``, the attention of the global layers alone on their captured q, k, v (the
  part the methods change, free of the rest of the forward's noise), interleaved the same way;
- with ``--depths``, passkey retrieval in a ``--tokens``-token prompt of repeated filler (greedy, 12
  tokens) at those depths.

Each variant's exact density and far-field size (``attention_stats``) are stored beside its numbers.
Writes a JSON (rewritten after each step, so a partial run keeps what finished) and prints a table.

    python scripts/quality_approx.py [--tokens 8192] [--rounds 3] [--depths 0.1,0.5,0.9] [--variants ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch

import sparse_llm
from sparse_llm.backends import LayerCall
from sparse_llm.backends.dense import Dense
from sparse_llm.eval.haystack import build_needle_prompt, score_answer
from sparse_llm.models import load
from sparse_llm.patches.compat import cache_kwarg
from sparse_llm.results import atomic_write_json, run_metadata
from sparse_llm.texts import REPEAT_FILLER, load_haystack_text

WIDE = dict(sink_tokens=64, local_tokens=1024)
NARROW = dict(sink_tokens=64, local_tokens=410)  # deltallm's default window at 8K: 5 % of Tk
# label -> (method, params, the streaming twin with the same exact blocks)
VARIANTS = {
    "dense": ("dense", {}, None),
    "streaming": ("streaming", WIDE, None),
    "lightning": ("lightning", WIDE, "streaming"),
    "lightning_group8": ("lightning", {**WIDE, "far_group": 8}, "streaming"),
    "lightning_span1024": ("lightning", {**WIDE, "far_span": 1024}, "streaming"),
    "lightning_taylor": ("lightning", {**WIDE, "far_keys": "taylor"}, "streaming"),
    "lla": ("lla", dict(base="streaming", base_params=WIDE), "streaming"),
    "streaming_410": ("streaming", NARROW, None),
    "deltallm": ("deltallm", {}, "streaming_410"),
    "deltallm_theta3": ("deltallm", {"theta": 3.0}, "streaming_410"),
    "deltallm_channel": ("deltallm", {"hold": "channel"}, "streaming_410"),
}
FAST = "dense,streaming,lightning,lightning_group8,lla,streaming_410,deltallm,deltallm_theta3"


@torch.inference_mode()
def halves(model, ids: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Perplexity over the first and the second half of the predicted tokens of ``ids`` [1, T]."""
    hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    cap = getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for lo in range(0, targets.shape[0], chunk):  # full logits of a 262K vocabulary need GBs
        logits = model.lm_head(hidden[lo : lo + chunk]).float()
        logits = cap * torch.tanh(logits / cap) if cap else logits
        parts.append(torch.nn.functional.cross_entropy(logits, targets[lo : lo + chunk], reduction="none"))
    nll = torch.cat(parts)
    half = nll.shape[0] // 2
    return math.exp(nll[:half].mean().item()), math.exp(nll[half:].mean().item())


@torch.inference_mode()
def retrieve(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 12) -> str:
    """Greedy answer after one prefill (KV cache, ``logits_to_keep=1``), decoded from that cache."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    prompt = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    generated = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens - 1,
        do_sample=False,
        **{cache_kwarg(model): getattr(out, cache_kwarg(model))},
    )
    return tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - start


class _Capture(Dense):
    """Dense attention that keeps the q, k, v and LayerCall of each global (unwindowed) layer."""

    def block_mask(self, q, k, v, call: LayerCall):
        if call.sliding_window is None:
            self.__dict__.setdefault("captured", []).append((q, k, v, call))
        return super().block_mask(q, k, v, call)


@torch.inference_mode()
def capture_global_layers(model, ids) -> list[tuple]:
    """(q, k, v, call) of every global (unwindowed) layer of one prefill of ``ids``."""
    capture = _Capture()
    with sparse_llm.sparse_attention(model, capture):
        model(ids, logits_to_keep=1)
    return capture.captured


@torch.inference_mode()
def attention_seconds(
    layers: list[tuple], methods: dict, rounds: int, step: str = "attend"
) -> dict[str, list[float]]:
    """Per round (interleaved), each method's time summed over the captured ``layers``: its ``attend``,
    or another ``(q, k, v, call)`` step by name (``"block_mask"``: the selection alone)."""
    times: dict[str, list[float]] = {label: [] for label in methods}
    for rnd in range(rounds):
        order = list(methods.items())
        for label, method in order[::-1] if rnd % 2 else order:  # odd rounds reversed, as the prefills
            run = getattr(method, step)
            start = time.perf_counter()
            for q, k, v, call in layers:
                run(q, k, v, call)
            times[label].append(time.perf_counter() - start)
    return times


def layer_stats(model) -> dict:
    """Exact density and the far-field figures of the sparsified layers (attention_stats)."""
    stats = sparse_llm.attention_stats(model)
    return {"density": stats["density"], "layers": {i: v for i, v in stats["layers"].items() if v["sparse"]}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=0, help="interleaved prefill timing rounds (0: none)")
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--layer-rounds", type=int, default=0, help="interleaved rounds of global-layer attention"
    )
    parser.add_argument("--depths", default="", help="needle depths, e.g. 0.1,0.5,0.9 (default: none)")
    parser.add_argument("--variants", default=FAST, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="docs/results/quality_approx_cpu_gemma3-270m_8k.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    labels = args.variants.split(",")
    methods = {label: sparse_llm.get_method(VARIANTS[label][0], **VARIANTS[label][1]) for label in labels}

    model, tokenizer = load("gemma3-270m")
    ids = tokenizer(load_haystack_text()[: 12 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise ValueError(f"the essay text gave only {ids.shape[1]} tokens")
    report = {
        "model": "gemma3-270m",
        "dtype": "float32",
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "variants": {
            label: {"method": VARIANTS[label][0], "params": m.params()} for label, m in methods.items()
        },
        **run_metadata("cpu"),
    }
    for label, method in methods.items() if args.perplexity else ():
        with sparse_llm.sparse_attention(model, method):
            first, second = halves(model, ids)
            report["variants"][label].update(
                ppl_first_half=first, ppl_second_half=second, **layer_stats(model)
            )
        atomic_write_json(args.out, report)
        logging.info("%s: perplexity %.3f / %.3f", label, first, second)

    for depth in [float(d) for d in args.depths.split(",") if d]:
        needle = build_needle_prompt(
            tokenizer, context_tokens=args.tokens, depth=depth, haystack=REPEAT_FILLER
        )
        for label, method in methods.items():
            with sparse_llm.sparse_attention(model, method):
                answer = retrieve(model, tokenizer, needle.input_ids)
            cell = {"answer": answer, "correct": score_answer(answer, needle.answer)}
            report["variants"][label].setdefault("needle", {})[f"{depth:g}"] = cell
            atomic_write_json(args.out, report)

    if args.layer_rounds:
        layer_times = attention_seconds(capture_global_layers(model, ids), methods, args.layer_rounds)
        for label in labels:
            row, twin = report["variants"][label], VARIANTS[label][2]
            row["attention_s"] = layer_times[label]
            for ref in ("dense", twin):
                if ref in layer_times and ref != label:
                    ratios = [a / b for a, b in zip(layer_times[label], layer_times[ref], strict=True)]
                    row[f"attention_vs_{ref}"] = statistics.median(ratios)
        atomic_write_json(args.out, report)
        logging.info("attention: %s", {k: round(statistics.median(v), 3) for k, v in layer_times.items()})

    times: dict[str, list[float]] = {label: [] for label in labels}
    for rnd in range(args.rounds):
        # odd rounds run the variants in reverse order: a variant's place in the round (the process's
        # allocator and cache state after the others) then weighs on every variant alike
        order = list(methods.items())
        for label, method in order[::-1] if rnd % 2 else order:
            with sparse_llm.sparse_attention(model, method):
                times[label].append(prefill_seconds(model, ids))
                report["variants"][label].update(layer_stats(model))
        logging.info("round %d: %s", rnd, {k: round(v[-1], 2) for k, v in times.items()})
    if args.rounds:
        for label in labels:
            row, twin = report["variants"][label], VARIANTS[label][2]
            row["prefill_s"] = times[label]
            row["prefill_median_s"] = statistics.median(times[label])
            # per-round ratios (interleaved), then their median: the drift between rounds cancels
            for ref in ("dense", twin):
                if ref in times and ref != label:
                    ratios = [a / b for a, b in zip(times[label], times[ref], strict=True)]
                    row[f"vs_{ref}"] = statistics.median(ratios)
        atomic_write_json(args.out, report)

    print(f"\nGemma3-270M, {args.tokens} tokens of essays, CPU fp32 ({torch.get_num_threads()} threads)\n")
    head = "| variant | exact density | far density | ppl 1st / 2nd half | prefill s | vs dense / twin "
    print(head + "| attention vs dense / twin |\n" + "|---" * 7 + "|")
    for label, row in report["variants"].items():
        far = [v["far_density"] for v in row.get("layers", {}).values() if "far_density" in v]
        cells = [
            f"{row['density']:.3f}" if "density" in row else "-",
            f"{sum(far) / len(far):.3f}" if far else "-",
            f"{row['ppl_first_half']:.3f} / {row['ppl_second_half']:.3f}" if "ppl_first_half" in row else "-",
            f"{row['prefill_median_s']:.2f}" if "prefill_median_s" in row else "-",
            _ratios(row, "vs_", VARIANTS[label][2]),
            _ratios(row, "attention_vs_", VARIANTS[label][2]),
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


def _ratios(row: dict, prefix: str, twin: str | None) -> str:
    keys = (f"{prefix}dense", f"{prefix}{twin}")
    return " / ".join(f"{row[key]:.3f}" if key in row else "-" for key in keys)


if __name__ == "__main__":
    main()
