"""``block_topk``: an oracle-free top-k block baseline, scored per query head by peaks.

For each query head and query block, a few representative queries (the block's mean query and
``probes`` evenly spaced single queries ending at its last query, :func:`probe_queries`) are scored
against every key they can see (causal, window and padding masks applied, the layer's scale and
softcap). A key block's score is the log of the largest attention weight any representative puts on
one of its keys: ``max_r max_{j in block} (s_rj - logsumexp_j' s_rj')``. Max-pooling over keys keeps
a single matching token visible (a block mean would dilute it 64 times), and normalizing each
representative by its own log-sum-exp makes the mean query and the single queries comparable.
Heads are never averaged, so the mask has one row per query head (H = Hq): a needle that one head of
a GQA group looks for is not outvoted by the others.

Each query block keeps the sink and local blocks plus the highest-scoring visible blocks,
``budget`` tokens in all (:meth:`BudgetedMethod.mask_from_scores`). Scoring costs about
``(1 + probes) / block_size`` of the dense ``q k^T`` and holds at most ~2^25 scores at a time
(query blocks are processed in chunks, each against the keys it can see). The selection is
approximate; attention over the selected blocks is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method
from sparse_llm.backends.selection import (
    CAUSAL_CHUNKS,
    check_heads,
    check_probes,
    group_scores,
    logits_nt,
    probe_queries,
    scoring_dtype,
)
from sparse_llm.kernels import BlockMask

MAX_SCORES = 2**25  # scores held at once while scoring (elements)


@register_method
@dataclass
class BlockTopK(BudgetedMethod):
    """Args: budget (tokens per query block, sinks and local window included; default 2048),
    probes (single queries per query block scored besides its mean query, default 4), heads
    (``"query"``: each query head its own blocks, the default; ``"group"``: one block set per KV
    group, each block scored by the largest weight any of the group's heads puts on it), sink_tokens
    (default 64), local_tokens (default 512)."""

    name = "block_topk"
    description = "Top-k key blocks per query head by the peak q.k of a few queries, plus sink and local."

    probes: int = 4
    heads: str = "query"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probes(self.probes, self.block_size)
        check_heads(self.heads)

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        scores = peak_block_scores(q, k, call, self.block_size, self.probes)
        if self.heads == "group":
            scores = group_scores(scores, k.shape[1])
        return self.mask_from_scores(scores, q, k, call)


def peak_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    call: LayerCall,
    block: int,
    probes: int,
    dtype: torch.dtype | None = None,
):
    """Block scores ``[B, Hq, nQ, nK]`` fp32 (module docstring); -inf where no representative sees a key.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (GQA not expanded: queries are grouped onto their KV head).
    The logits and their per-block max and log-sum-exp are computed in ``dtype`` (default
    :func:`~sparse_llm.backends.selection.scoring_dtype`), the exponentials summed with fp32
    accumulation.
    """
    dtype = scoring_dtype(q) if dtype is None else dtype
    (b, hq, q_len, _), kv_len = q.shape, k.shape[2]
    valid_q = None if call.key_padding_mask is None else call.key_padding_mask[:, -q_len:]
    reps, index = probe_queries(q, block, probes, valid_q)  # [B, Hq, nQ, R, D], [nQ, R]
    n_q, r = index.shape
    n_k = -(-kv_len // block)
    pos_q = index + (kv_len - q_len)  # absolute positions
    reps, k = (reps * call.scale).to(dtype), k.to(dtype)
    out = torch.full((b, hq, n_q, n_k), float("-inf"), device=q.device)
    # Chunks of query blocks, each scored against the keys it can see only: with ~8 chunks the causal
    # upper triangle costs ~1/16 of the square instead of 1/2.
    step = max(1, min(MAX_SCORES // (b * hq * r * kv_len), -(-n_q // CAUSAL_CHUNKS)))
    for lo in range(0, n_q, step):
        hi = min(lo + step, n_q)
        peaks = _peaks(reps[:, :, lo:hi], k, pos_q[lo:hi], call, block)
        out[:, :, lo:hi, : peaks.shape[-1]] = peaks
    return out


def _peaks(reps: torch.Tensor, k: torch.Tensor, pos_q: torch.Tensor, call: LayerCall, block: int):
    """Block peaks ``[B, Hq, n, n_seen]`` of representatives ``reps`` ``[B, Hq, n, R, D]`` (pre-scaled)
    at absolute positions ``pos_q`` ``[n, R]``, over the key blocks any of them can see."""
    (b, hq, n, r, d), (hkv, kv_len) = reps.shape, k.shape[1:3]
    n_seen = int(pos_q.max()) // block + 1  # key blocks any representative can see
    seen = min(n_seen * block, kv_len)
    s = logits_nt(reps.reshape(b, hkv, -1, d), k[:, :, :seen]).view(b, hq, n, r, seen)
    if call.softcap is not None:
        s = torch.tanh_(s / call.softcap).mul_(call.softcap)
    # Keys before the chunk's first representative are causally visible to all; mask only the rest.
    first = 0 if call.sliding_window is not None else int(pos_q.min()) + 1
    key = torch.arange(first, seen, device=k.device)
    hidden = key > pos_q[:, :, None]  # [n, R, seen - first]
    if call.sliding_window is not None:
        hidden |= key <= pos_q[:, :, None] - call.sliding_window
    s[..., first:].masked_fill_(hidden, float("-inf"))
    if call.key_padding_mask is not None:
        s.masked_fill_(~call.key_padding_mask[:, None, None, None, :seen], float("-inf"))
    if seen < n_seen * block:  # ragged last key block
        s = torch.nn.functional.pad(s, (0, n_seen * block - seen), value=float("-inf"))
    s = s.view(b, hq, n, r, n_seen, block)
    peaks = s.amax(-1)  # [B, Hq, n, R, n_seen]
    # log-sum-exp in place (s is not needed afterwards): one pass of exp, no temporaries of s's size.
    # The shift is a value of s, so s - top is exact where it matters (near the top) in any dtype. The
    # sum accumulates in fp32 and rounds once to s's dtype: asking for an fp32 result instead made a
    # fp32 copy of s first (~1/8 of the selection at 8K in bf16); fp16 keeps an fp32 result (its range).
    top = peaks.amax(-1, keepdim=True)
    total = torch.float32 if s.dtype == torch.float16 else None
    lse = s.sub_(top[..., None]).exp_().flatten(-2).sum(-1, dtype=total).float().log_()[..., None]
    peaks = peaks.float() - top.float() - lse
    peaks.masked_fill_(peaks.isnan(), float("-inf"))  # a representative that sees no real key
    return peaks.amax(3)
