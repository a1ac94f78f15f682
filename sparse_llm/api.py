"""The one-call public API: ``sparsify``, ``unsparsify``, ``sparse_attention``, ``active_method``,
``attention_stats`` and ``prefill`` (whole or in chunks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sparse_llm.backends import SparseMethod, get_method
from sparse_llm.patches import compat, hf
from sparse_llm.patches.hf import active_method

__all__ = ["active_method", "attention_stats", "prefill", "sparse_attention", "sparsify", "unsparsify"]


def _as_method(method: str | SparseMethod, params: dict) -> SparseMethod:
    if isinstance(method, SparseMethod):
        if params:
            raise ValueError("pass parameters either in the method object or as keywords, not both")
        return method
    return get_method(method, **params)


def sparsify(model: torch.nn.Module, method: str | SparseMethod = "dense", **params) -> torch.nn.Module:
    """Make ``model``'s attention run through a sparse method; returns the same model object.

    Args:
        model: a Hugging Face causal LM of a supported family (Llama, Gemma2, Gemma3, BitNet).
        method: a registered method name (see :func:`list_methods`) or a method instance.
        **params: the method's parameters, e.g. ``sink_tokens=128, local_tokens=1024`` for
            ``"streaming"``; every method also takes ``block_size``, ``min_seq_len``,
            ``dense_layers`` and ``decode``.

    Raises ``ValueError`` for an unknown method or bad parameter (a parameter of the wrong type raises
    ``ParameterTypeError``, both a ``TypeError`` and a ``ValueError``), ``TypeError`` if ``model`` is not
    a ``torch.nn.Module`` and ``NotImplementedError`` for an unsupported model, all before the model is
    changed. Sparsifying a sparsified model
    replaces its method; :func:`unsparsify` then restores the original implementation.
    """
    hf.install(model, _as_method(method, params))
    return model


def unsparsify(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before :func:`sparsify` (no-op if none)."""
    hf.uninstall(model)
    return model


@contextlib.contextmanager
def sparse_attention(model: torch.nn.Module, method: str | SparseMethod = "dense", **params) -> Iterator:
    """Context manager form of :func:`sparsify`; the previous implementation is restored on exit.

    Nested use restores the outer method on exit of the inner block.
    """
    outer = active_method(model)
    sparsify(model, method, **params)
    try:
        yield model
    finally:
        if outer is None:
            hf.uninstall(model)
        else:
            hf.install(model, outer)


def attention_stats(model: torch.nn.Module) -> dict:
    """Density of the most recent forward, and of the most recent prefill, of a sparsified model.

    Returns ``{"method", "density", "far_density", "layers": {layer_idx: {"density", "sparse"}},
    "prefill"}``. A layer's density is the fraction of its causally (and window-) reachable blocks
    that were computed exactly in the most recent forward (a decode step after ``generate``, the last
    chunk after a chunked prefill); ``density`` is the mean over the layers the method sparsified
    (1.0 if none; None, as ``far_density``, until a forward has run). A method with a far field adds
    its size to each sparse layer's entry (:meth:`SparseMethod.layer_stats`: ``far_keys``,
    ``far_groups``, ``far_slots``, ``far_density``: the far keys read over the reachable (query, key)
    pairs, in the units of ``density``), and ``far_density`` is its mean over the sparsified layers
    (0.0 without a far field): the attention computed is ``density + far_density``.

    ``prefill`` covers every call of the most recent prompt, from its first call (no cached keys,
    or the first after decode steps) to its last chunk: ``{"density", "chunks": [{"start",
    "length", "density"}, ...]}``, with a chunk's ``start`` its first query's position and
    ``length`` its query count. Over the layers the method sparsified in any chunk, a chunk's
    density is their mean density in that chunk, and ``prefill["density"]`` their mean of computed
    over reachable blocks summed over all chunks (cost-weighted; equal to ``density`` for a prompt
    in one piece); ``far_density`` likewise, per chunk and in total. None until a prefill has run.
    """
    method = active_method(model)
    if method is None:
        raise ValueError("model is not sparsified: call sparse_llm.sparsify(model, ...) first")
    extra = method.layer_stats()
    layers = {
        idx: {"density": mask.density(), "sparse": sparse, **(extra.get(idx, {}) if sparse else {})}
        for idx, (mask, sparse) in hf.last_masks(model).items()
    }
    sparse = [info for info in layers.values() if info["sparse"]]
    density = far_density = None  # no forward yet: nothing was computed, neither dense nor sparse
    if layers:
        density = sum(info["density"] for info in sparse) / len(sparse) if sparse else 1.0
        far_density = sum(info.get("far_density", 0.0) for info in sparse) / len(sparse) if sparse else 0.0
    return {
        "method": method.name,
        "density": density,
        "far_density": far_density,
        "layers": dict(sorted(layers.items())),
        "prefill": _prefill_stats(hf.prefill_counts(model)),
    }


