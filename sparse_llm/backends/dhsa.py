"""``dhsa``: dynamic hierarchical sparse attention, training-free (arXiv 2510.24606).

DHSA splits the keys into chunks, scores chunks against each query block from chunk-level
representations, and keeps the best chunks up to a token budget. The paper learns its chunk-boundary
predictor; here boundaries are found without training:

1. Chunking. ``chunking="fixed"`` (default) cuts every ``chunk_size`` tokens from the row's first
   real key. ``chunking="dynamic"`` puts a boundary where the keys change direction, i.e. where the
   cosine similarity of adjacent keys (averaged over KV heads) drops: drops are peak-picked with
   non-maximum suppression over ``min_chunk`` tokens (chunks are at least ``min_chunk`` long; equal
   drops go to the earlier position, by exact comparison, :func:`pick_peaks`), the
   ``n / chunk_size`` strongest peaks become boundaries (n: the row's real keys), and chunks longer
   than ``max_chunk`` are cut every ``max_chunk`` tokens. Left padding is its own chunk(s) and never
   selected: a padded row is chunked as its unpadded run.
2. Chunk scores, per query head (the heads of a GQA group are never averaged; the mask has one row
   per query head). ``score="mass"`` (default): the log of the attention mass the query block's mean
   query would put on the chunk if its ``n`` keys all equalled their mean,
   ``softcap(scale * q_mean . k_mean) + log n`` (a chunk of similar keys weighs more than one stray
   key, as the paper's length normalization intends, in the units of attention logits).
   ``score="similarity"`` is the paper's form: ``(q_mean sqrt(block_size)) . (k_mean sqrt(n))`` with the
   query block averaged over its GQA group, one mask row per KV head. Measured on Gemma3-270M at 8K
   (docs/evaluations.md), "similarity" loses most of what a budget of context/8 can keep (perplexity
   of the second half of a code text 1.95x dense, barely better than a sliding window) while "mass"
   stays within 6-7 % of dense; fixed chunks measured better than dynamic ones under both scores.
3. Chunk to kernel blocks: a kernel block takes the maximum score over the chunks overlapping it
   (a block is kept if any chunk inside it is among the best). Blocks are then ranked per query block.
4. Budget: each query block attends ``budget`` tokens in blocks, always including the first
   ``sink_tokens`` and the ``local_tokens`` most recent tokens; the last ``dense_tail_blocks`` query
   blocks (the instruction at the end of a prompt) attend densely. Decode is dense by default.

Scoring costs ``Hq * (Tq / block_size) * (Tk / chunk_size) * D`` multiply-adds: 1/(64 * 32) of the
dense ``q k^T`` at the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method, require_positive
from sparse_llm.backends.selection import (
    block_means,
    check_heads,
    first_real_key,
    group_scores,
    real_keys,
)
from sparse_llm.kernels import BlockMask

CHUNKINGS = ("dynamic", "fixed")
SCORES = ("mass", "similarity")


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
    for NIAH and 2048 for LongBench), chunking ("fixed" or "dynamic"), chunk_size (fixed/average
    chunk length, default 32), min_chunk (16), max_chunk (256), score ("mass" or the paper's
    "similarity"), heads (``"query"``: each query head its own blocks, the default; ``"group"``: one
    block set per KV group, each block scored by the largest share of its row's estimated mass any
    of the group's heads gives it; "similarity" is one set per KV head either way), sink_tokens (128),
    local_tokens (128), dense_tail_blocks (last query blocks attending densely, default 1)."""

    name = "dhsa"
    description = "Dynamic hierarchical sparse attention: key chunks ranked per query head by estimated mass."

    sink_tokens: int = 128  # the paper always keeps the first and the most recent 128 tokens
    local_tokens: int = 128
    chunking: str = "fixed"
    chunk_size: int = 32
    min_chunk: int = 16
    max_chunk: int = 256
    dense_tail_blocks: int = 1
    score: str = "mass"
    heads: str = "query"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        check_heads(self.heads)
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
        starts = chunk_boundaries(
            k,
            chunking=self.chunking,
            chunk_size=self.chunk_size,
            min_chunk=self.min_chunk,
            max_chunk=self.max_chunk,
            kv_start=first_real_key(call.key_padding_mask),
        )
        score = chunk_mass_scores if self.score == "mass" else chunk_similarity_scores
        scores = score(q, k, starts, call, self.block_size)
        if self.heads == "group":
            # mass scores are unnormalized log masses: as log shares of their row they compare across heads
            lse = scores.logsumexp(-1, keepdim=True)
            scores = group_scores(scores - torch.where(torch.isfinite(lse), lse, 0.0), k.shape[1])
        return self.mask_from_scores(scores, q, k, call)


