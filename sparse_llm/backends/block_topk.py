"""``block_topk``: an oracle-free top-k block baseline.

Per KV head, queries and keys are mean-pooled per block (the queries of a GQA group pooled
together); each query block keeps the key blocks with the highest pooled ``q . k`` plus the sink
and local blocks, ``budget`` tokens in all. The same block-mean estimate underlies the block
selection of MInference's vertical-slash and FlexPrefill's pooled scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method
from sparse_llm.backends.selection import block_means
from sparse_llm.kernels import BlockMask


@register_method
@dataclass
class BlockTopK(BudgetedMethod):
    """Args: budget (tokens per query block, sinks and local window included; default 2048),
    sink_tokens (default 64), local_tokens (default 512)."""

    name = "block_topk"
    description = "Top-k key blocks by mean-pooled q.k per query block, plus sink and local blocks."

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
        bs = self.block_size
        q_means = block_means(q, bs).view(b, hkv, hq // hkv, -1, d).mean(2)  # [B, Hkv, nQ, D]
        k_means = block_means(k, bs, call.key_padding_mask)  # [B, Hkv, nK, D]
        scores = q_means @ k_means.transpose(-1, -2)
        forced = self.forced_blocks(q, k, call)
        # Forced blocks rank first and count towards the budget.
        return BlockMask.from_topk(
            scores.masked_fill(forced, float("inf")),
            self.budget_blocks,
            block_q=bs,
            block_k=bs,
            q_len=q_len,
            kv_len=kv_len,
            sliding_window=call.sliding_window,
        )
