"""Route a Hugging Face model's attention through a sparse method, reversibly.

Integration is through ``transformers.AttentionInterface`` and ``AttentionMaskInterface`` only: each
``install`` registers a uniquely named attention function (a closure over the method) and the
padding-mask function, then switches the model with ``set_attn_implementation``; ``uninstall``
switches back to the remembered implementation and drops both registrations. Nothing is stored on
the model's modules and no forward is rebound.

Chunked prefill (a prompt fed through the cache in pieces: Tq < Tk) needs nothing from the model:
each call's queries are the last Tq of its Tk keys. Per layer, the patch keeps a count of the blocks
each prefill call computed, from the call without cached keys (or the first one after decode steps)
on, for :func:`sparse_llm.attention_stats`'s per-chunk and total density.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sparse_llm.backends.base import LayerCall, SparseMethod, get_method
from sparse_llm.kernels import BlockMask, forward_only, release_workspace
from sparse_llm.kernels.block_mask import block_geometry
from sparse_llm.patches import compat
from sparse_llm.patches.families import family_of

logger = logging.getLogger(__name__)

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, _Patch] = weakref.WeakKeyDictionary()
_NAMES = itertools.count()


@dataclass(frozen=True)
class ChunkCount:
    """One prefill call of one layer: its queries' first absolute position and number, the blocks it
    computed (a 0-dim int tensor, read only when reported), the reachable ones over all rows, and the
    far field it read in the same units (reachable blocks x its ``far_density``; 0 without one)."""

    start: int
    length: int
    selected: torch.Tensor
    reachable: int
    sparse: bool
    far: float = 0.0


@dataclass
class _Patch:
    name: str
    previous: str
    method: SparseMethod
    last_masks: dict[int, tuple[BlockMask, bool]] = field(default_factory=dict)  # layer -> (mask, sparse?)
    prefill: dict[int, list[ChunkCount]] = field(default_factory=dict)  # layer -> the current prompt's calls
    decoded: set[int] = field(default_factory=set)  # layers with a decode step since their last prefill call
    prompt_continues: bool = False  # set by more_prompt_follows


def _count(mask: BlockMask, sparse: bool, far_density: float) -> ChunkCount:
    reach = block_geometry(
        q_len=mask.q_len,
        kv_len=mask.kv_len,
        block_q=mask.block_q,
        block_k=mask.block_k,
        causal=mask.is_causal,
        sliding_window=mask.sliding_window,
    )[0]
    rows = mask.kv_num_blocks.shape[0] * mask.kv_num_blocks.shape[1]
    selected = mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()
    reachable = rows * int(reach.sum())
    start = mask.kv_len - mask.q_len
    return ChunkCount(start, mask.q_len, selected, reachable, sparse, far_density * reachable)


def _record(patch: _Patch, layer_idx: int, mask: BlockMask, sparse: bool, far_density: float = 0.0) -> None:
    patch.last_masks[layer_idx] = (mask, sparse)
    if mask.q_len == 1:
        patch.decoded.add(layer_idx)
        return
    calls = patch.prefill.setdefault(layer_idx, [])
    if mask.q_len == mask.kv_len or layer_idx in patch.decoded:  # a new prompt (or turn) starts here
        calls.clear()
        patch.decoded.discard(layer_idx)
    calls.append(_count(mask, sparse, far_density))


def _make_attention_function(patch: _Patch):
    method = patch.method
    dense = get_method("dense", block_size=method.block_size)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and module.training:
            raise NotImplementedError(
                "sparse-llm attention is inference-only: attention dropout is not supported"
            )
        if not getattr(module, "is_causal", True):
            raise NotImplementedError("sparse-llm attention supports causal (decoder) attention only")
        layer_idx = getattr(module, "layer_idx", -1)
        call = LayerCall(
            layer_idx=layer_idx,
            scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
            softcap=kwargs.get("softcap"),
            sliding_window=kwargs.get("sliding_window"),
            key_padding_mask=compat.key_padding_mask(attention_mask, key.shape[2]),
            prompt_continues=patch.prompt_continues and query.shape[2] > 1,
        )
        q_len = query.shape[2]
        # Local (sliding-window) layers stay exact with their own window: the kernel already skips
        # every block outside it. Methods sparsify the global layers only. min_seq_len looks at the
        # context (keys), so that the chunks of a long prompt are sparse like the whole prompt.
        stay_dense = (
            call.sliding_window is not None
            or layer_idx in method.dense_layers
            or (q_len == 1 and method.decode == "dense")
            or (q_len > 1 and key.shape[2] < method.min_seq_len)
        )
        masks = []

        def attend(q, k, v):
            out, mask = (dense if stay_dense else method).attend(q, k, v, call)
            masks.append(mask)
            return out

        out = forward_only(attend, query, key, value)
        far = 0.0 if stay_dense else method.layer_stats().get(layer_idx, {}).get("far_density", 0.0)
        _record(patch, layer_idx, masks[0], not stay_dense, far)
        return out.transpose(1, 2).contiguous(), None

    return attention


def install(model: torch.nn.Module, method: SparseMethod) -> None:
    """Switch ``model`` to ``method``; raises before changing anything if the model is unsupported."""
    if not isinstance(method, SparseMethod):
        raise TypeError(f"method must be a SparseMethod, got {type(method).__name__}")
    _check_model(model)
    family_of(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    beyond = [i for i in method.dense_layers if i >= n_layers]
    if beyond:
        raise ValueError(
            f"dense_layers {beyond} are not layers of this model: it has {n_layers} (0..{n_layers - 1})"
        )
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
        )
    if model in _ACTIVE:
        uninstall(model)
    patch = _Patch(
        name=f"sparse_llm_{method.name}_{next(_NAMES)}",
        previous=model.config._attn_implementation,
        method=method,
    )
    compat.register_attention(patch.name, _make_attention_function(patch), compat.padding_mask_function)
    try:
        model.set_attn_implementation(patch.name)
    except Exception:
        compat.unregister_attention(patch.name)
        raise
    _ACTIVE[model] = patch
    logger.debug("model %s now uses %s (was %s)", type(model).__name__, patch.name, patch.previous)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a transformers causal LM (a torch.nn.Module), got {type(model).__name__}"
        )


def uninstall(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`install`; no-op if unpatched."""
    _check_model(model)
    patch = _ACTIVE.pop(model, None)
    if patch is None:
        return
    model.set_attn_implementation(patch.previous)
    compat.unregister_attention(patch.name)
    release_workspace()


