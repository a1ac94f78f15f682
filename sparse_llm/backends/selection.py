"""Block-level building blocks shared by the selection methods.

Every function works on block matrices ``[B, H, nQ, nK]`` (True = the query block attends the key
block) and is vectorized over batch, heads and blocks. Queries are aligned to the end of the keys:
query ``i`` sits at absolute position ``Tk - Tq + i``, as in the kernel.
"""

from __future__ import annotations

import torch


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def query_block_last_position(q_len: int, kv_len: int, block_q: int, device) -> torch.Tensor:
    """Absolute position of the last query of each query block, ``[nQ]`` int64."""
    n_q = num_blocks(q_len, block_q)
    ends = torch.clamp((torch.arange(n_q, device=device) + 1) * block_q, max=q_len)
    return kv_len - q_len + ends - 1


def first_real_key(key_padding_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Index of the first real (non-padding) key per batch row, ``[B]``; 0 without padding.

    With left padding a sequence's sink tokens start after its padding, not at position 0.
    """
    if key_padding_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return key_padding_mask.to(torch.int8).argmax(dim=1)


def reachable_blocks(q_len: int, kv_len: int, block_q: int, block_k: int, device) -> torch.Tensor:
    """Causally reachable key blocks of each query block, ``[1, 1, nQ, nK]`` bool."""
    last = query_block_last_position(q_len, kv_len, block_q, device)
    starts = torch.arange(num_blocks(kv_len, block_k), device=device) * block_k
    return (starts[None, :] <= last[:, None])[None, None]


def sink_local_blocks(
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    *,
    sink_tokens: int,
    local_tokens: int,
    kv_start: torch.Tensor,
) -> torch.Tensor:
    """Key blocks overlapping the sink tokens or the local window of each query block, ``[B, 1, nQ, nK]``.

    Sinks are the first ``sink_tokens`` real keys of each row (``kv_start`` ``[B]`` skips left
    padding); the local window is the ``local_tokens`` keys ending at the query block's last query.
    Both are rounded up to whole blocks; causality is applied.
    """
    device = kv_start.device
    last = query_block_last_position(q_len, kv_len, block_q, device)  # [nQ]
    starts = torch.arange(num_blocks(kv_len, block_k), device=device) * block_k  # [nK]
    ends = starts + block_k  # exclusive
    causal = starts[None, :] <= last[:, None]
    local = ends[None, :] > (last[:, None] - local_tokens + 1)
    sink = (starts[None, :] < (kv_start[:, None] + sink_tokens)) & (ends[None, :] > kv_start[:, None])  # [B, nK]
    return ((local[None] | sink[:, None, :]) & causal[None])[:, None]


def topk_blocks(scores: torch.Tensor, forced: torch.Tensor, reachable: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` best key blocks per query block, forced blocks first, unreachable never.

    Args:
        scores: ``[B, H, nQ, nK]`` float, higher is better.
        forced: bool, broadcastable to ``scores``: blocks always kept (sinks, local window);
            they count towards ``k``.
        reachable: bool, broadcastable to ``scores``: causally allowed blocks.
        k: blocks to keep per query block (clamped to ``nK``).
    Returns:
        ``[B, H, nQ, nK]`` bool.
    """
    n_k = scores.shape[-1]
    ranked = scores.float().masked_fill(forced, float("inf")).masked_fill(~reachable, float("-inf"))
    keep = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device)
    top = ranked.topk(min(max(k, 0), n_k), dim=-1).indices
    keep.scatter_(-1, top, True)
    return (keep | forced) & reachable


def block_means(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` ``[B, H, T, D]`` over blocks of ``block`` tokens along T, ``[B, H, nT, D]`` fp32.

    ``valid`` ``[B, T]`` bool excludes padding tokens from the mean; a ragged last block is averaged
    over the tokens it holds.
    """
    b, h, t, d = x.shape
    n = num_blocks(t, block)
    weight = torch.ones(b, 1, t, 1, dtype=torch.float32, device=x.device)
    if valid is not None:
        weight = valid[:, None, :, None].to(torch.float32)
    pad = n * block - t
    xs = torch.nn.functional.pad(x.float() * weight, (0, 0, 0, pad)).view(b, h, n, block, d).sum(3)
    counts = torch.nn.functional.pad(weight, (0, 0, 0, pad)).view(b, 1, n, block, 1).sum(3)
    return xs / counts.clamp_min(1.0)
