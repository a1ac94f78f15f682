"""Log-sum-exp merge of two partial attentions over disjoint key sets.

The convention every kernel and far-field term shares: ``out`` is the row's softmax-weighted value
average and ``lse`` the natural log of its normalizer, so ``out * exp(lse)`` is the unnormalized sum.
Same rule as flash-attention's ``attention_combine_ref`` (tests/cute/test_flash_attn_combine.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets, from each part's (out, lse).

    Args:
        out_a, out_b: [..., T, D] float (any float dtype; the result has ``out_a``'s dtype).
        lse_a, lse_b: [..., T] float32, natural log; ``-inf`` marks a row with no keys in that part.

    Returns:
        (out [..., T, D] in out_a's dtype, lse [..., T] float32). A row empty in both parts gives
        out = 0 and lse = -inf, never NaN.
    """
    _check_shapes(out_a, lse_a, out_b, lse_b)
    lse, w_a, w_b = _merge_weights(lse_a, lse_b)
    out = torch.addcmul(out_a.float() * w_a, out_b.float(), w_b)
    return out.to(out_a.dtype), lse


def merge_attention_(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """:func:`merge_attention` in place: ``out_a`` (float32, any strides) and ``lse_a`` become the
    merged result; the kernel's output tiles skip a temporary and a copy per merged part."""
    _check_shapes(out_a, lse_a, out_b, lse_b)
    if out_a.dtype != torch.float32 or lse_a.dtype != torch.float32:
        raise TypeError(
            f"merge_attention_ accumulates into out_a and lse_a, which must be float32 (got {out_a.dtype} "
            f"and {lse_a.dtype}); use merge_attention for other dtypes"
        )
    lse, w_a, w_b = _merge_weights(lse_a, lse_b)
    out_a.mul_(w_a).addcmul_(out_b, w_b)
    lse_a.copy_(lse)


def _check_shapes(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    if out_a.shape != out_b.shape:
        raise ValueError(
            f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have the same shape"
        )
    if lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must both equal out.shape[:-1] "
            f"= {tuple(out_a.shape[:-1])}"
        )


def _merge_weights(lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(merged lse [..., T], each part's weight exp(lse_part - lse) [..., T, 1]).

    Both weights are computed: a lerp with 1 - w_b loses the small weight's precision (4x the
    error of PyTorch's own attention in the kernel tests)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Both parts empty: lse = -inf; subtracting 0 instead keeps the weights exp(-inf) = 0, not NaN.
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(lse_a - safe).unsqueeze(-1), torch.exp(lse_b - safe).unsqueeze(-1)
