"""``streaming``: attention sinks plus a local window (StreamingLLM, Xiao et al., arXiv 2309.17453).

Each query block attends the first ``sink_tokens`` real tokens and the ``local_tokens`` tokens
ending at its last query, rounded up to whole blocks. Training-free; exact inside the kept blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.backends.base import WHOLE_PROMPT, LayerCall, SparseMethod, register_method, require_positive
from sparse_llm.backends.selection import first_real_key
from sparse_llm.kernels import BlockMask


@register_method
@dataclass
class Streaming(SparseMethod):
    """Args: sink_tokens (first tokens always kept, default 128),
    local_tokens (recent window, default 1024)."""

    name = "streaming"
    description = "StreamingLLM baseline: sink tokens + a local window of recent tokens."
    exact_params = {"local_tokens": WHOLE_PROMPT}
    small_params = {"block_size": 16, "sink_tokens": 16, "local_tokens": 32}
    bench_params = {"sink_tokens": 128, "local_tokens": 1024}

    sink_tokens: int = 128
    local_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(sink_tokens=self.sink_tokens, local_tokens=self.local_tokens)

    @classmethod
    def params_for_budget(cls, budget: int, params: dict) -> dict:
        """The window that spends ``budget`` tokens per query block with the sinks (for budget sweeps)."""
        return {**params, "local_tokens": budget - params.get("sink_tokens", cls.sink_tokens)}

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        return sink_window_mask(q, k, call, self.block_size, self.sink_tokens, self.local_tokens)


def sink_window_mask(
    q: torch.Tensor, k: torch.Tensor, call: LayerCall, block: int, sink_tokens: int, local_tokens: int
) -> BlockMask:
    """The first ``sink_tokens`` real keys and the ``local_tokens`` most recent ones of every query, as
    blocks of ``block`` (the exact part of ``streaming``, ``lightning`` and ``deltallm``)."""
    return BlockMask.sink_window(
        q_len=q.shape[2],
        kv_len=k.shape[2],
        block_q=block,
        block_k=block,
        sink_tokens=sink_tokens,
        local_tokens=local_tokens,
        device=q.device,
        sliding_window=call.sliding_window,
        kv_start=first_real_key(call.key_padding_mask),
    )
