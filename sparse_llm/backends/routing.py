"""``routing``: content-based routing by clustering, training-free.

The Routing Transformer (Roy et al., TACL 2021, arXiv 2003.05997) routes queries and keys to learned
k-means centroids and attends within clusters. Training-free, at prefill: spherical k-means on the
normalized keys of each KV head (about sqrt(Tk) centroids, a few Lloyd iterations, a fixed seed,
batched over batch and heads). Each query block is routed to the ``top_clusters`` centroids closest
to its mean query; it attends the key blocks holding keys of those clusters, the blocks with the most
such keys first, up to ``budget`` tokens with the sink and local blocks included. Causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method, require_positive
from sparse_llm.backends.selection import block_means
from sparse_llm.kernels import BlockMask


def spherical_kmeans(
    x: torch.Tensor, n_clusters: int, iterations: int, seed: int = 0, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means over the rows of ``x`` ``[N, T, D]``, batched over N.

    ``valid`` ``[N, T]`` bool excludes rows (padding) from the centroids. Centroids start at a seeded
    random choice of rows, the same positions for every batch entry; a cluster that loses all its
    members keeps its previous centroid. Returns (centroids ``[N, C, D]`` unit-norm fp32,
    assignment ``[N, T]`` int64).
    """
    n, t, _ = x.shape
    xn = F.normalize(x.float(), dim=-1)
    weight = torch.ones(n, t, device=x.device) if valid is None else valid.float()
    gen = torch.Generator().manual_seed(seed)
    start = torch.randperm(t, generator=gen)[: min(n_clusters, t)].sort().values.to(x.device)
    centroids = xn[:, start]
    for _ in range(iterations):
        assign = (xn @ centroids.transpose(1, 2)).argmax(-1)
        members = F.one_hot(assign, centroids.shape[1]).float() * weight[..., None]  # [N, T, C]
        sums = members.transpose(1, 2) @ xn
        empty = members.sum(1)[..., None] == 0
        centroids = torch.where(empty, centroids, F.normalize(sums, dim=-1))
    return centroids, (xn @ centroids.transpose(1, 2)).argmax(-1)


@register_method
@dataclass
class Routing(BudgetedMethod):
    """Args: budget (tokens per query block incl. sinks and window, default 2048), n_clusters
    (default: round(sqrt(Tk))), top_clusters (clusters per query block; default: enough to fill the
    budget, ceil(n_clusters * budget / Tk)), iterations (k-means steps, default 4), seed (0),
    sink_tokens (64), local_tokens (512)."""

    name = "routing"
    description = (
        "Spherical k-means on keys per KV head; query blocks attend the blocks of their top clusters."
    )

    n_clusters: int | None = None
    top_clusters: int | None = None
    iterations: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(iterations=self.iterations)
        for name in ("n_clusters", "top_clusters"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None (automatic) or an int >= 1, got {value!r}")

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
        bs = self.block_size
        n_c = self.n_clusters or max(1, round(math.sqrt(kv_len)))
        top_c = min(self.top_clusters or math.ceil(n_c * self.budget / kv_len), n_c)
        valid = None if call.key_padding_mask is None else call.key_padding_mask.repeat_interleave(hkv, 0)
        centroids, assign = spherical_kmeans(k.flatten(0, 1), n_c, self.iterations, self.seed, valid)
        if valid is not None:
            assign = assign.masked_fill(~valid, n_c)  # padding keys join no cluster
        n_k = -(-kv_len // bs)
        members = F.one_hot(F.pad(assign, (0, n_k * bs - kv_len), value=n_c), n_c + 1)[..., :n_c]
        counts = members.view(b * hkv, n_k, bs, n_c).sum(2).float()  # keys of each cluster per block
        q_means = F.normalize(block_means(q, bs).view(b, hkv, hq // hkv, -1, d).mean(2), dim=-1)
        routed = (q_means.flatten(0, 1) @ centroids.transpose(1, 2)).topk(top_c, dim=-1).indices
        chosen = torch.zeros(b * hkv, routed.shape[1], n_c, device=q.device).scatter_(-1, routed, 1.0)
        scores = (chosen @ counts.transpose(1, 2)).view(b, hkv, -1, n_k)  # routed keys per block
        forced = self.forced_blocks(q, k, call)
        ranked = BlockMask.from_topk(
            scores.masked_fill(forced, float("inf")), self.budget_blocks, block_q=bs, block_k=bs,
            q_len=q_len, kv_len=kv_len, sliding_window=call.sliding_window,
        )  # fmt: skip
        # A block without routed keys is never taken just to fill the budget.
        return BlockMask.from_dense(
            ranked.to_dense() & ((scores > 0) | forced), block_q=bs, block_k=bs, q_len=q_len, kv_len=kv_len,
            sliding_window=call.sliding_window,
        )  # fmt: skip
