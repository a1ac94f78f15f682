"""``dma``: dynamic mask attention, training-free.

Dynamic Mask Attention (flash-dmattn, Shi et al., arXiv 2508.02124) keeps, per attention head, the
keys that a learned value-derived bias scores highest, and applies that one key mask to every query
(with causality on top). Without trained weights we score keys from content instead:

* ``score="value_norm"``: ``||v_j||`` (times ``||k_j||`` with ``key_norm=True``): the size of what a
  key can contribute to the output.
* ``score="observation"``: the attention that the last ``window`` queries pay to each key, averaged
  over those queries and the heads of the GQA group (SnapKV's observation window, arXiv 2404.14469).

Token scores are max-pooled to kernel blocks. Per KV head the best blocks form ONE key set shared by
every query block; each query block attends that set's causally visible blocks plus the sink and
local blocks. ``budget`` bounds the tokens a query block attends (sink and local included): the set
holds ``ceil(budget / block_size)`` blocks minus the sink and local ones, so late query blocks attend
about ``budget`` tokens and early ones fewer (they cannot see the set's later blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    description = "Dynamic mask attention (training-free): one content-scored key-block set per KV head."

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
        (b, hkv, kv_len, _), q_len, bs = k.shape, q.shape[2], self.block_size
        n_k = -(-kv_len // bs)
        token = self.key_scores(q, k, v, call)
        pad = n_k * bs - kv_len
        blocks = torch.nn.functional.pad(token, (0, pad), value=float("-inf")).view(b, hkv, n_k, bs).amax(-1)
        forced = self.forced_blocks(q, k, call)
        # The last query block sees every key: its forced blocks are not spent from the set.
        last_forced = forced[:, :, -1, :]
        n_set = max(self.budget_blocks - int(last_forced.sum(-1).max()), 0)
        chosen = torch.zeros(b, hkv, n_k, dtype=torch.bool, device=q.device)
        top = blocks.masked_fill(last_forced, float("-inf")).topk(min(n_set, n_k), dim=-1)
        chosen.scatter_(-1, top.indices, torch.isfinite(top.values))
        return BlockMask.from_dense(
            forced | chosen[:, :, None, :], block_q=bs, block_k=bs, q_len=q_len, kv_len=kv_len,
            sliding_window=call.sliding_window,
        )  # fmt: skip


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
