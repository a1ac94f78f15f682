"""Prefill latency and peak activation memory of one (model, method, length) configuration.

Baselines beside the registered methods: ``sdpa`` and ``eager`` (Hugging Face's own attention) and
``floor``: the same forward with attention replaced by a zero-cost stub, so ``sdpa / floor`` is the
Amdahl bound on any attention speedup. Prefill uses ``logits_to_keep=1`` so that full-vocabulary
logits do not dominate time and memory. With ``prefill_chunk`` the prompt goes through the model's
KV cache that many tokens at a time (:func:`sparse_llm.prefill`), timed and measured the same way.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

import sparse_llm
from sparse_llm.kernels import release_workspace
from sparse_llm.measure import measure_peak, synchronize
from sparse_llm.patches.compat import register_attention, unregister_attention

# Hugging Face's own attention implementations; flex_attention compiles on first use, and
# flash_attention_2 needs the flash-attn package (the `flash` extra) and a CUDA device.
HF_BASELINES = ("sdpa", "eager", "flex_attention", "flash_attention_2")
FLOOR = "floor"


@dataclass
class PrefillResult:
    method: str
    params: dict
    length: int
    times_s: list[float]
    peak_mem_mb: float
    density: float | None
    device: str
    selection_s: float | None = None  # one extra run: the method's block selection, summed over layers
    sparse_attention_s: float | None = None  # ... and the rest of its attention calls (kernel, far field)
    prefill_chunk: int | None = None  # tokens per forward through the cache; None = the whole prompt
    chunk_densities: list[float] | None = None  # a sparse method's density per chunk (chunked runs)
    far_density: float | None = None  # a far field's reads in density units (attention_stats); 0 without
    median_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_s = statistics.median(self.times_s)

    def to_dict(self) -> dict:
        return asdict(self)


def _zero_attention(module, query, key, value, attention_mask, **kwargs):
    b, _, t, d = query.shape
    return query.new_zeros(b, t, query.shape[1], d), None


@contextlib.contextmanager
def _attention(model, method: str, params: dict):
    """Run the block with ``method``: an HF implementation, the zero-cost floor, or a sparse method."""
    if method in HF_BASELINES or method == FLOOR:
        previous = model.config._attn_implementation
        name = "sparse_llm_floor" if method == FLOOR else method
        if method == FLOOR:
            register_attention(name, _zero_attention, lambda **kwargs: None)
        model.set_attn_implementation(name)
        try:
            yield
        finally:
            model.set_attn_implementation(previous)
            if method == FLOOR:
                unregister_attention(name)
    else:
        with sparse_llm.sparse_attention(model, sparse_llm.get_method(method, **params)):
            yield


@contextlib.contextmanager
def _timed_calls(method, device, totals: dict[str, float]):
    """Time the method instance's ``block_mask`` and ``attend`` calls into ``totals`` (seconds, synced)."""

    def timed(name: str):
        inner = getattr(method, name)

        def call(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            synchronize(device)
            totals[name] += time.perf_counter() - start
            return result

        return call

    method.block_mask, method.attend = timed("block_mask"), timed("attend")  # instance attributes shadow
    try:
        yield
    finally:
        del method.block_mask, method.attend


def bench_prefill(
    model,
    input_ids: torch.Tensor,
    method: str,
    params: dict | None = None,
    *,
    repeats: int = 3,
    warmup_tokens: int = 256,
    split: bool = True,
    prefill_chunk: int | None = None,
) -> PrefillResult:
    """Median prefill time over ``repeats`` runs and the peak memory of the first timed run.

    A warm-up forward on the first ``warmup_tokens`` tokens runs first and is not timed. The device
    is synchronized before and after each timed call. ``split``: for a sparse method, one more
    (untimed) prefill splits its attention time into selection and the rest. ``prefill_chunk``:
    tokens per forward through the KV cache (None: the whole prompt in one forward); the density is
    then the whole prompt's (``attention_stats(model)["prefill"]``), with each chunk's beside it.
    """
    params = dict(params or {})
    device = input_ids.device
    times = []
    peak = 0
    density = chunk_densities = far_density = None

    def run():
        return sparse_llm.prefill(model, input_ids, prefill_chunk)

    with torch.no_grad(), _attention(model, method, params):
        model(input_ids[:, :warmup_tokens], logits_to_keep=1)
        release_workspace()  # the first timed run maps the kernel's gather buffers: its peak counts them
        for i in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            if i == 0:
                _, peak = measure_peak(run, device)
            else:
                run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        selection = sparse_s = None
        sparse = method not in HF_BASELINES and method != FLOOR
        if sparse:
            stats = sparse_llm.attention_stats(model)["prefill"]
            density, far_density = stats["density"], stats["far_density"]
            if prefill_chunk is not None:
                chunk_densities = [c["density"] for c in stats["chunks"]]
        if sparse and split:
            # An extra, separately synchronized run splits the sparse layers' time (not in the median).
            totals = {"block_mask": 0.0, "attend": 0.0}
            with _timed_calls(sparse_llm.active_method(model), device, totals):
                run()
            selection, sparse_s = totals["block_mask"], totals["attend"] - totals["block_mask"]
    return PrefillResult(
        method=method,
        params=params,
        length=input_ids.shape[1],
        times_s=times,
        peak_mem_mb=peak / 2**20,
        density=density,
        far_density=far_density,
        device=str(device),
        selection_s=selection,
        sparse_attention_s=sparse_s,
        prefill_chunk=prefill_chunk,
        chunk_densities=chunk_densities,
    )
