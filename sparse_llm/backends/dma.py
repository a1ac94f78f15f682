"""``dma``: dynamic mask attention, training-free.

Dynamic Mask Attention (flash-dmattn, Shi et al., arXiv 2508.02124) keeps, per attention head, the
keys that a learned value-derived bias scores highest, and applies that one key mask to every query
(with causality on top). Without trained weights we score keys from content instead:

* ``score="value_norm"``: ``||v_j||`` (times ``||k_j||`` with ``key_norm=True``): the size of what a
  key can contribute to the output.
* ``score="observation"``: the attention that the last ``window`` queries pay to each key, averaged
  over those queries and the heads of the GQA group (SnapKV's observation window, arXiv 2404.14469).

Token scores are max-pooled to kernel blocks, giving ONE block-score vector per KV head (DMA's
shared, query-independent key ranking). Each query block ranks the blocks it can causally see by that
vector and keeps the sink and local blocks plus the best visible ones, ``budget`` tokens in all
(:meth:`BudgetedMethod.mask_from_scores`): every query block that sees at least ``budget`` tokens
spends its whole budget, early ones included (they are not left with the part of a global set that
lies in their past). Padding keys score -inf and are never selected.

The shared ranking is also the method's limit. It finds needles (one key set suits every query), but
on long-range language modeling (8K tokens of code, budget 1024) it reads 2.19x dense's perplexity,
and even the shared ranking taken from the true attention (an oracle) 1.93x, against 1.03x for a
ranking per query block at the same density (``scripts/shared_mask_oracle.py``; docs/evaluations.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method, require_positive
from sparse_llm.kernels import BlockMask

SCORES = ("value_norm", "observation")


@register_method
@dataclass
class DMA(BudgetedMethod):
    """Args: budget (tokens per query block incl. sinks and window, default 2048), score
    (``"value_norm"`` default, or ``"observation"``), key_norm (value_norm only: multiply by ||k||),
    window (observation queries, default 64), sink_tokens (64), local_tokens (512)."""

    name = "dma"
    description = "Dynamic mask attention (training-free): key blocks ranked by a content score per KV head."

    score: str = "value_norm"
    key_norm: bool = False
    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(window=self.window)
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")

    def key_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Importance of each key, ``[B, Hkv, Tk]`` fp32 (padding keys get -inf)."""
        if self.score == "value_norm":
            scores = v.float().norm(dim=-1)
            if self.key_norm:
                scores = scores * k.float().norm(dim=-1)
        else:
            scores = observation_scores(q, k, call, self.window)
        if call.key_padding_mask is not None:
            scores = scores.masked_fill(~call.key_padding_mask[:, None, :], float("-inf"))
        return scores

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (b, hkv, kv_len, _), bs = k.shape, self.block_size
        n_k, n_q = -(-kv_len // bs), -(-q.shape[2] // bs)
        token = self.key_scores(q, k, v, call)
        blocks = F.pad(token, (0, n_k * bs - kv_len), value=float("-inf")).view(b, hkv, n_k, bs).amax(-1)
        return self.mask_from_scores(blocks[:, :, None, :].expand(b, hkv, n_q, n_k), q, k, call)


def observation_scores(q: torch.Tensor, k: torch.Tensor, call: LayerCall, window: int) -> torch.Tensor:
    """Mean attention of the last ``window`` queries over all keys, ``[B, Hkv, Tk]`` fp32.

    The group's query heads are stacked onto their KV head (no K/V repetition); causality inside the
    observation window is respected.
    """
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    w = min(window, q_len)
    obs = q[:, :, -w:].float().reshape(b, hkv, (hq // hkv) * w, d)
    logits = (obs @ k.float().transpose(-1, -2)) * call.scale  # [B, Hkv, G * w, Tk]
    if call.softcap is not None:
        logits = torch.tanh(logits / call.softcap) * call.softcap
    pos_q = (kv_len - w + torch.arange(w, device=q.device)).repeat(hq // hkv)
    future = torch.arange(kv_len, device=q.device)[None, :] > pos_q[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    if call.key_padding_mask is not None:
        logits = logits.masked_fill(~call.key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1).nan_to_num_(0.0).mean(2)
