"""Block-level helpers shared by the selection methods (vectorized over batch, heads and blocks)."""

from __future__ import annotations

import torch


def first_real_key(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Index of the first real (non-padding) key per batch row, ``[B]``; None without padding.

    With left padding a sequence's sink tokens start after its padding, not at position 0.
    """
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.int8).argmax(dim=1)


def block_means(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` ``[B, H, T, D]`` over blocks of ``block`` tokens along T, ``[B, H, nT, D]`` fp32.

    ``valid`` ``[B, T]`` bool excludes padding tokens from the mean; a ragged last block is averaged
    over the tokens it holds.
    """
    b, h, t, d = x.shape
    n = -(-t // block)
    pad = n * block - t
    if valid is None:  # no weights: sum in fp32 straight from x (no fp32 copy of x, no product)
        xs = x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))
        sums = xs.view(b, h, n, block, d).sum(3, dtype=torch.float32)
        counts = torch.full((n, 1), float(block), device=x.device)
        counts[-1] = block - pad
        return sums / counts
    weight = valid[:, None, :, None].to(torch.float32)
    xs = torch.nn.functional.pad(x.float() * weight, (0, 0, 0, pad)).view(b, h, n, block, d).sum(3)
    counts = torch.nn.functional.pad(weight, (0, 0, 0, pad)).view(b, 1, n, block, 1).sum(3)
    return xs / counts.clamp_min(1.0)
