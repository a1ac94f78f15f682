"""Route a Hugging Face model's attention through a sparse method, reversibly.

Integration is through ``transformers.AttentionInterface`` and ``AttentionMaskInterface`` only: each
``install`` registers a uniquely named attention function (a closure over the method) and the
padding-mask function, then switches the model with ``set_attn_implementation``; ``uninstall``
switches back to the remembered implementation and drops both registrations. Nothing is stored on
the model's modules and no forward is rebound.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field

import torch

from sparse_llm.backends.base import LayerCall, SparseMethod, get_method
from sparse_llm.kernels import BlockMask, forward_only
from sparse_llm.patches import compat
from sparse_llm.patches.families import family_of

logger = logging.getLogger(__name__)

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, _Patch] = weakref.WeakKeyDictionary()
_NAMES = itertools.count()


@dataclass
class _Patch:
    name: str
    previous: str
    method: SparseMethod
    last_masks: dict[int, tuple[BlockMask, bool]] = field(default_factory=dict)  # layer -> (mask, sparse?)


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
        )
        q_len = query.shape[2]
        # Local (sliding-window) layers stay exact with their own window: the kernel already skips
        # every block outside it. Methods sparsify the global layers only.
        stay_dense = (
            call.sliding_window is not None
            or layer_idx in method.dense_layers
            or (q_len == 1 and method.decode == "dense")
            or (q_len > 1 and q_len < method.min_seq_len)
        )
        masks = []

        def attend(q, k, v):
            out, mask = (dense if stay_dense else method).attend(q, k, v, call)
            masks.append(mask)
            return out

        out = forward_only(attend, query, key, value)
        mask = masks[0]
        patch.last_masks[layer_idx] = (mask, not stay_dense)
        return out.transpose(1, 2).contiguous(), None

    return attention


def install(model: torch.nn.Module, method: SparseMethod) -> None:
    """Switch ``model`` to ``method``; raises before changing anything if the model is unsupported."""
    if not isinstance(method, SparseMethod):
        raise TypeError(f"method must be a SparseMethod, got {type(method).__name__}")
    family_of(model)
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


def uninstall(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`install`; no-op if unpatched."""
    patch = _ACTIVE.pop(model, None)
    if patch is None:
        return
    model.set_attn_implementation(patch.previous)
    compat.unregister_attention(patch.name)


def active_method(model: torch.nn.Module) -> SparseMethod | None:
    """The method ``model`` is sparsified with (the instance :func:`sparse_llm.sparsify` installed), or
    None if it is not sparsified. Public as ``sparse_llm.active_method``."""
    patch = _ACTIVE.get(model)
    return None if patch is None else patch.method


def last_masks(model: torch.nn.Module) -> dict[int, tuple[BlockMask, bool]]:
    """Per layer, the BlockMask of the most recent forward and whether the method (not dense) chose it."""
    patch = _ACTIVE.get(model)
    return {} if patch is None else dict(patch.last_masks)
