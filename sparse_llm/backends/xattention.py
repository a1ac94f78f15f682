"""``xattention``: antidiagonal block scoring with a cumulative-mass threshold, training-free
(Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring", arXiv 2503.16428).

1. Scoring. Cut queries and keys into groups of ``stride`` (S) tokens. A query group concatenated in
   reverse order (q[iS+S-1], ..., q[iS]) dotted with a key group concatenated in order (k[jS], ...,
   k[jS+S-1]) is the sum of the S logits on the antidiagonal of their S x S tile, so one GEMM of
   (Tq/S) x (Tk/S) x (S*D), about 1/S of a dense QK^T, scores every tile. Scaled by scale / S (the
   mean antidiagonal logit, soft-capped when the layer caps), masked, softmaxed per query group in
   fp32, and summed over (block/S x block/S) sub-grids: block scores whose full rows sum to block/S.
2. Selection, per query head and query block: the sink and local blocks, then blocks by descending
   score until the cumulative mass (forced blocks counted first) reaches ``threshold`` of the row;
   the block that crosses it is kept. ``budget`` caps the blocks per row.

Only the selection is approximate: attention over the selected blocks is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method
from sparse_llm.backends.selection import (
    CAUSAL_CHUNKS,
    key_blocks_with_real_keys,
    logits_nt,
    reachable_blocks,
    real_keys,
    scoring_dtype,
)
from sparse_llm.kernels import BlockMask


def antidiagonal_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    call: LayerCall,
    block_size: int,
    stride: int,
    max_elements: int = 2**25,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """XAttention block scores, fp32 ``[B, Hq, nQ, nK]``, of q ``[B, Hq, Tq, D]`` and k ``[B, Hkv, Tk, D]``.

    Queries are the last Tq of the Tk positions; query head ``h`` uses KV head ``h // (Hq // Hkv)``
    (K is broadcast, never repeated). Tile (query group i, key group j) is kept iff key jS is not after
    the group's last query (the diagonal tile is kept whole, as in the paper) and the key group holds a
    real key. Padded keys (``call.key_padding_mask`` False, or past Tk) add 0 to the antidiagonal sums;
    query groups past Tq, and groups with no allowed key, get no mass. Query blocks are processed in
    chunks whose score tile holds at most ``max_elements`` values. The logits and their softmax are
    computed in ``dtype`` (default :func:`~sparse_llm.backends.selection.scoring_dtype`), the block
    sums in fp32.
    """
    dtype = scoring_dtype(q) if dtype is None else dtype
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    g, s, per = hq // hkv, stride, block_size // stride
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    real = real_keys(call.key_padding_mask, b, kv_len, q.device).bool()
    real = F.pad(real, (0, n_k * block_size - kv_len))
    kr = F.pad(k, (0, 0, 0, n_k * block_size - kv_len)) if kv_len % block_size else k
    if call.key_padding_mask is not None:
        kr = kr * real[:, None, :, None].to(k.dtype)
    # The antidiagonal sum of tile (i, j) is q[iS + t] . k[jS + S - 1 - t] summed over t: the keys of a
    # group are reversed (the flip is the one copy of K, which then takes the mean antidiagonal logit's
    # scale in place: K is G times smaller than Q). One copy of the queries, in dtype, rows (group,
    # head), so each chunk of query groups is a contiguous [rows * G, S * D] slice for the GEMM.
    kr = kr.reshape(b, hkv, n_k * per, s, d).flip(3).mul_(call.scale / s)
    kr = kr.to(dtype).reshape(b, hkv, n_k * per, s * d)
    qr = F.pad(q, (0, 0, 0, n_q * block_size - q_len)) if q_len % block_size else q
    qr = qr.unflatten(1, (hkv, g)).unflatten(3, (n_q * per, s)).permute(0, 1, 3, 2, 4, 5)
    qr = torch.empty(qr.shape, dtype=dtype, device=q.device).copy_(qr).view(b, hkv, n_q * per, g, s * d)
    group_real = real.view(b, n_k * per, s).any(-1)  # [B, nK * per]
    rows_all = torch.arange(n_q * per, device=q.device)
    last_q = (rows_all * s + s - 1).clamp(max=q_len - 1) + kv_len - q_len  # absolute position
    first_k = torch.arange(n_k * per, device=q.device) * s
    out = torch.zeros(b, hkv, g, n_q, n_k, device=q.device)
    # Query blocks per chunk: bounded by max_elements, and ~8 chunks so that each chunk scores only
    # the keys it can see (the causal upper triangle then costs ~1/16 of the square, not 1/2).
    step = max(1, min(max_elements // (b * hq * per * per * n_k), -(-n_q // CAUSAL_CHUNKS)))
    for n0 in range(0, n_q, step):
        n1 = min(n0 + step, n_q)
        m1 = min(n_k, (min(n1 * block_size, q_len) - 1 + kv_len - q_len) // block_size + 1)
        rows, cols = slice(n0 * per, n1 * per), m1 * per  # key blocks past m1 are all in the future
        logits = logits_nt(qr[:, :, rows].flatten(2, 3), kr[:, :, :cols])  # [B, Hkv, rows * G, cols]
        logits = logits.view(b, hkv, -1, g, cols)
        if call.softcap is not None:
            logits = call.softcap * torch.tanh(logits / call.softcap)
        allowed = (first_k[:cols] <= last_q[rows, None]) & (rows_all[rows, None] * s < q_len)
        allowed = allowed & group_real[:, None, :cols]  # [B, rows, cols]
        probs = logits.masked_fill(~allowed[:, None, :, None], float("-inf")).softmax(-1).nan_to_num_(0.0)
        # [B, Hkv, n, G, m1]
        sums = probs.view(b, hkv, n1 - n0, per, g, m1, per).sum((3, 6), dtype=torch.float32)
        out[..., n0:n1, :m1] = sums.transpose(2, 3)
    return out.view(b, hq, n_q, n_k)


@register_method
@dataclass
class XAttention(BudgetedMethod):
    """Args: threshold (share of each query block's estimated attention mass to keep, in (0, 1];
    default 0.9; 1.0 keeps every reachable block up to the budget), stride (S, tokens per antidiagonal;
    a power of two dividing block_size; default 8), budget (hard cap in tokens per query block, sinks
    and window included; default 2048), sink_tokens (64), local_tokens (512), dense_tail_blocks (0).
    Scores and masks are per query head."""

    name = "xattention"
    description = "XAttention: antidiagonal-scored blocks per query head up to a cumulative-mass threshold."
    exact_params = {**BudgetedMethod.exact_params, "threshold": 1.0}

    threshold: float = 0.9
    stride: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"threshold must be a number in (0, 1], got {t!r}")
        s = self.stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s & (s - 1) or self.block_size % s:
            raise ValueError(
                f"stride must be a power of two dividing block_size ({self.block_size}), got {s!r}"
            )

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (q_len, kv_len), bs = (q.shape[2], k.shape[2]), self.block_size
        scores = antidiagonal_block_scores(q, k, call, bs, self.stride)  # [B, Hq, nQ, nK]
        n_k = scores.shape[-1]
        real = key_blocks_with_real_keys(call.key_padding_mask, kv_len, bs)
        valid = reachable_blocks(q_len, kv_len, bs, call.sliding_window, q.device)
        if real is not None:  # key blocks of padding only are never selected
            valid = valid & real[:, None, None, :]
        forced = self.forced_blocks(q, k, call) & valid
        candidate = valid & ~forced
        # Scores are >= 0, so -1 sorts non-candidates last; the stable sort puts ties in index order.
        ranked = torch.sort(scores.masked_fill(~candidate, -1.0), dim=-1, descending=True, stable=True)
        mass = ranked.values.clamp_min(0.0)
        before = (scores * forced).sum(-1, keepdim=True) + mass.cumsum(-1) - mass
        rank = torch.arange(n_k, device=q.device)
        keep = (ranked.values >= 0) & (rank < self.budget_blocks - forced.sum(-1, keepdim=True))
        if self.threshold < 1:  # 1.0 keeps every candidate, whatever the rounding of the sums
            keep &= before < self.threshold * (scores * valid).sum(-1, keepdim=True)
        selected = torch.zeros_like(keep).scatter_(-1, ranked.indices, keep) | forced
        return self.mask_from_blocks(selected, q, k, call)
