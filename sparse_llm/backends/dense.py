"""``dense``: our kernel at full causal density. Exact; the reference every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

from sparse_llm.backends.base import LayerCall, SparseMethod, register_method
from sparse_llm.kernels import BlockMask


@register_method
@dataclass
class Dense(SparseMethod):
    name = "dense"
    description = "Exact causal attention through the block-sparse kernel (full density; equals sdpa)."
    small_params = None  # the reference: never sparse

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        return BlockMask.causal(
            q_len=q.shape[2],
            kv_len=k.shape[2],
            block_q=self.block_size,
            block_k=self.block_size,
            device=q.device,
            sliding_window=call.sliding_window,
        )