def _prefill_stats(counts: dict[int, list[hf.ChunkCount]]) -> dict | None:
    if not counts:
        return None
    sparse = [calls for calls in counts.values() if any(c.sparse for c in calls)]
    n_chunks = min(len(calls) for calls in counts.values())

    def mean(values: list[float], empty: float) -> float:
        return sum(values) / len(values) if values else empty

    chunks = []
    for i in range(n_chunks):
        here = [calls[i] for calls in sparse]
        chunks.append(
            {
                "start": max(calls[i].start for calls in counts.values()),  # sliding caches hold fewer keys
                "length": next(iter(counts.values()))[i].length,
                "density": mean([int(c.selected) / c.reachable for c in here], 1.0),
                "far_density": mean([c.far / c.reachable for c in here], 0.0),
            }
        )
    reachable = [sum(c.reachable for c in calls) for calls in sparse]
    totals = [sum(int(c.selected) for c in calls) / n for calls, n in zip(sparse, reachable, strict=True)]
    far = [sum(c.far for c in calls) / n for calls, n in zip(sparse, reachable, strict=True)]
    return {"density": mean(totals, 1.0), "far_density": mean(far, 0.0), "chunks": chunks}


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    chunk_size: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
):
    """Run a prompt through ``model`` into a fresh KV cache, whole or ``chunk_size`` tokens at a time.

    Chunked prefill bounds the activations of every layer (the MLP's above all) by the chunk instead
    of the prompt; attention reads the keys before the chunk from the cache. It is
    ``generate(..., prefill_chunk_size=N)``'s loop, with one difference on a sparsified model: every
    chunk but the last is marked as followed by more prompt (``LayerCall.prompt_continues``), so that
    the dense tail of the selection methods is spent on the prompt's end only, as in a whole prefill.
    Chunk sizes that are multiples of the method's ``block_size`` keep the whole prompt's block grid.

    Args:
        model: a Hugging Face causal LM, sparsified or not.
        input_ids: ``[B, T]`` prompt ids.
        chunk_size: tokens per forward; None (or >= T) for one forward.
        attention_mask: ``[B, T]`` (0 = left padding) or None; positions then count real tokens, as
            in ``generate``.
        logits_to_keep: logits of the last chunk's last tokens to return (``0``: all of that chunk).

    Returns the model output of the last forward: its logits and the cache of the whole prompt.
    """
    length = input_ids.shape[1]
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if length < 1:
        raise ValueError("input_ids holds no token: an empty prompt cannot be prefilled")
    step = length if chunk_size is None else chunk_size
    cache_name = compat.cache_kwarg(model)
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = None
    for start in range(0, length, step):
        end = min(start + step, length)
        kwargs = {"use_cache": True, "logits_to_keep": logits_to_keep if end == length else 1}
        if out is not None:
            kwargs[cache_name] = getattr(out, cache_name)
        if attention_mask is not None:
            kwargs.update(attention_mask=attention_mask[:, :end], position_ids=position_ids[:, start:end])
        marked = contextlib.nullcontext() if end == length else hf.more_prompt_follows(model)
        with marked:
            out = model(input_ids[:, start:end], **kwargs)
    return out
