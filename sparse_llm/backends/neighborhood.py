"""``neighborhood``: causal 1-D neighborhood attention with a stride and an optional halo.

After Generalized Neighborhood Attention (GNA, Hassani et al. 2025, arXiv 2504.16922, the NATTEN
project), which treats sliding-window, strided sliding-window and blocked attention as one family,
and HaloNet (Vaswani et al. 2021, arXiv 2103.12731) for the halo. Positions count from each row's
first real token (so left padding changes nothing). Queries fall into groups of ``stride``
consecutive positions; a group shares one window, the ``window`` keys ending at the group's last
query (plus ``halo`` keys before them), and each query sees that window up to itself (causal). The
first ``sink_tokens`` real tokens are always kept. So:

- ``stride=1``: the plain sliding window, keys ``[p - window + 1, p]`` (``halo`` must be 0);
- ``1 < stride < window``: the strided window, moving ``stride`` tokens at a time;
- ``stride == window``: blocked attention, each block of ``window`` queries attending its own
  block (causally) plus ``halo`` keys before it.

Static and training-free; exact inside the pattern, which is kept to the token: a key block the
pattern cuts through is a partial block, computed with the element mask (the BlockMask's key rule).
When ``window``, ``stride``, ``halo`` and ``sink_tokens`` are multiples of ``block_size`` (and the
padding is too), every selected block off the causal diagonal is full: GNA's perfectly block-sparse
case, where the kernel does no masking work beyond what dense causal attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import WHOLE_PROMPT, LayerCall, SparseMethod, register_method, require_positive
from sparse_llm.backends.selection import first_real_key
from sparse_llm.kernels import BlockMask


@register_method
@dataclass
class Neighborhood(SparseMethod):
    """Args (tokens): window (keys of a group's last query, default 1024), stride (queries sharing
    one window, 1 <= stride <= window, default 1), halo (extra keys before each block, blocked mode
    ``stride == window`` only, default 0), sink_tokens (first real tokens always kept, >= 0, default 64)."""

    name = "neighborhood"
    description = "GNA-style causal neighborhood: sliding, strided or blocked (+halo) window and sinks."
    exact_params = {"window": WHOLE_PROMPT}
    small_params = {"block_size": 16, "window": 40, "stride": 8, "sink_tokens": 4}
    bench_params = {"window": 1024, "stride": 64, "sink_tokens": 64}

    window: int = 1024
    stride: int = 1
    halo: int = 0
    sink_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(window=self.window, stride=self.stride)
        for key in ("halo", "sink_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must be <= window ({self.window})")
        if self.halo and self.stride != self.window:
            raise ValueError(
                f"halo ({self.halo}) needs blocked mode (stride == window, got {self.stride} != "
                f"{self.window}); for a wider sliding or strided window raise window instead"
            )

    def key_rule(self, q_len: int, kv_len: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(window_start int32 [B', Tq], sink_end int32 [B']) of the queries, the last ``q_len`` of
        ``kv_len`` positions, for rows whose first real key is ``start`` (long [B'])."""
        pos = torch.arange(kv_len - q_len, kv_len, device=start.device)
        rel = pos[None, :] - start[:, None]  # position in the row's own text (< 0 in its padding)
        group_end = torch.div(rel, self.stride, rounding_mode="floor") * self.stride + self.stride - 1
        window_start = start[:, None] + group_end - self.window - self.halo + 1
        return window_start.to(torch.int32), (start + self.sink_tokens).to(torch.int32)

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        q_len, kv_len, bs = q.shape[2], k.shape[2], self.block_size
        n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
        start = first_real_key(call.key_padding_mask)
        start = torch.zeros(1, dtype=torch.long, device=q.device) if start is None else start.to(q.device)
        window_start, sink_end = self.key_rule(q_len, kv_len, start)
        # Per query block: the keys its queries attend form one run, from the lowest window start (never
        # in the padding) to the block's last query, plus the sinks. Key blocks holding any of them:
        lo = torch.maximum(window_start.long(), start[:, None])
        lo = F.pad(lo, (0, n_q * bs - q_len), value=kv_len).view(-1, n_q, bs).amin(-1)[..., None]
        last = (torch.arange(1, n_q + 1, device=q.device) * bs).clamp(max=q_len) - 1 + kv_len - q_len
        k_lo = torch.arange(n_k, device=q.device) * bs
        k_hi = (k_lo + bs).clamp(max=kv_len)  # one past the block's last key
        window = (k_hi > lo) & (torch.maximum(k_lo, lo) <= last[:, None])  # [B', nQ, nK]
        first_sink = torch.maximum(k_lo, start[:, None])  # [B', nK]
        sinks = (first_sink < torch.minimum(k_hi, sink_end[:, None].long()))[:, None] & (
            first_sink[:, None] <= last[:, None]
        )
        return BlockMask.from_dense(
            (window | sinks)[:, None],
            block_q=bs,
            block_k=bs,
            q_len=q_len,
            kv_len=kv_len,
            sliding_window=call.sliding_window,
            window_start=window_start,
            sink_end=sink_end,
        )
