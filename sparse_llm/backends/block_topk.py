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
from sparse_llm.backends.selection import check_probes, probe_queries
from sparse_llm.kernels import BlockMask

MAX_SCORES = 2**25  # scores held at once while scoring (fp32 elements)


@register_method
@dataclass
class BlockTopK(BudgetedMethod):
    """Args: budget (tokens per query block, sinks and local window included; default 2048),
    probes (single queries per query block scored besides its mean query, default 4),
    sink_tokens (default 64), local_tokens (default 512)."""

    name = "block_topk"
    description = "Top-k key blocks per query head by the peak q.k of a few queries, plus sink and local."

    probes: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probes(self.probes, self.block_size)

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        return self.mask_from_scores(peak_block_scores(q, k, call, self.block_size, self.probes), q, k, call)


def peak_block_scores(q: torch.Tensor, k: torch.Tensor, call: LayerCall, block: int, probes: int):
    """Block scores ``[B, Hq, nQ, nK]`` fp32 (module docstring); -inf where no representative sees a key.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (GQA not expanded: queries are grouped onto their KV head).
    """
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    valid_q = None if call.key_padding_mask is None else call.key_padding_mask[:, -q_len:]
    reps, index = probe_queries(q, block, probes, valid_q)  # [B, Hq, nQ, R, D], [nQ, R]
    n_q, r = index.shape
    n_k = -(-kv_len // block)
    pos_q = index + (kv_len - q_len)  # absolute positions
    reps = (reps * call.scale).to(k.dtype)
    out = torch.full((b, hq, n_q, n_k), float("-inf"), device=q.device)
    step = max(1, MAX_SCORES // (b * hq * r * kv_len))
    for lo in range(0, n_q, step):
        hi = min(lo + step, n_q)
        n_seen = int(pos_q[hi - 1].max()) // block + 1  # key blocks any query of the chunk can see
        seen = min(n_seen * block, kv_len)
        chunk = reps[:, :, lo:hi].reshape(b, hkv, -1, d)  # [B, Hkv, G * n * R, D]
        s = (chunk @ k[:, :, :seen].transpose(-1, -2)).float().view(b, hq, hi - lo, r, seen)
        if call.softcap is not None:
            s = torch.tanh_(s / call.softcap).mul_(call.softcap)
        key = torch.arange(seen, device=q.device)
        hidden = key > pos_q[lo:hi, :, None]  # [n, R, seen]
        if call.sliding_window is not None:
            hidden |= key <= pos_q[lo:hi, :, None] - call.sliding_window
        if call.key_padding_mask is not None:
            hidden = hidden | ~call.key_padding_mask[:, None, None, None, :seen]
        s.masked_fill_(hidden, float("-inf"))
        lse = s.logsumexp(-1, keepdim=True)
        if seen < n_seen * block:  # ragged last key block
            s = torch.nn.functional.pad(s, (0, n_seen * block - seen), value=float("-inf"))
        peaks = s.view(*lse.shape[:-1], n_seen, block).amax(-1) - lse  # [B, Hq, n, R, n_seen]
        peaks.masked_fill_(peaks.isnan(), float("-inf"))  # a representative that sees no real key
        out[:, :, lo:hi, :n_seen] = peaks.amax(3)
    return out
