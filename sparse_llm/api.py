"""The one-call public API: ``sparsify``, ``unsparsify``, ``sparse_attention``, ``active_method`` and
``attention_stats``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sparse_llm.backends import SparseMethod, get_method
from sparse_llm.patches import hf
from sparse_llm.patches.hf import active_method

__all__ = ["active_method", "attention_stats", "sparse_attention", "sparsify", "unsparsify"]


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

    Raises ``ValueError`` for an unknown method or bad parameter and ``NotImplementedError`` for an
    unsupported model, in both cases before the model is changed. Sparsifying a sparsified model
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
    """Density of the most recent forward of a sparsified model.

    Returns ``{"method", "density", "layers": {layer_idx: {"density", "sparse"}}}`` where a layer's
    density is the fraction of its causally (and window-) reachable blocks that were computed, and
    ``density`` is the mean over the layers the method sparsified (1.0 if it sparsified none).
    """
    method = active_method(model)
    if method is None:
        raise ValueError("model is not sparsified: call sparse_llm.sparsify(model, ...) first")
    layers = {
        idx: {"density": mask.density(), "sparse": sparse}
        for idx, (mask, sparse) in hf.last_masks(model).items()
    }
    sparse = [info["density"] for info in layers.values() if info["sparse"]]
    return {
        "method": method.name,
        "density": sum(sparse) / len(sparse) if sparse else 1.0,
        "layers": dict(sorted(layers.items())),
    }
