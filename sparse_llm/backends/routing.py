"""``routing``: content-based routing by clustering, training-free.

The Routing Transformer (Roy et al., TACL 2021, arXiv 2003.05997) routes queries and keys to shared
k-means centroids and attends within clusters. Training-free, at prefill:

1. Clusters: spherical k-means on the normalized real keys of each KV head (``n_clusters``
   centroids), farthest-point initialization so that an outlying key, e.g. a needle, gets a centroid
   of its own, then a few Lloyd iterations; batched over batch and heads; no one-hot tensors. Both
   depend on a row's real keys only: a left-padded row clusters as its unpadded run.
2. Cells (``summary="cell"``, default): queries are routed to the same centroids as keys (shared QK
   routing, as in the paper). A key cell is one cluster's keys inside one key block, a query cell one
   cluster's queries of one query head inside one query block; each is summarized by its mean and
   its size n. Per query cell, a key cell gets the log attention mass of n copies of its mean key,
   ``softcap(scale * q_mean . k_mean) + log n``; a key block gets the log-sum-exp of its cells as a
   share of everything the query block can see; a query block's score for a key block is the largest
   share over its query cells (a block that one group of queries needs is not outvoted by the rest).
   With ``top_clusters`` only the key cells of a query cell's top clusters (by its logit on each
   cluster's typical key, the centroid times its members' mean norm) carry mass: hard routing.
   Cost: about ``2 C^2 / block_size^2`` of the dense ``q k^T`` for C clusters, hence a fixed,
   small default C = 12 (cells of ~5 keys) rather than one growing with the length.
3. ``summary="cluster"`` (the first form, kept as a reference): each query block's representatives
   (its mean query and ``probes`` single queries ending at its last query) score whole clusters by
   their typical key, and a key block gets the routed mass of its keys, each weighted by its cosine
   to its centroid, ``sum_c exp(logit_c) * sum_{j in block, cluster(j) = c} cos(k_j, centroid_c)``,
   as a share of what the block can see, the maximum over representatives; about sqrt(n) clusters
   for n real keys. A cluster spans the whole prompt, so this cannot tell a query which of the
   blocks of a cluster it needs: on 8K code it loses 1.42x perplexity where cells lose 1.03-1.04x
   (docs/evaluations.md).
4. Each query block keeps the sink and local blocks plus the blocks of most routed mass, ``budget``
   tokens in all; equal scores go to the later (more recent) block. Padding keys and queries join no
   cell and padding keys are never selected. The selection is approximate; attention over the
   selected blocks is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method, require_positive
from sparse_llm.backends.selection import (
    CAUSAL_CHUNKS,
    check_heads,
    check_probes,
    group_rows,
    group_scores,
    key_blocks_with_real_keys,
    prefer_late_ties,
    probe_queries,
    reachable_blocks,
    real_keys,
    scoring_dtype,
)
from sparse_llm.kernels import BlockMask

MAX_SIMILARITIES = 2**25  # key-centroid (or query-cell) similarities held at once
SUMMARIES = ("cell", "cluster")
CELL_CLUSTERS = 12  # default centroids per KV head with cells (module docstring, step 2)


def spherical_kmeans(
    x: torch.Tensor,
    n_clusters: int | torch.Tensor,
    iterations: int,
    seed: int = 0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means over the rows of ``x`` ``[N, T, D]``, batched over N.

    ``valid`` ``[N, T]`` bool excludes rows (padding) from the centroids. ``n_clusters`` is an int or
    a per-entry ``[N]`` tensor; entry i gets min(n_clusters[i], its valid rows) clusters, at least 1.
    Initialization is farthest-point: the first centroid is the valid row of highest seeded random
    priority, the priorities counted from each entry's first valid row (so a left-padded entry picks
    what its unpadded run picks), each next one the valid row least similar to the centroids so far.
    A cluster that loses all its members keeps its previous centroid. Similarities are taken in
    :func:`~sparse_llm.backends.selection.scoring_dtype` (the picks then re-score their few nearest
    contenders in fp32: the same picks as exact arithmetic), the centroid sums in fp32. Memory is
    O(N T D + N C D)
    (similarities are taken in chunks; sums use ``index_add_``). Returns (centroids ``[N, C, D]``
    unit-norm fp32, assignment ``[N, T]`` int64), C the largest cluster count; an entry with fewer
    clusters has members in its first ones only.
    """
    n, t, d = x.shape
    xn = F.normalize(x.float(), dim=-1)
    xs = xn.to(scoring_dtype(xn))  # a bf16 GEMV over the keys is ~2x faster than fp32 on a bf16 CPU
    valid = torch.ones(n, t, dtype=torch.bool, device=x.device) if valid is None else valid
    c, active = active_clusters(n_clusters, valid)
    priority = torch.rand(t, generator=torch.Generator().manual_seed(seed)).to(x.device)
    first = valid.to(torch.int8).argmax(-1, keepdim=True)  # [N, 1]
    relative = (torch.arange(t, device=x.device) - first).clamp_min(0)  # [N, T]
    pick = torch.where(valid, priority[relative], -1.0).argmax(-1)  # [N]
    rows = torch.arange(n, device=x.device)
    centroids = torch.empty(n, c, d, device=x.device)
    closest = torch.full((n, t), -2.0, device=x.device)
    for i in range(c):
        centroids[:, i] = xn[rows, pick]
        similarity = (xs @ centroids[:, i, :, None].to(xs.dtype))[..., 0].float()
        if active is not None:  # entries with fewer clusters ignore this one
            similarity = similarity.masked_fill(~active[:, i, None], -2.0)
        closest = torch.maximum(closest, similarity)
        pick = _farthest(xn, centroids[:, : i + 1], closest, valid, xs.dtype, active)
    flat = (rows[:, None] * c).expand(n, t)
    weight = valid.float().flatten()
    # padding rows weighed out once, not per step (a fresh [N T, D] costs more than its sum); no copy
    # at all without padding
    weighted = xn.flatten(0, 1) if bool(valid.all()) else xn.flatten(0, 1) * weight[:, None]
    for _ in range(iterations):
        index = (flat + nearest(xs, centroids, active)[1]).flatten()
        sums = torch.zeros(n * c, d, device=x.device).index_add_(0, index, weighted)
        members = torch.zeros(n * c, device=x.device).index_add_(0, index, weight)
        empty = (members == 0).view(n, c, 1)
        centroids = torch.where(empty, centroids, F.normalize(sums.view(n, c, d), dim=-1))
    return centroids, nearest(xs, centroids, active)[1]


