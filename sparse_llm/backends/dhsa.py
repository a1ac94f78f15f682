"""``dhsa``: dynamic hierarchical sparse attention, training-free (arXiv 2510.24606).

DHSA splits the keys into variable-length chunks, scores chunks against each query block with
length-normalized representations, and keeps the best chunks up to a token budget. The paper learns
its chunk-boundary predictor; here boundaries are found without training:

1. Chunking (``chunking="dynamic"``): a boundary where the keys change direction, i.e. where the
   cosine similarity of adjacent keys (averaged over KV heads) drops. Drops are peak-picked with
   non-maximum suppression over ``min_chunk`` tokens (so chunks are at least ``min_chunk`` long; equal
   drops go to the earlier position, by exact comparison, :func:`pick_peaks`), the
   ``n / chunk_size`` strongest peaks become boundaries (n: the row's real keys), and chunks longer
   than ``max_chunk`` are cut every ``max_chunk`` tokens. ``chunking="fixed"`` cuts every
   ``chunk_size`` tokens from the row's first real key, for comparison. Left padding is its own
   chunk(s) and never selected: a padded row is chunked as its unpadded run.
2. Representations: a chunk is the mean of its keys times sqrt(its length) (the paper's length
   normalization: a long chunk of similar keys weighs more than one stray key); a query block is the
   mean of its queries (of the whole GQA group) times sqrt(its length).
3. Chunk to kernel blocks: chunk scores ``q_rep . c_rep`` are upsampled to the chunk's tokens and a
   kernel block takes the maximum over the tokens it holds, i.e. over the chunks overlapping it: a
   block is kept if any chunk inside it is among the best. Blocks are then ranked per query block.
4. Budget: each query block attends ``budget`` tokens in blocks, always including the first
   ``sink_tokens`` and the ``local_tokens`` most recent tokens; the last ``dense_tail_blocks`` query
   blocks (the instruction at the end of a prompt) attend densely. Decode is dense by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method, require_positive
from sparse_llm.backends.selection import block_means, first_real_key
from sparse_llm.kernels import BlockMask

CHUNKINGS = ("dynamic", "fixed")


def pick_peaks(
    drop: torch.Tensor, min_chunk: int, n_peaks: int | torch.Tensor, start: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``n_peaks`` strongest peaks of ``drop`` ``[B, T]`` as bool ``[B, T]``.

    A peak is a position at least ``min_chunk`` after the row's ``start`` (``[B]``, its first real
    key; default 0) whose drop beats every other within ``min_chunk - 1`` positions under the order
    (drop, then earlier position): strictly above the drops before it, at least the drops after it.
    Peaks are ranked by drop with a stable sort (equal drops: the earlier first). Both rules compare
    drops exactly, so the result does not depend on the absolute positions (equal drops at 100 and
    5000 are treated alike, a left-padded row finds its unpadded run's peaks, shifted) and distinct
    drops are never reordered. ``n_peaks`` is an int or a per-row ``[B]`` tensor.
    """
    b, t = drop.shape
    offset = torch.arange(t, device=drop.device).expand(b, t)
    if start is not None:
        offset = offset - start[:, None]
    r = min_chunk - 1
    if r:
        pad = drop.new_full((b, r), float("-inf"))
        before = F.max_pool1d(torch.cat([pad, drop[:, :-1]], 1)[:, None], r, stride=1)[:, 0]  # drop[t-r:t]
        after = F.max_pool1d(torch.cat([drop[:, 1:], pad], 1)[:, None], r, stride=1)[:, 0]  # drop[t+1:t+r+1]
        is_peak = (drop > before) & (drop >= after)
    else:
        is_peak = torch.ones_like(drop, dtype=torch.bool)
    ranked = drop.masked_fill(~(is_peak & (offset >= min_chunk)), float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    if isinstance(n_peaks, int):
        order = order[:, : min(n_peaks, t)]
    chosen = ranked.gather(-1, order) > float("-inf")
    if not isinstance(n_peaks, int):  # each row keeps its own number of strongest peaks
        chosen &= torch.arange(t, device=drop.device) < n_peaks[:, None]
    return torch.zeros(b, t, dtype=torch.bool, device=drop.device).scatter_(-1, order, chosen)


def chunk_boundaries(
    k: torch.Tensor,
    *,
    chunking: str,
    chunk_size: int,
    min_chunk: int,
    max_chunk: int,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunk starts of the keys ``k`` ``[B, Hkv, Tk, D]``: bool ``[B, Tk]`` (True = a chunk starts here).

    Position 0 and each row's first real key (``kv_start`` ``[B]``, left padding) always start a
    chunk; fixed chunks and the number of dynamic boundaries count from the first real key, so a
    left-padded row is chunked as its unpadded run (shifted), its padding as chunks of its own.
    """
    b, _, t, _ = k.shape
    pos = torch.arange(t, device=k.device)
    start = torch.zeros(b, dtype=torch.long, device=k.device) if kv_start is None else kv_start
    relative = pos - start[:, None]  # [B, Tk]
    if chunking == "fixed":
        starts = (relative % chunk_size == 0) & (relative >= 0)
    else:
        kn = F.normalize(k.float(), dim=-1)
        drop = torch.ones(b, t, device=k.device)  # drop[t]: 1 - cos(k[t], k[t-1]), averaged over heads
        drop[:, 1:] = 1 - (kn[:, :, 1:] * kn[:, :, :-1]).sum(-1).mean(1)
        n_peaks = ((t - start) // chunk_size - 1).clamp_min(0)  # from the row's real keys
        starts = pick_peaks(drop, min_chunk, n_peaks, start)
    starts[:, 0] = True
    starts[torch.arange(b, device=k.device), start] = True
    # Cut chunks longer than max_chunk every max_chunk tokens.
    first = torch.cummax(torch.where(starts, pos, 0), dim=-1).values
    return starts | ((pos - first) % max_chunk == 0)


@register_method
@dataclass
class DHSA(BudgetedMethod):
    """Args: budget (tokens per query block incl. sinks and window, default 2048; the paper uses 1024
    for NIAH and 2048 for LongBench), chunking ("dynamic" or "fixed"), chunk_size (average/fixed chunk
    length, default 64), min_chunk (16), max_chunk (256), sink_tokens (128), local_tokens (128),
    dense_tail_blocks (last query blocks attending densely, default 1)."""

    name = "dhsa"
    description = "Dynamic hierarchical sparse attention: similarity-based key chunks ranked per query block."

    sink_tokens: int = 128  # the paper always keeps the first and the most recent 128 tokens
    local_tokens: int = 128
    chunking: str = "dynamic"
    chunk_size: int = 64
    min_chunk: int = 16
    max_chunk: int = 256
    dense_tail_blocks: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(chunk_size=self.chunk_size, min_chunk=self.min_chunk, max_chunk=self.max_chunk)
        if self.chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {CHUNKINGS}, got {self.chunking!r}")
        if self.min_chunk > self.max_chunk:
            raise ValueError(f"min_chunk ({self.min_chunk}) must be <= max_chunk ({self.max_chunk})")
        if not self.min_chunk <= self.chunk_size <= self.max_chunk:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must lie in [min_chunk, max_chunk] = "
                f"[{self.min_chunk}, {self.max_chunk}]"
            )

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (b, hq, _, d), (_, hkv, kv_len, _) = q.shape, k.shape
        bs, dev = self.block_size, q.device
        kv_start = first_real_key(call.key_padding_mask)
        starts = chunk_boundaries(
            k,
            chunking=self.chunking,
            chunk_size=self.chunk_size,
            min_chunk=self.min_chunk,
            max_chunk=self.max_chunk,
            kv_start=kv_start,
        )
        chunk_id = starts.long().cumsum(-1) - 1  # [B, Tk]
        n_c = int(chunk_id.max()) + 1
        valid = (
            torch.ones(b, kv_len, device=dev)
            if call.key_padding_mask is None
            else call.key_padding_mask.float()
        )
        # Chunk representations: sum of keys / sqrt(length) = mean * sqrt(length).
        index = chunk_id[:, None, :, None].expand(b, hkv, kv_len, d)
        sums = torch.zeros(b, hkv, n_c, d, device=dev).scatter_add_(
            2, index, k.float() * valid[:, None, :, None]
        )
        counts = torch.zeros(b, n_c, device=dev).scatter_add_(1, chunk_id, valid)
        c_rep = sums / counts.clamp_min(1).sqrt()[:, None, :, None]
        q_rep = block_means(q, bs).view(b, hkv, hq // hkv, -1, d).mean(2) * math.sqrt(bs)
        scores = (q_rep @ c_rep.transpose(-1, -2)).masked_fill(counts[:, None, None, :] == 0, float("-inf"))
        block_scores = _chunk_to_block_max(scores, starts, chunk_id, n_c, bs, kv_len)
        return self.mask_from_scores(block_scores, q, k, call)


def _chunk_to_block_max(
    scores: torch.Tensor, starts: torch.Tensor, chunk_id: torch.Tensor, n_c: int, bs: int, kv_len: int
) -> torch.Tensor:
    """Max over the chunks overlapping each kernel block: ``[B, Hkv, nQ, nC]`` -> ``[B, Hkv, nQ, nK]``."""
    b, dev = scores.shape[0], scores.device
    n_k = -(-kv_len // bs)
    pos = torch.arange(kv_len, device=dev).expand(b, kv_len)
    first_tok = torch.full((b, n_c), kv_len - 1, dtype=torch.long, device=dev).scatter_reduce_(
        1, chunk_id, pos, "amin"
    )
    last_tok = torch.zeros(b, n_c, dtype=torch.long, device=dev).scatter_reduce_(1, chunk_id, pos, "amax")
    first_blk, last_blk = first_tok // bs, last_tok // bs
    span = int((last_blk - first_blk).max()) + 1
    blocks = torch.minimum(
        first_blk[..., None] + torch.arange(span, device=dev), last_blk[..., None]
    )  # [B, nC, S]
    index = blocks.flatten(1)[:, None, None, :].expand(*scores.shape[:3], -1)
    values = scores[..., None].expand(*scores.shape, span).flatten(-2)
    out = torch.full((*scores.shape[:3], n_k), float("-inf"), device=dev)
    return out.scatter_reduce_(-1, index, values, "amax")
