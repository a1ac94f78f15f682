"""Differences between transformers versions, handled by feature detection at call time.

Supported: transformers 5.17 (the GPU image) to the newest release. Each helper has a test in
``tests/test_compat.py``.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface


def padding_mask_function(*, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, **_):
    """The mask function registered with ``AttentionMaskInterface`` beside our attention function.

    transformers calls it with keyword arguments (``batch_size``, ``q_length``, ``kv_length``,
    ``q_offset``/``kv_offset`` or ``cache_position`` depending on the version, ``mask_function``,
    ``attention_mask``...). The kernel builds causality and windows itself, so all it needs is the
    2D key-padding mask ``[B, kv_length]`` (True = real token), or None when nothing is padded.
    Without this registration transformers hands the attention function ``attention_mask=None``
    and left padding would be attended.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if kv_length is not None:
        # Sliding-window caches hold fewer keys than tokens seen: keep the most recent columns.
        mask = mask[:, -kv_length:]
    return None if bool(mask.all()) else mask


def key_padding_mask(attention_mask, kv_len: int) -> torch.Tensor | None:
    """The ``[B, kv_len]`` bool padding mask from what reaches the attention function.

    It is what :func:`padding_mask_function` returned (2D bool or None). A 4D mask means the caller
    built one itself (a custom ``attention_mask`` of shape ``[B, 1, Tq, Tk]``), which a block-sparse
    kernel cannot honour element by element.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"sparse-llm attention takes a 2D padding mask; got a {attention_mask.dim()}D attention mask. "
            "Pass a 2D attention_mask [batch, seq] (or none) to the model."
        )
    return attention_mask.to(torch.bool)[:, -kv_len:]


def register_attention(name: str, attention_function, mask_function) -> None:
    """Register an attention function and its mask function under ``name`` (both are needed)."""
    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, mask_function)


def unregister_attention(name: str) -> None:
    """Undo :func:`register_attention`; a no-op for unknown names."""
    # GeneralInterface has ``register`` but no way to remove a key: drop it from the class mapping.
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` from 5.24 on, else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