def _farthest(xn, centroids, closest, valid, dtype, active) -> torch.Tensor:
    """Per entry, the valid row of ``xn`` ``[N, T, D]`` least similar to its nearest of ``centroids``
    ``[N, i, D]``, as in exact arithmetic: ``closest`` ``[N, T]`` holds those similarities computed in
    ``dtype``; where that is coarser than fp32, the rows within twice its error of the minimum are
    re-scored in fp32 and the least of them is taken, so the pick does not drift with the rounding."""
    gap = closest.masked_fill(~valid, 3.0)
    if dtype == xn.dtype:
        return gap.argmin(-1)
    # a cosine of unit vectors rounded to dtype (inputs and output) is off by <= 1.5 eps: slack 2 eps
    near = gap <= gap.amin(-1, keepdim=True) + 4 * torch.finfo(dtype).eps
    picks = []
    for row in range(xn.shape[0]):
        rows = near[row].nonzero()[:, 0]
        exact = xn[row, rows] @ centroids[row].T  # [candidates, i] fp32
        if active is not None:
            exact = exact.masked_fill(~active[row, : centroids.shape[1]], -2.0)
        picks.append(rows[exact.amax(-1).argmin()])
    return torch.stack(picks)


def active_clusters(n_clusters: int | torch.Tensor, valid: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(C, active ``[N, C]`` bool) for :func:`spherical_kmeans`: entry i of ``valid`` ``[N, T]`` gets
    min(n_clusters[i], its valid rows) clusters, at least 1; C is the largest count and ``active``
    None when every entry has C."""
    n = valid.shape[0]
    counts = torch.as_tensor(n_clusters, device=valid.device).expand(n).minimum(valid.sum(-1)).clamp_min(1)
    fewest, c = torch.stack(counts.aminmax()).tolist()
    return c, None if fewest == c else torch.arange(c, device=valid.device) < counts[:, None]


def key_clusters(
    k: torch.Tensor, call: LayerCall, n_clusters: int | torch.Tensor, iterations: int, seed: int
):
    """:func:`spherical_kmeans` of each KV head's real keys, rows N = B * Hkv: (real keys ``[B, Tk]``
    bool, valid ``[N, Tk]`` bool, per-row cluster request ``[N]``, centroids ``[N, C, D]``,
    assignment ``[N, Tk]``). ``n_clusters`` is an int or ``[B]``."""
    b, hkv, kv_len, _ = k.shape
    real = real_keys(call.key_padding_mask, b, kv_len, k.device)
    valid = real.repeat_interleave(hkv, 0)
    n_clusters = torch.as_tensor(n_clusters, device=k.device).expand(b).repeat_interleave(hkv)
    centroids, assign = spherical_kmeans(k.flatten(0, 1), n_clusters, iterations, seed, valid)
    return real, valid, n_clusters, centroids, assign


def nearest(
    xn: torch.Tensor, centroids: torch.Tensor, active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity, index) of the closest unit centroid ``[N, C, D]`` to each row of ``xn`` ``[N, T,
    D]`` by dot product, computed in xn's dtype: the cosine for unit rows; for other rows the
    similarity is the cosine times the row's norm, so the index is still the nearest by angle (the
    query cells route raw queries this way). ``active`` ``[N, C]`` bool leaves out the centroids an
    entry does not have."""
    n, t, _ = xn.shape
    step = max(1, MAX_SIMILARITIES // max(n * centroids.shape[1], 1))
    parts = []
    for lo in range(0, t, step):
        similarity = xn[:, lo : lo + step] @ centroids.transpose(1, 2).to(xn.dtype)
        if active is not None:
            similarity = similarity.masked_fill(~active[:, None], -2.0)  # below any cosine
        parts.append(similarity.max(-1))
    return torch.cat([p.values for p in parts], 1), torch.cat([p.indices for p in parts], 1)


@register_method
@dataclass
class Routing(BudgetedMethod):
    """Args: budget (tokens per query block incl. sinks and window, default 2048), summary
    (``"cell"`` default, or ``"cluster"``), n_clusters (default None: 12 with cells, round(sqrt(n))
    for a row of n real keys with clusters), top_clusters (None (default): every cluster carries its
    soft share of mass; an int: only that many clusters per query cell or representative), probes
    (``"cluster"`` only: single queries per query block besides its mean query, default 1: the
    block's last query), iterations (k-means steps, default 4), seed (0), heads (``"query"``: each
    query head its own blocks, the default; ``"group"``: one block set per KV group, each block
    scored by the largest share any of the group's heads routes to it), sink_tokens (64),
    local_tokens (512)."""

    name = "routing"
    description = (
        "Shared k-means routing of queries and keys; key blocks ranked by the mass their cells draw."
    )

    n_clusters: int | None = None
    top_clusters: int | None = None
    probes: int = 1
    iterations: int = 4
    seed: int = 0
    summary: str = "cell"
    heads: str = "query"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(iterations=self.iterations)
        check_heads(self.heads)
        for name in ("n_clusters", "top_clusters"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None (automatic) or an int >= 1, got {value!r}")
        check_probes(self.probes, self.block_size)
        if self.summary not in SUMMARIES:
            raise ValueError(f"summary must be one of {SUMMARIES}, got {self.summary!r}")

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        n_c = self.n_clusters
        if n_c is None and self.summary == "cell":
            n_c = CELL_CLUSTERS  # spherical_kmeans gives a row at most as many clusters as real keys
        elif n_c is None:  # per batch row, from its real keys: a left-padded row clusters as if unpadded
            real = call.key_padding_mask
            n_real = torch.full((k.shape[0],), k.shape[2]) if real is None else real.sum(-1)
            n_c = n_real.double().sqrt().round().long()  # = round(math.sqrt(n)); never exactly .5
        kw = dict(
            block=self.block_size, n_clusters=n_c, top_clusters=self.top_clusters, iterations=self.iterations
        )
        if self.summary == "cell":
            scores = cell_block_scores(q, k, call, seed=self.seed, **kw)
        else:
            scores = routed_block_scores(q, k, call, probes=self.probes, seed=self.seed, **kw)
        if self.heads == "group":
            scores = group_scores(scores, k.shape[1])
        return self.mask_from_scores(prefer_late_ties(scores), q, k, call)


def routed_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    call: LayerCall,
    *,
    block: int,
    n_clusters: int | torch.Tensor,
    top_clusters: int | None,
    probes: int,
    iterations: int,
    seed: int,
) -> torch.Tensor:
    """Routed-mass share of each key block, ``[B, Hq, nQ, nK]`` fp32 in [0, 1] (module docstring,
    steps 1-3); -inf for blocks never to select (unreachable, padding only, without routed keys under
    ``top_clusters``). q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``; ``n_clusters`` an int or ``[B]``
    (each row gets at most as many clusters as it has real keys)."""
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    n_k, dev = -(-kv_len // block), q.device
    real, valid, _, centroids, assign = key_clusters(k, call, n_clusters, iterations, seed)
    typical, mass, sizes = cluster_stats(k.flatten(0, 1), centroids, assign, valid, block)
    # Routing logits of each representative query, per query head: [B * Hkv, G * nQ * R, C].
    reps, index = probe_queries(q, block, probes, real[:, -q_len:])  # [B, Hq, nQ, R, D]
    logits = (reps.reshape(b * hkv, -1, d) * call.scale) @ typical.transpose(1, 2)
    if call.softcap is not None:
        logits = torch.tanh(logits / call.softcap) * call.softcap
    logits = logits.masked_fill(sizes[:, None, :] == 0, float("-inf"))  # empty clusters
    if top_clusters is not None and top_clusters < logits.shape[-1]:
        routed = logits.topk(top_clusters, dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, routed, logits.gather(-1, routed))
    # exp(logit - best), floored at e^-80 so that no routed cluster underflows to 0 in fp32.
    best = logits.amax(-1, keepdim=True)
    weight = torch.where(logits > float("-inf"), (logits - best).clamp_min(-80.0).exp(), 0.0)
    routed_mass = (weight @ mass.transpose(1, 2)).view(b, hq, -1, index.shape[1], n_k)  # [B, Hq, nQ, R, nK]
    reach = reachable_blocks(q_len, kv_len, block, call.sliding_window, dev)
    share = routed_mass / (routed_mass * reach[:, None, :]).sum(-1, keepdim=True)
    scores = share.nan_to_num(0.0).amax(3).masked_fill(~reach, float("-inf"))  # max over representatives
    if top_clusters is not None:
        return scores.masked_fill(scores == 0, float("-inf"))  # no routed key in the block
    padding_only = ~key_blocks_with_real_keys(real, kv_len, block)[:, None, None, :]
    return scores.masked_fill(padding_only, float("-inf"))


def cluster_stats(
    keys: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cluster, from keys ``[N, T, D]`` and their assignment ``[N, T]`` (real keys only): the
    typical key ``[N, C, D]`` (centroid times the members' mean norm), the summed affinity per key
    block ``[N, nK, C]`` (sum of max(cos(k_j, centroid), 0) over the block's keys of the cluster) and
    the member count ``[N, C]``."""
    (n, t, d), n_c = keys.shape, centroids.shape[1]
    n_k = -(-t // block)
    keys, weight = keys.float(), valid.float()
    affinity = (F.normalize(keys, dim=-1) * centroids.gather(1, assign[..., None].expand(n, t, d))).sum(-1)
    rows = torch.arange(n, device=keys.device)[:, None]
    by_cluster = (rows * n_c + assign).flatten()
    norms = torch.zeros(n * n_c, device=keys.device)
    norms.index_add_(0, by_cluster, (keys.norm(dim=-1) * weight).flatten())
    sizes = torch.zeros(n * n_c, device=keys.device).index_add_(0, by_cluster, weight.flatten())
    typical = centroids * (norms / sizes.clamp_min(1)).view(n, n_c, 1)
    by_block = ((rows * n_k + torch.arange(t, device=keys.device) // block) * n_c + assign).flatten()
    mass = torch.zeros(n * n_k * n_c, device=keys.device)
    mass.index_add_(0, by_block, (affinity.clamp_min(0) * weight).flatten())
    return typical, mass.view(n, n_k, n_c), sizes.view(n, n_c)


def cell_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    call: LayerCall,
    *,
    block: int,
    n_clusters: int | torch.Tensor,
    top_clusters: int | None,
    iterations: int,
    seed: int,
) -> torch.Tensor:
    """Block scores of ``summary="cell"``, ``[B, Hq, nQ, nK]`` fp32 (module docstring): per query head
    and query block, the largest log share of attention mass that one of its query cells routes to
    the key block; -inf for blocks never to select. Arguments as :func:`routed_block_scores`."""
    (b, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    n_k, n_q, dev, n, g = -(-kv_len // block), -(-q_len // block), q.device, b * hkv, hq // hkv
    real, valid, n_clusters, centroids, assign = key_clusters(k, call, n_clusters, iterations, seed)
    keys, c = k.flatten(0, 1), centroids.shape[1]
    cells = cell_summaries(keys, assign, valid, torch.arange(kv_len, device=dev) // block, n_k, c)
    # Query cells: the queries of one head in one query block routed to one centroid (shared QK
    # routing). Grouped by query block first, so that slots come in causal order. Rows are (position,
    # head) pairs of a KV group (group_rows: a view of HF's queries, no copy, when Hkv = 1).
    qs = group_rows(q, hkv).flatten(0, 1)
    q_valid = real[:, -q_len:].repeat_interleave(g, 1).repeat_interleave(hkv, 0)
    # A query's nearest unit centroid by q . c (its cosine times |q|: no normalized copy of the queries),
    # in fp32: exact picks, and a GEMV of C centroids costs less than a bf16 copy would save.
    _, q_assign = nearest(qs.float(), centroids, active_clusters(n_clusters, valid)[1])
    pos = torch.arange(q_len * g, device=dev)
    q_cells = cell_summaries(qs, q_assign, q_valid, pos // g // block * g + pos % g, n_q * g, c)
    reps, q_block = q_cells.mean * call.scale, q_cells.group // g  # [N, R, D], [N, R]
    reach = reachable_blocks(q_len, kv_len, block, call.sliding_window, dev)
    first = torch.where(reach.any(-1), reach.to(torch.int8).argmax(-1), n_k)  # reach is one run per row
    last = first + reach.sum(-1) - 1
    allowed = None
    if top_clusters is not None and top_clusters < c:  # hard routing: a query cell's top clusters only
        typical, _, sizes = cluster_stats(keys, centroids, assign, valid, block)
        routed = (reps @ typical.transpose(1, 2)).masked_fill(sizes[:, None, :] == 0, float("-inf"))
        allowed = torch.zeros_like(routed, dtype=torch.bool).scatter_(
            2, routed.topk(top_clusters, -1).indices, True
        )
    out = torch.full((n, n_q * g, n_k), float("-inf"), device=dev)
    # Chunks of query cells (in causal order), each against the key cells it can see: with ~8 chunks
    # the causal upper triangle costs ~1/16 of the square instead of 1/2.
    step = max(
        1, min(MAX_SIMILARITIES // max(n * cells.mean.shape[1], 1), -(-reps.shape[1] // CAUSAL_CHUNKS))
    )
    for lo in range(0, reps.shape[1], step):
        rows = slice(lo, lo + step)
        blocks = q_block[:, rows]
        seen = int((cells.group <= last[blocks.amax()]).sum(-1).max())  # causal: a prefix of the key cells
        logits = reps[:, rows] @ cells.mean[:, :seen].transpose(1, 2)  # [N, r, P']
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        logits += cells.log_n[:, None, :seen]  # -inf for slots without real keys
        group = cells.group[:, None, :seen]
        hidden = (group < first[blocks][..., None]) | (group > last[blocks][..., None])
        if allowed is not None:
            hidden |= ~allowed[:, rows].gather(2, cells.cluster[:, None, :seen].expand_as(logits))
        logits.masked_fill_(hidden, float("-inf"))
        top = logits.amax(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
        # each key cell's mass added to its key block: [N, r, nK] without a one-hot [N, P, nK]
        # (that matmul cost more than the logits themselves and its memory grows as T^2)
        weight = logits.sub_(top).exp_()
        mass = torch.zeros(n, weight.shape[1], n_k, device=dev).scatter_add_(
            2, group.expand_as(weight), weight
        )
        share = (
            (mass / mass.sum(-1, keepdim=True)).log_().nan_to_num_(float("-inf"), neginf=float("-inf"))
        )  # nan: sees no key
        share.masked_fill_(q_cells.log_n[:, rows, None] == float("-inf"), float("-inf"))  # unused slots
        out.scatter_reduce_(1, q_cells.group[:, rows, None].expand_as(share), share, "amax")
    out = out.view(b, hkv, n_q, g, n_k).transpose(2, 3).reshape(b, hq, n_q, n_k)
    return out.masked_fill(~reach, float("-inf"))


@dataclass
class Cells:
    """Per cell (one cluster's real rows inside one group, e.g. a key block), padded to the largest
    cell count P of the N rows: mean ``[N, P, D]`` fp32, log member count ``[N, P]`` (-inf for an
    unused slot), group and cluster ``[N, P]`` int64."""

    mean: torch.Tensor
    log_n: torch.Tensor
    group: torch.Tensor
    cluster: torch.Tensor


def cell_summaries(
    x: torch.Tensor,
    assign: torch.Tensor,
    valid: torch.Tensor,
    group: torch.Tensor,
    n_groups: int,
    n_clusters: int,
) -> Cells:
    """The :class:`Cells` of rows ``x`` ``[N, T, D]`` with their cluster ``assign`` ``[N, T]`` and group
    ``group`` ``[T]`` (< ``n_groups``); invalid rows (``valid`` False, padding) join no cell. Memory
    O(N T D): only cells that hold rows get a slot."""
    n, t, d = x.shape
    cell_id = group * n_clusters + assign
    cell_id = cell_id.masked_fill(~valid, n_groups * n_clusters)  # one slot for all padding, count 0
    ordered, order = cell_id.sort(-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = torch.empty_like(order).scatter_(1, order, first.long().cumsum(-1) - 1)  # [N, T]
    p = int(slot.max()) + 1
    weight = valid.float().flatten()
    flat = (slot + torch.arange(n, device=x.device)[:, None] * p).flatten()
    # Padding rows all sum into the padding slot (count 0, mean zeroed below): no weighted copy of x.
    sums = torch.zeros(n * p, d, device=x.device).index_add_(0, flat, x.flatten(0, 1).float())
    counts = torch.zeros(n * p, device=x.device).index_add_(0, flat, weight).view(n, p)
    ids = torch.zeros(n, p, dtype=torch.long, device=x.device).scatter_(1, slot, cell_id)
    mean = sums.view(n, p, d) / counts.clamp_min(1)[..., None]
    return Cells(
        mean=mean.masked_fill_(counts[..., None] == 0, 0.0),
        log_n=counts.log(),
        group=(ids // n_clusters).clamp_max(n_groups - 1),
        cluster=ids % n_clusters,
    )
