"""A one-command demo: needle-in-a-haystack retrieval under each attention method on an embedded model.

Every method sees the same prompt. Per method, one timed prefill of the whole prompt (with a KV
cache and ``logits_to_keep=1``) is followed by greedy decoding from that cache, so the prompt is
processed once per method. ``sdpa`` (the unpatched Hugging Face model) is always the first row.
Each prefill is timed once, after an untimed warm-up on a short prompt: a demo, not a benchmark
(``sparse_llm.bench`` reports medians of repeated runs).

Peak memory is the peak above the level just before the prefill (so it includes the KV cache the
prefill writes): the CUDA allocator peak on GPU; on
CPU the resident set size sampled by a background thread (``ru_maxrss`` only grows over a process's
life, so it cannot measure one call), which makes CPU peaks lower bounds (see
:func:`sparse_llm.measure.measure_peak`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import sparse_llm
from sparse_llm.eval.common import BASELINE, prefill_and_generate
from sparse_llm.eval.haystack import build_needle_prompt, score_answer
from sparse_llm.models import check_fits_context, load_model, load_tokenizer, max_positions
from sparse_llm.texts import REPEAT_FILLER, load_haystack_text

logger = logging.getLogger(__name__)

# The 270M/135M embedded models retrieve the passkey from the repeated filler at 4K tokens, but not
# reliably from essays beyond ~1K tokens even with sdpa, so the demo defaults to the filler.
HAYSTACKS = {"repeat": lambda: REPEAT_FILLER, "essays": load_haystack_text}


@dataclass
class DemoRow:
    """One method's result.

    ``density``: fraction of causally reachable key blocks the prefill computed (None for ``sdpa``);
    ``far_density``: what a far field read (collapsed keys, same units; 0 without one, None for sdpa);
    ``prefill_s``: seconds; ``peak_mem_mb``: MiB above the pre-prefill level; ``answer``: the greedy
    continuation; ``correct``: :func:`~sparse_llm.eval.haystack.score_answer` of it.
    """

    method: str
    density: float | None
    prefill_s: float
    peak_mem_mb: float
    answer: str
    correct: bool
    far_density: float | None = None


def _run_one(model, tokenizer, input_ids: torch.Tensor, answer: str, max_new_tokens: int, sparse: bool):
    gen = prefill_and_generate(model, input_ids, max_new_tokens, sparse=sparse, measure_memory=True)
    text = tokenizer.decode(gen.ids[0], skip_special_tokens=True)
    peak_mb = gen.peak_mem_bytes / 2**20
    correct = score_answer(text, answer)
    return DemoRow(None, gen.density, gen.prefill_s, peak_mb, text, correct, gen.far_density)


def run_demo(
    model_name: str = "gemma3-270m",
    *,
    context_tokens: int = 4096,
    methods: Sequence[str] = ("dense", "streaming", "block_topk"),
    max_new_tokens: int = 12,
    depth: float = 0.5,
    needle: str = "passkey",
    haystack: str = "repeat",
    method_params: dict[str, dict] | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> list[DemoRow]:
    """Retrieve a needle from a ``context_tokens``-token prompt with ``sdpa`` and then each method.

    Args:
        model_name: an embedded model (see :func:`sparse_llm.models.list_models`).
        context_tokens: prompt length in tokens.
        methods: registered sparse methods, run with ``sparse_attention(model, method, **params)``;
            ``"sdpa"`` (the unpatched model) is added as the first row if missing.
        max_new_tokens: greedy tokens generated for the answer.
        depth: needle position in the haystack, in [0, 1].
        needle: a preset of :data:`sparse_llm.eval.haystack.NEEDLES`.
        haystack: ``"repeat"`` (RULER's repeated filler, the original passkey test) or ``"essays"``
            (Paul Graham essays: harder, the embedded models mostly fail on it past ~1K tokens).
        method_params: per-method keyword parameters, e.g. ``{"block_topk": {"budget": 1024}}``.
        device: where the model runs.
        progress: show a progress bar; default: when stderr is a terminal.

    Returns one :class:`DemoRow` per method, ``sdpa`` first.

    Raises ``ValueError`` before the model loads for a prompt longer than the model's context (with
    ``max_new_tokens``) or too short for the intro, needle and question; the tokenizer is loaded first
    for the latter.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACKS)}")
    method_params = dict(method_params or {})
    order = [BASELINE, *[m for m in dict.fromkeys(methods) if m != BASELINE]]
    unknown = set(method_params) - set(order)
    if unknown:
        raise ValueError(f"method_params given for methods not run: {sorted(unknown)}; methods: {order}")
    for method in order[1:]:  # unknown names and bad parameters fail before any timing
        sparse_llm.get_method(method, **method_params.get(method, {}))
    check_fits_context([context_tokens], max_positions(model_name), answer_tokens=max_new_tokens)

    # The prompt is built before the model loads: a prompt too short for the needle fails at once.
    tokenizer = load_tokenizer(model_name)
    prompt = build_needle_prompt(
        tokenizer, context_tokens=context_tokens, depth=depth, needle=needle, haystack=HAYSTACKS[haystack]()
    )
    model = load_model(model_name, device=device)
    input_ids = prompt.input_ids.to(model.device)
    logger.info(
        "prompt: %d tokens of %s, needle %r at tokens %d-%d (depth %.2f)",
        context_tokens,
        haystack,
        needle,
        *prompt.needle_span,
        prompt.needle_depth,
    )
    with torch.inference_mode():  # untimed warm-up of threads and allocator
        model.generate(input_ids[:, :32], max_new_tokens=1, do_sample=False)

    rows = []
    start = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    for method in tqdm(order, desc="demo", unit="method", disable=not show):
        if method == BASELINE:
            context = contextlib.nullcontext()
        else:
            context = sparse_llm.sparse_attention(model, method, **method_params.get(method, {}))
        with torch.inference_mode(), context:
            row = _run_one(model, tokenizer, input_ids, prompt.answer, max_new_tokens, method != BASELINE)
        row.method = method
        logger.info("%s: prefill %.2f s, answer %r", method, row.prefill_s, row.answer)
        rows.append(row)
    logger.info("demo: %d methods in %.0f s", len(rows), time.perf_counter() - start)
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """A plain-text table of demo rows, with the prefill speedup against the first (``sdpa``) row."""
    base = rows[0].prefill_s if rows else None
    header = ("method", "density", "far", "prefill s", "speedup", "peak MiB", "correct", "answer")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.method,
                "-" if row.density is None else f"{row.density:.3f}",
                f"{row.far_density:.3f}" if row.far_density else "-",
                f"{row.prefill_s:.2f}",
                f"{base / row.prefill_s:.2f}x" if base and row.prefill_s > 0 else "-",
                f"{row.peak_mem_mb:.0f}",
                "yes" if row.correct else "no",
                repr(row.answer.strip())[:48],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