def active_method(model: torch.nn.Module) -> SparseMethod | None:
    """The method ``model`` is sparsified with (the instance :func:`sparse_llm.sparsify` installed), or
    None if it is not sparsified. Public as ``sparse_llm.active_method``."""
    _check_model(model)
    patch = _ACTIVE.get(model)
    return None if patch is None else patch.method


def last_masks(model: torch.nn.Module) -> dict[int, tuple[BlockMask, bool]]:
    """Per layer, the BlockMask of the most recent forward and whether the method (not dense) chose it."""
    patch = _ACTIVE.get(model)
    return {} if patch is None else dict(patch.last_masks)


def prefill_counts(model: torch.nn.Module) -> dict[int, list[ChunkCount]]:
    """Per layer, the block counts of each call of the most recent prefill (one per chunk)."""
    patch = _ACTIVE.get(model)
    return {} if patch is None else {idx: list(calls) for idx, calls in patch.prefill.items()}


@contextlib.contextmanager
def more_prompt_follows(model: torch.nn.Module) -> Iterator[None]:
    """Mark the forwards inside the block as prompt chunks that more prompt tokens follow, so that
    methods leave out what belongs to the prompt's end (``LayerCall.prompt_continues``). A no-op on
    a model that is not sparsified."""
    patch = _ACTIVE.get(model)
    if patch is None:
        yield
        return
    patch.prompt_continues = True
    try:
        yield
    finally:
        patch.prompt_continues = False