def _chunk_sums(k: torch.Tensor, starts: torch.Tensor, call: LayerCall):
    """(chunk id ``[B, Tk]``, key sums ``[B, Hkv, nC, D]`` fp32, real-key counts ``[B, nC]``)."""
    b, hkv, kv_len, d = k.shape
    chunk_id = starts.long().cumsum(-1) - 1
    n_c = int(chunk_id.max()) + 1
    valid = real_keys(call.key_padding_mask, b, kv_len, k.device).float()
    index = chunk_id[:, None, :, None].expand(b, hkv, kv_len, d)
    sums = torch.zeros(b, hkv, n_c, d, device=k.device)
    sums.scatter_add_(2, index, k.float() * valid[:, None, :, None])
    counts = torch.zeros(b, n_c, device=k.device).scatter_add_(1, chunk_id, valid)
    return chunk_id, sums, counts


def chunk_mass_scores(q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, call: LayerCall, block: int):
    """Block scores ``[B, Hq, nQ, nK]`` fp32 of ``score="mass"`` (module docstring): per query head, the
    log attention mass of each chunk taken as ``n`` copies of its mean key,
    ``softcap(scale * q_mean . k_mean) + log n``, and per key block the best chunk overlapping it.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, ``starts`` bool ``[B, Tk]`` (:func:`chunk_boundaries`).
    """
    (b, hq, q_len, d), (hkv, kv_len) = q.shape, k.shape[1:3]
    chunk_id, sums, counts = _chunk_sums(k, starts, call)
    valid_q = None if call.key_padding_mask is None else call.key_padding_mask[:, -q_len:]
    q_mean = block_means(q, block, valid_q)  # [B, Hq, nQ, D]
    k_mean = sums / counts.clamp_min(1)[:, None, :, None]
    logits = (q_mean.view(b, hkv, -1, d) * call.scale) @ k_mean.transpose(-1, -2)  # [B, Hkv, G * nQ, nC]
    if call.softcap is not None:
        logits = torch.tanh(logits / call.softcap) * call.softcap
    scores = logits.view(b, hq, -1, counts.shape[1]) + counts.log()[:, None, None, :]  # log 0: no real key
    return _chunk_to_block_max(scores, chunk_id, kv_len, block)


def chunk_similarity_scores(
    q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, call: LayerCall, block: int
) -> torch.Tensor:
    """Block scores ``[B, Hkv, nQ, nK]`` fp32 of ``score="similarity"`` (the paper's): the group-mean
    query block times sqrt(its length) dotted with the chunk's mean key times sqrt(its length)."""
    (b, hq, _, d), (hkv, kv_len) = q.shape, k.shape[1:3]
    chunk_id, sums, counts = _chunk_sums(k, starts, call)
    c_rep = sums / counts.clamp_min(1).sqrt()[:, None, :, None]  # sum / sqrt(n) = mean * sqrt(n)
    q_rep = block_means(q, block).view(b, hkv, hq // hkv, -1, d).mean(2) * math.sqrt(block)
    scores = (q_rep @ c_rep.transpose(-1, -2)).masked_fill(counts[:, None, None, :] == 0, float("-inf"))
    return _chunk_to_block_max(scores, chunk_id, kv_len, block)


def _chunk_to_block_max(scores: torch.Tensor, chunk_id: torch.Tensor, kv_len: int, bs: int) -> torch.Tensor:
    """Max over the chunks overlapping each kernel block: ``[B, H, nQ, nC]`` -> ``[B, H, nQ, nK]``."""
    b, n_c, dev = scores.shape[0], scores.shape[-1], scores.device
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
