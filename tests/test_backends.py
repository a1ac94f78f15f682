"""Selection of the built-in methods, checked on hand-built inputs against obvious expectations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sparse_llm
from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends.base import BudgetedMethod
from sparse_llm.kernels import BlockMask


def test_sinks_follow_left_padding():
    mask = BlockMask.sink_window(
        q_len=256,
        kv_len=256,
        block_q=16,
        block_k=16,
        sink_tokens=16,
        local_tokens=32,
        kv_start=torch.tensor([0, 40]),
    )
    dense = mask.to_dense()  # [2, 1, nQ, nK]
    last = dense[:, 0, -1]  # the last query block sees sinks + local window only
    assert last[0].nonzero().flatten().tolist() == [0, 14, 15]  # window: keys 224..255
    assert last[1].nonzero().flatten().tolist() == [2, 3, 14, 15]  # tokens 40..55 span blocks 2-3


def test_streaming_padded_row_keeps_its_first_real_tokens():
    method = get_method("streaming", sink_tokens=16, local_tokens=32, block_size=16)
    q = torch.randn(2, 2, 256, 64)
    k = torch.randn(2, 1, 256, 64)
    padding = torch.ones(2, 256, dtype=torch.bool)
    padding[1, :64] = False
    dense = method.block_mask(q, k, k, LayerCall(0, 0.125, key_padding_mask=padding)).to_dense()
    assert dense[1, 0, -1, 4] and not dense[1, 0, -1, 0]
    assert dense[0, 0, -1, 0] and not dense[0, 0, -1, 4]


def test_block_topk_finds_the_planted_block_and_respects_the_budget():
    torch.manual_seed(0)
    b, hkv, g, t, d, bs = 1, 2, 2, 512, 64, 32
    q = torch.randn(b, hkv * g, t, d) * 0.1
    k = torch.randn(b, hkv, t, d) * 0.1
    direction = torch.randn(d)
    q[:, :, -bs:] += direction  # the last query block points at ...
    k[:, 0, 5 * bs : 6 * bs] += direction  # ... key block 5 of KV head 0 only
    method = get_method(
        "block_topk", dense_tail_blocks=0, budget=5 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs
    )
    mask = method.block_mask(q, k, k, LayerCall(0, d**-0.5))
    last = mask.to_dense()[0, :, -1]  # [Hq, nK]: one row per query head
    n_k = t // bs
    assert last[:g, 5].all() and last[:g, 0].all() and last[:g, n_k - 2 :].all()  # the heads of KV head 0
    assert last.sum(-1).tolist() == [5] * (hkv * g)  # budget / block_size blocks per query block
    # query block n reaches n + 1 blocks and keeps min(n + 1, 5) of them
    assert mask.density() == pytest.approx(sum(min(n + 1, 5) for n in range(n_k)) / sum(range(1, n_k + 1)))


@pytest.mark.parametrize("name", ["block_topk", "routing", "dhsa"])
def test_group_heads_share_one_block_set_that_keeps_what_one_head_needs(name):
    """heads="group": one mask row per KV head, which keeps the block each query head of the group
    points at (the group's score is its heads' largest), and with one query head per KV head the
    selection is the per-head one."""
    torch.manual_seed(0)
    b, hkv, g, t, d, bs = 1, 2, 2, 512, 64, 32
    q = torch.randn(b, hkv * g, t, d) * 0.1
    k = torch.randn(b, hkv, t, d) * 0.1
    for head, block in ((0, 9), (1, 5)):  # the two query heads of KV head 0 look for different blocks
        direction = torch.randn(d) * 2
        q[:, head, -bs:] += direction
        k[:, 0, block * bs : (block + 1) * bs] += direction
    params = dict(dense_tail_blocks=0, budget=5 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs)
    call = LayerCall(0, d**-0.5)
    per_head = get_method(name, **params).block_mask(q, k, k, call).to_dense()[0]  # [Hq, nQ, nK]
    shared = get_method(name, heads="group", **params).block_mask(q, k, k, call).to_dense()[0]
    assert shared.shape[0] == hkv and per_head.shape[0] == hkv * g
    assert per_head[0, -1, 9] and per_head[1, -1, 5]  # each head finds its own block
    assert shared[0, -1, 9] and shared[0, -1, 5]  # the group keeps both, for both heads
    assert shared.sum(-1).tolist() == per_head[::g].sum(-1).tolist()  # the same budget per row
    one = (q[:, ::g], k)  # one query head per KV head: group = per head
    assert torch.equal(
        get_method(name, heads="group", **params).block_mask(*one, k, call).to_dense(),
        get_method(name, **params).block_mask(*one, k, call).to_dense(),
    )
    with pytest.raises(ValueError, match="heads must be one of"):
        get_method(name, heads="kv")


def test_block_topk_budget_must_cover_the_forced_blocks():
    with pytest.raises(ValueError, match="must cover sink_tokens"):
        get_method("block_topk", dense_tail_blocks=0, budget=256, sink_tokens=128, local_tokens=512)


def _planted(seed: int = 0, t: int = 512, d: int = 64, bs: int = 32):
    torch.manual_seed(seed)
    q = torch.randn(1, 4, t, d) * 0.1
    k = torch.randn(1, 2, t, d) * 0.1
    v = torch.randn(1, 2, t, d)
    return q, k, v


def test_dma_value_norm_picks_the_planted_high_norm_values_for_every_query_block():
    q, k, v = _planted()
    bs = 32
    v[:, 0, 7 * bs : 8 * bs] *= 10  # block 7 of KV head 0 carries large values
    method = get_method(
        "dma", dense_tail_blocks=0, budget=4 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs
    )
    dense = method.block_mask(q, k, v, LayerCall(0, 0.125)).to_dense()[0]  # [Hkv, nQ, nK]
    assert dense[0, 7:, 7].all()  # every query block that can see block 7 attends it
    # one score vector per head: each row keeps its sink, local and the best blocks it can see
    blocks = v.norm(dim=-1).view(2, 16, bs).amax(-1)  # [Hkv, nK]
    for n in range(3, 16):
        best = blocks[:, 1:n].topk(2, dim=-1).indices + 1
        expected = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, best, True)
        expected[:, [0, n]] = True
        assert dense[:, n].equal(expected), n


def test_dma_observation_picks_the_keys_the_last_queries_attend():
    q, k, v = _planted(seed=1)
    bs = 32
    direction = torch.randn(64) * 3
    q[:, 2:4, -16:] += direction  # the last queries of group 1 ...
    k[:, 1, 5 * bs + 3] += direction  # ... look at one key in block 5 of KV head 1
    method = get_method(
        "dma",
        dense_tail_blocks=0,
        score="observation",
        window=16,
        budget=3 * bs,
        sink_tokens=bs,
        local_tokens=bs,
        block_size=bs,
    )
    dense = method.block_mask(q, k, v, LayerCall(0, 64**-0.5)).to_dense()[0]
    assert dense[1, -1, 5] and dense[1, 5:, 5].all()


def test_dma_skips_padding_keys():
    q, k, v = _planted(seed=2)
    v[:, :, :64] *= 100  # huge values, but they are padding
    padding = torch.ones(1, 512, dtype=torch.bool)
    padding[:, :64] = False
    method = get_method(
        "dma", dense_tail_blocks=0, budget=128, sink_tokens=32, local_tokens=32, block_size=32
    )
    dense = method.block_mask(q, k, v, LayerCall(0, 0.125, key_padding_mask=padding)).to_dense()[0]
    # real query blocks (2 on) never attend the padded blocks 0-1; their sinks start at block 2
    assert not dense[:, 2:, :2].any()
    assert dense[:, -1, 2].all()


@pytest.mark.parametrize(
    "params, match",
    [
        pytest.param(dict(score="attention"), "score must be one of", id="bad-score"),
        pytest.param(dict(budget=-1), "budget must be a positive int", id="neg-budget"),
        pytest.param(dict(window=0), "window must be a positive int", id="zero-window"),
        pytest.param(
            dict(budget=100, sink_tokens=64, local_tokens=512), "must cover", id="budget-below-forced"
        ),
    ],
)
def test_dma_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("dma", **params)


def test_spherical_kmeans_groups_planted_clusters():
    from sparse_llm.backends.routing import spherical_kmeans

    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1) * 5
    labels = torch.arange(300) % 3
    x = (centers[labels] + 0.3 * torch.randn(300, 32))[None].repeat(2, 1, 1)  # batch of 2 "heads"
    _, assign = spherical_kmeans(x, n_clusters=3, iterations=5, seed=1)
    for row in assign:  # same planted label <=> same cluster (up to renaming)
        assert (row[:, None] == row[None, :]).equal(labels[:, None] == labels[None, :])


def test_spherical_kmeans_left_padded_entry_clusters_as_its_unpadded_run():
    from sparse_llm.backends.routing import spherical_kmeans

    x = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :20] = False
    # per-entry cluster counts; entry 1 asks for more than its 30 valid rows (it gets 30)
    centroids, assign = spherical_kmeans(x, torch.tensor([9, 40]), 3, seed=1, valid=valid)
    assert centroids.shape == (2, 30, 16)
    for i, pad, n in ((0, 0, 9), (1, 20, 40)):
        single_centroids, single_assign = spherical_kmeans(x[i : i + 1, pad:], n, 3, seed=1)
        assert assign[i, pad:].equal(single_assign[0])
        torch.testing.assert_close(centroids[i, : single_centroids.shape[1]], single_centroids[0])


def test_routing_sends_a_query_block_to_the_blocks_of_its_cluster():
    torch.manual_seed(0)
    bs, t, d = 32, 1024, 32
    directions = torch.nn.functional.normalize(torch.randn(4, d), dim=-1) * 4
    block_label = torch.arange(t // bs) % 4  # key block m holds keys of planted cluster m % 4
    k = (directions[block_label].repeat_interleave(bs, 0) + 0.2 * torch.randn(t, d))[None, None]
    q = 0.2 * torch.randn(1, 2, t, d)
    q[:, :, -bs:] += directions[1]  # the last query block asks for cluster 1
    method = get_method(
        "routing",
        dense_tail_blocks=0,
        n_clusters=4,
        top_clusters=1,
        budget=16 * bs,
        sink_tokens=bs,
        local_tokens=bs,
        block_size=bs,
    )
    last = method.block_mask(q, k, k, LayerCall(0, d**-0.5)).to_dense()[0, 0, -1]
    routed = last.clone()
    routed[0] = routed[-1] = False  # drop the sink and local blocks
    assert routed.nonzero().flatten().tolist() == (block_label == 1).nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "params, match",
    [
        pytest.param(dict(n_clusters=0), "n_clusters must be None", id="zero-clusters"),
        pytest.param(dict(top_clusters=-2), "top_clusters must be None", id="neg-top"),
        pytest.param(dict(iterations=0), "iterations must be a positive int", id="zero-iterations"),
        pytest.param(dict(budget=0), "budget must be a positive int", id="zero-budget"),
    ],
)
def test_routing_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("routing", **params)


def _segmented_keys(bounds: list[int], t: int, d: int = 32, heads: int = 2, seed: int = 0) -> torch.Tensor:
    """Keys [1, heads, t, d] made of segments [bounds[i], bounds[i+1]) with one direction each."""
    torch.manual_seed(seed)
    k = torch.empty(1, heads, t, d)
    edges = [*bounds, t]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        k[:, :, lo:hi] = torch.randn(1, heads, 1, d) + 0.15 * torch.randn(1, heads, hi - lo, d)
    return k


def test_dhsa_dynamic_chunking_finds_planted_boundaries():
    from sparse_llm.backends.dhsa import chunk_boundaries

    bounds = [0, 37, 100, 170, 230, 301, 360, 449]
    k = _segmented_keys(bounds, 512)
    starts = chunk_boundaries(k, chunking="dynamic", chunk_size=64, min_chunk=16, max_chunk=256)
    assert starts[0].nonzero().flatten().tolist() == bounds


def test_dhsa_chunking_limits_and_fixed_mode():
    from sparse_llm.backends.dhsa import chunk_boundaries

    k = _segmented_keys([0, 300], 512)  # one change only: long chunks get cut at max_chunk
    starts = chunk_boundaries(k, chunking="dynamic", chunk_size=64, min_chunk=16, max_chunk=128)[0]
    found = starts.nonzero().flatten().tolist()
    assert 300 in found and all(b - a <= 128 for a, b in zip(found, [*found[1:], 512], strict=True))
    fixed = chunk_boundaries(k, chunking="fixed", chunk_size=64, min_chunk=16, max_chunk=128)[0]
    assert fixed.nonzero().flatten().tolist() == list(range(0, 512, 64))


def test_dhsa_ranks_the_chunk_the_query_block_matches():
    bs, t, d = 32, 1024, 32
    bounds = [0, 200, 330, 420, 700]
    k = _segmented_keys(bounds, t, d=d, heads=1, seed=3)
    q = 0.1 * torch.randn(1, 2, t, d)
    q[:, :, -2 * bs : -bs] += k[0, 0, 340] * 3  # the second-to-last query block looks for chunk [330, 420)
    method = get_method("dhsa", budget=8 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs, min_chunk=16)
    dense = method.block_mask(q, k, k, LayerCall(0, d**-0.5)).to_dense()[0, 0]
    row = dense[-2]
    assert row[330 // bs : 420 // bs + 1].all()  # every block overlapping the matched chunk
    assert int(row.sum()) <= 8
    assert dense[-1].sum() == dense.shape[-1]  # the trailing query block attends densely


@pytest.mark.parametrize("q_len", [200, 72], ids=["prompt", "chunk"])
def test_dhsa_mass_scores_match_a_loop_reference(q_len):
    """Per query head and block pair: the best chunk overlapping the key block, scored as
    softcap(scale * mean query . mean key) + log(real keys), from real tokens only."""
    from sparse_llm.backends.dhsa import chunk_boundaries, chunk_mass_scores
    from sparse_llm.backends.selection import first_real_key

    torch.manual_seed(0)
    b, hq, hkv, t, d, bs = 2, 4, 2, 200, 16, 16
    q, k = torch.randn(b, hq, q_len, d), torch.randn(b, hkv, t, d)
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :37] = False  # left padding: its chunks hold no real key
    call = LayerCall(0, d**-0.5, softcap=3.0, key_padding_mask=real)
    starts = chunk_boundaries(
        k, chunking="dynamic", chunk_size=24, min_chunk=8, max_chunk=40, kv_start=first_real_key(real)
    )
    got = chunk_mass_scores(q, k, starts, call, bs)

    chunk_id = starts.long().cumsum(-1) - 1
    n_q, n_k = -(-q_len // bs), -(-t // bs)
    want = torch.full((b, hq, n_q, n_k), float("-inf"))
    for row in range(b):
        q_real = real[row, t - q_len :]
        for h in range(hq):
            for i in range(n_q):
                rows = torch.arange(i * bs, min((i + 1) * bs, q_len))
                rows = rows[q_real[rows]]
                q_mean = q[row, h, rows].mean(0) if len(rows) else torch.zeros(d)
                for j in range(n_k):
                    for c in chunk_id[row, j * bs : (j + 1) * bs].unique():
                        members = (chunk_id[row] == c) & real[row]
                        if not members.any():
                            continue
                        logit = call.scale * q_mean @ k[row, h // (hq // hkv), members].mean(0)
                        score = 3.0 * torch.tanh(logit / 3.0) + members.sum().log()
                        want[row, h, i, j] = torch.maximum(want[row, h, i, j], score)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params, match",
    [
        pytest.param(dict(score="peak"), "score must be one of", id="bad-score"),
        pytest.param(
            dict(min_chunk=300, max_chunk=200, chunk_size=250),
            "min_chunk .* must be <= max_chunk",
            id="min-gt-max",
        ),
        pytest.param(dict(chunk_size=8), "chunk_size .* must lie in", id="chunk-below-min"),
        pytest.param(dict(chunking="learned"), "chunking must be one of", id="bad-chunking"),
        pytest.param(dict(budget=0), "budget must be a positive int", id="zero-budget"),
        pytest.param(dict(budget=100), "must cover", id="budget-below-forced"),
    ],
)
def test_dhsa_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("dhsa", **params)


# Every registered budgeted method (none named), with the knobs of its exact setting other than the
# budget (threshold 1.0, gamma 1.0, ...): the budget is then the only limit on its selection.
BUDGETED = [
    pytest.param(name, id=name)
    for name in sparse_llm.list_methods()
    if isinstance(get_method(name), BudgetedMethod)
]


def budget_only(name: str, **params) -> BudgetedMethod:
    exact = {key: value for key, value in (get_method(name).exact_params or {}).items() if key != "budget"}
    return get_method(name, **exact, **params)


@pytest.mark.parametrize("name", BUDGETED)
def test_achieved_budget_is_within_ten_percent(name):
    torch.manual_seed(0)
    bs, t, d, budget = 32, 2048, 32, 512
    q, k, v = torch.randn(2, 4, t, d), torch.randn(2, 2, t, d), torch.randn(2, 2, t, d)
    method = budget_only(name, budget=budget, sink_tokens=32, local_tokens=128, block_size=bs)
    dense = method.block_mask(q, k, v, LayerCall(0, d**-0.5)).to_dense()
    # The last query block can see every key, so it must spend the budget, never more.
    tokens = dense[..., -2, :].sum(-1).float() * bs  # [B, H]; -2: dhsa keeps the last block dense
    assert (tokens <= budget).all()
    assert (tokens >= 0.9 * budget).all(), tokens


@pytest.mark.parametrize("name", BUDGETED)
def test_budget_above_the_context_is_clamped_with_one_warning(name, caplog):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 1, 128, 16)
    method = budget_only(name, budget=256, sink_tokens=16, local_tokens=16, block_size=16)
    with caplog.at_level("WARNING", logger="sparse_llm.backends.base"):
        for _ in range(3):  # one warning per method object, not one per layer call
            mask = method.block_mask(q, k, k, LayerCall(0, 0.25))
    assert mask.density() == 1.0
    warnings = [r for r in caplog.records if "budget 256 >= context length 128" in r.getMessage()]
    assert len(warnings) == 1
    caplog.clear()
    budget_only(name, budget=64, sink_tokens=16, local_tokens=16, block_size=16).block_mask(
        q, k, k, LayerCall(0, 0.25)
    )
    assert not caplog.records


@pytest.mark.parametrize(
    "name, params",
    [
        pytest.param("dma", dict(score="observation"), id="dma-observation"),
        pytest.param("dma", dict(key_norm=True), id="dma-key_norm"),
        pytest.param("dhsa", dict(chunking="dynamic"), id="dhsa-dynamic"),
        pytest.param("dhsa", dict(score="similarity"), id="dhsa-similarity"),
    ],
)
def test_options_at_a_full_budget_keep_every_block(name, params):
    """Options besides the defaults that test_method_contract.py runs: at a budget covering the
    context they select every reachable block, hence give dense's output (the contract's check)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 150, 16), torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16)
    method = get_method(name, **params, budget=160, sink_tokens=16, local_tokens=32, block_size=16)
    assert method.block_mask(q, k, v, LayerCall(0, 0.25)).validate().density() == 1.0


# --------------------------------------------------------------- per-head peaks: a needle one head seeks
def _one_head_needle(seed: int, t: int = 1024, d: int = 64, bs: int = 32):
    """MQA (4 query heads, 1 KV head) over alike filler keys. In the last query block, head 1 looks
    for ONE needle key (position 20 * bs + 7) while heads 0, 2 and 3 look for a distractor block
    (block 10, every key). Returns q, k, the needle's block and the distractor's block."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(3, d, generator=gen), dim=-1)
    common, needle, distractor = unit[0], unit[1] * 8, unit[2] * 8
    k = common + 0.1 * torch.randn(1, 1, t, d, generator=gen)
    q = common + 0.3 * torch.randn(1, 4, t, d, generator=gen)
    k[0, 0, 20 * bs + 7] += needle
    k[0, 0, 10 * bs : 11 * bs] += distractor
    q[0, 1, -bs:] += needle
    q[0, [0, 2, 3], -bs:] += distractor
    return q, k, 20, 10


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(3)])
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("block_topk", "routing")])
def test_the_head_that_seeks_a_needle_gets_its_block(name, seed):
    bs = 32
    q, k, needle, distractor = _one_head_needle(seed, bs=bs)
    # one free block per query block beyond the sink block and the two local blocks
    method = get_method(
        name, dense_tail_blocks=0, budget=4 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs
    )
    dense = method.block_mask(q, k, k, LayerCall(0, 64**-0.5)).to_dense()[0, :, -1]  # [H, nK]
    last = dense[torch.arange(4) * dense.shape[0] // 4]  # the row each query head uses
    assert last.sum(-1).tolist() == [4] * 4
    assert last[1, needle] and not last[1, distractor]
    assert last[[0, 2, 3], distractor].all() and not last[[0, 2, 3], needle].any()


def test_dma_rows_rank_the_blocks_they_can_see():
    """The last queries of ONE head (of two) attend a needle key in block 3, and both heads attend
    two keys in blocks 9 and 11 harder. Query block 6 cannot see blocks 9 and 11: it must still
    spend its two free blocks, the needle's first (one global set of two would leave it none)."""
    gen = torch.Generator().manual_seed(0)
    t, d, bs = 512, 64, 32
    unit = torch.nn.functional.normalize(torch.randn(3, d, generator=gen), dim=-1) * 6
    k = unit[0] + 0.1 * torch.randn(1, 1, t, d, generator=gen)
    q = 0.3 * torch.randn(1, 2, t, d, generator=gen)
    k[0, 0, 3 * bs + 5] += unit[1]
    k[0, 0, [9 * bs + 1, 11 * bs + 1]] += unit[2]
    q[0, 1, -16:] += unit[1] + unit[2]
    q[0, 0, -16:] += unit[2] * 2
    method = get_method(
        "dma",
        dense_tail_blocks=0,
        score="observation",
        window=16,
        budget=4 * bs,
        sink_tokens=bs,
        local_tokens=bs,
        block_size=bs,
    )
    dense = method.block_mask(q, k, k, LayerCall(0, d**-0.5)).to_dense()[0, 0]  # [nQ, nK]
    assert dense[-1, [9, 11]].all()
    assert dense[6, 3] and dense[6].sum() == 4


@pytest.mark.parametrize(
    "score, t",
    [pytest.param(s, t, id=f"{s}-t{t}") for s in ("value_norm", "observation") for t in (512, 500)],
)
def test_dma_every_row_spends_its_budget(score, t):
    torch.manual_seed(3)
    bs, budget = 32, 5 * 32
    q, k, v = torch.randn(2, 4, t, 32), torch.randn(2, 2, t, 32), torch.randn(2, 2, t, 32)
    method = get_method(
        "dma",
        dense_tail_blocks=0,
        score=score,
        budget=budget,
        sink_tokens=bs,
        local_tokens=2 * bs,
        block_size=bs,
    )
    mask = method.block_mask(q, k, v, LayerCall(0, 32**-0.5))
    counts = mask.to_dense().sum(-1)  # [B, Hkv, nQ]
    reach = mask.reachable().sum(-1)  # [nQ] blocks each row can see
    assert (counts == torch.clamp(reach, max=budget // bs)).all()


# -------------------------------------------------------------------- slow references (materialized)
def _peak_scores_reference(q, k, call, block, probes, dtype=torch.float64):
    """block_topk's scores with the whole [Tq, Tk] logit matrix, one representative at a time; the
    logits rounded to ``dtype`` (the rest in fp64)."""
    (b, hq, tq, d), (_, hkv, tk, _) = q.shape, k.shape
    n_q, n_k, offset = -(-tq // block), -(-tk // block), tk - tq
    real = torch.ones(b, tk, dtype=torch.bool) if call.key_padding_mask is None else call.key_padding_mask
    out = torch.full((b, hq, n_q, n_k), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kk = k[bi, h // (hq // hkv)].double()
            for n in range(n_q):
                rows = list(range(n * block, min((n + 1) * block, tq)))
                live = [i for i in rows if real[bi, offset + i]]
                singles = [min(n * block + (r + 1) * block // probes - 1, rows[-1]) for r in range(probes)]
                reps = [q[bi, h, live].double().mean(0) if live else torch.zeros(d, dtype=torch.float64)]
                reps += [q[bi, h, i].double() for i in singles]
                positions = [offset + i for i in [rows[-1], *singles]]  # the mean sits at the last query
                for rep, pos in zip(reps, positions, strict=True):
                    s = (kk.to(dtype) @ (rep * call.scale).to(dtype)).double()
                    if call.softcap is not None:
                        s = torch.tanh(s / call.softcap) * call.softcap
                    j = torch.arange(tk)
                    seen = (j <= pos) & real[bi]
                    if call.sliding_window is not None:
                        seen &= j > pos - call.sliding_window
                    if not seen.any():
                        continue
                    s = s.masked_fill(~seen, float("-inf"))
                    s = s - s.logsumexp(0)
                    for m in range(n_k):
                        out[bi, h, n, m] = max(out[bi, h, n, m], s[m * block : (m + 1) * block].max())
    return out


@pytest.mark.parametrize(
    "tq, tk, softcap, window, padded",
    [
        pytest.param(75, 100, None, None, False, id="ragged"),
        pytest.param(64, 64, 5.0, None, False, id="softcap"),
        pytest.param(49, 97, None, 40, False, id="window"),
        pytest.param(80, 80, None, None, True, id="left-padding"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_topk_scores_match_the_materialized_reference(
    tq, tk, softcap, window, padded, dtype, monkeypatch
):
    from sparse_llm.backends import block_topk

    monkeypatch.setattr(block_topk, "MAX_SCORES", 512)  # several chunks of query blocks
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, tq, 16) * 2, torch.randn(2, 2, tk, 16)
    padding = None
    if padded:
        padding = torch.ones(2, tk, dtype=torch.bool)
        padding[1, :37] = False
    call = LayerCall(0, 0.25, softcap=softcap, sliding_window=window, key_padding_mask=padding)
    got = block_topk.peak_block_scores(q, k, call, 16, 3, dtype=dtype)
    want = _peak_scores_reference(q, k, call, 16, 3)
    rounded = _peak_scores_reference(q, k, call, 16, 3, dtype=dtype)  # the same logits rounded to dtype
    if padded:  # rows of padding queries are not scored meaningfully: compare the real ones
        got, want, rounded = got[:, :, 3:], want[:, :, 3:], rounded[:, :, 3:]
    assert got.dtype == torch.float32 and got.isneginf().equal(want.isneginf())
    # Twice the error that rounding the logits to dtype gives, plus fp32's rounding of a log-sum-exp.
    finite = want.isfinite()
    bound = 2 * (rounded - want)[finite].abs().max().item() + 1e-4
    assert (got.double() - want)[finite].abs().max().item() <= bound


def _kmeans_reference(x, n_clusters, iterations, seed, valid):
    """spherical_kmeans written plainly: loops for the farthest-point start, one-hot [N, T, C] sums."""
    n, t, _ = x.shape
    c = min(n_clusters, t)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    priority = torch.rand(t, generator=torch.Generator().manual_seed(seed))
    centroids = []
    for i in range(n):
        first = int(valid[i].nonzero()[0])  # priorities count from the first valid row
        relative = priority[(torch.arange(t) - first).clamp_min(0)]
        order = [j for j in relative.argsort(descending=True).tolist() if valid[i, j]]
        chosen = [order[0]]
        while len(chosen) < c:
            closest = (xn[i] @ xn[i, chosen].T).max(-1).values.masked_fill(~valid[i], 3.0)
            chosen.append(int(closest.argmin()))
        centroids.append(xn[i, chosen])
    centroids = torch.stack(centroids)
    for _ in range(iterations):
        members = torch.nn.functional.one_hot((xn @ centroids.transpose(1, 2)).argmax(-1), c).double()
        members = members * valid[..., None]
        sums = members.transpose(1, 2) @ xn
        empty = members.sum(1)[..., None] == 0
        centroids = torch.where(empty, centroids, torch.nn.functional.normalize(sums, dim=-1))
    return centroids, (xn @ centroids.transpose(1, 2)).argmax(-1)


def _routing_reference(q, k, call, block, n_clusters, top_clusters, probes, iterations, seed):
    """routed_block_scores with one-hot membership tensors and a loop over representatives."""
    (b, hq, tq, d), (_, hkv, tk, _) = q.shape, k.shape
    real = torch.ones(b, tk, dtype=torch.bool) if call.key_padding_mask is None else call.key_padding_mask
    valid = real.repeat_interleave(hkv, 0)
    keys = k.flatten(0, 1).double()
    centroids, assign = _kmeans_reference(keys, n_clusters, iterations, seed, valid)
    c, n_q, n_k, offset = centroids.shape[1], -(-tq // block), -(-tk // block), tk - tq
    onehot = torch.nn.functional.one_hot(assign, c).double() * valid[..., None]  # [N, T, C]
    unit = torch.nn.functional.normalize(keys, dim=-1)
    cos = (unit[:, :, None, :] * centroids[:, None]).sum(-1)  # [N, T, C]
    size = onehot.sum(1)  # [N, C]
    typical = centroids * ((onehot * keys.norm(dim=-1)[..., None]).sum(1) / size.clamp_min(1))[..., None]
    blocks = torch.nn.functional.one_hot(torch.arange(tk) // block, n_k).double()  # [T, nK]
    mass = torch.einsum("ntc,tm->nmc", onehot * cos.clamp_min(0), blocks)  # [N, nK, C]
    out = torch.full((b, hq, n_q, n_k), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            i = bi * hkv + h // (hq // hkv)
            for n in range(n_q):
                rows = list(range(n * block, min((n + 1) * block, tq)))
                live = [r for r in rows if real[bi, offset + r]]
                singles = [min(n * block + (r + 1) * block // probes - 1, rows[-1]) for r in range(probes)]
                reps = [q[bi, h, live].double().mean(0) if live else torch.zeros(d, dtype=torch.float64)]
                reps += [q[bi, h, r].double() for r in singles]
                last = offset + rows[-1]
                seen = [m for m in range(n_k) if m * block <= last]  # reachable from some query of the block
                if call.sliding_window is not None:
                    first = offset + rows[0]
                    seen = [m for m in seen if (m + 1) * block - 1 > first - call.sliding_window]
                best = torch.zeros(n_k, dtype=torch.float64)
                for rep in reps:
                    logit = (typical[i] @ rep) * call.scale
                    logit = logit.masked_fill(size[i] == 0, float("-inf"))
                    if top_clusters is not None and top_clusters < c:
                        keep = logit.topk(top_clusters).indices
                        logit = torch.full_like(logit, float("-inf")).index_copy(0, keep, logit[keep])
                    weight = (logit - logit.max()).clamp_min(-80).exp().nan_to_num(0.0)
                    routed = mass[i] @ weight  # [nK]
                    total = routed[seen].sum()
                    if total > 0:
                        best = torch.maximum(best, routed / total)
                out[bi, h, n, seen] = best[seen]
    if top_clusters is not None:
        return out.masked_fill(out == 0, float("-inf"))
    padding_only = ~torch.nn.functional.pad(real, (0, n_k * block - tk)).view(b, 1, 1, n_k, block).any(-1)
    return out.masked_fill(padding_only, float("-inf"))


def _clustered_inputs(tq: int, tk: int, padded: bool):
    """q [2, 4, tq, 16] and k [2, 2, tk, 16] around 5 shared centres; the second row's first 37 keys
    are padding when ``padded`` (key_padding_mask, else None)."""
    torch.manual_seed(6)
    centers = torch.randn(5, 16) * 3
    k = centers[torch.randint(0, 5, (2, 2, tk))] + torch.randn(2, 2, tk, 16)
    q = centers[torch.randint(0, 5, (2, 4, tq))] + torch.randn(2, 4, tq, 16)
    padding = None
    if padded:
        padding = torch.ones(2, tk, dtype=torch.bool)
        padding[1, :37] = False
    return q, k, padding


@pytest.mark.parametrize(
    "tq, tk, top, window, padded",
    [
        pytest.param(96, 96, None, None, False, id="soft"),
        pytest.param(50, 90, 2, None, False, id="top2-ragged"),
        pytest.param(64, 64, None, 24, False, id="window"),
        pytest.param(80, 80, None, None, True, id="left-padding"),
    ],
)
def test_routing_matches_the_one_hot_reference(tq, tk, top, window, padded, monkeypatch):
    from sparse_llm.backends import routing, selection

    monkeypatch.setattr(routing, "MAX_SIMILARITIES", 100)  # several chunks of keys
    # fp32 similarities: the reference's discrete choices (picks, assignments) in exact arithmetic;
    # the bf16 path of a CPU with native bf16 has its own test below
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    q, k, padding = _clustered_inputs(tq, tk, padded)
    call = LayerCall(0, 0.25, sliding_window=window, key_padding_mask=padding)
    kw = dict(n_clusters=7, top_clusters=top, probes=2, iterations=3, seed=1)
    valid = (torch.ones(2, tk, dtype=torch.bool) if padding is None else padding).repeat_interleave(2, 0)
    cent, assign = routing.spherical_kmeans(k.flatten(0, 1), 7, 3, 1, valid)
    cent_ref, assign_ref = _kmeans_reference(k.flatten(0, 1), 7, 3, 1, valid)
    assert assign[valid].equal(assign_ref[valid])
    torch.testing.assert_close(cent.double(), cent_ref, rtol=1e-5, atol=1e-5)
    got = routing.routed_block_scores(q, k, call, block=16, **kw)
    want = _routing_reference(q, k, call, 16, **kw)
    if padded:  # rows of padding queries are not scored meaningfully: compare the real ones
        got, want = got[:, :, 3:], want[:, :, 3:]
    assert got.isneginf().equal(want.isneginf())
    # fp32 shares in [0, 1] against an fp64 reference
    torch.testing.assert_close(
        got.double().nan_to_num(neginf=0), want.nan_to_num(neginf=0), rtol=0, atol=1e-5
    )


def _routing_cell_reference(q, k, call, block, n_clusters, top_clusters, iterations, seed):
    """cell_block_scores in float64 with a loop over query cells, key blocks and key cells."""
    from sparse_llm.backends import routing

    (b, hq, tq, _), (_, hkv, tk, _) = q.shape, k.shape
    g, n_q, n_k, offset = hq // hkv, -(-tq // block), -(-tk // block), tk - tq
    real = torch.ones(b, tk, dtype=torch.bool) if call.key_padding_mask is None else call.key_padding_mask
    valid = real.repeat_interleave(hkv, 0)
    centroids, assign = routing.spherical_kmeans(k.flatten(0, 1), n_clusters, iterations, seed, valid)
    centroids = centroids.double()
    out = torch.full((b, hq, n_q, n_k), float("-inf"), dtype=torch.float64)
    for bi, h in itertools.product(range(b), range(hq)):
        i, keys = bi * hkv + h // g, k[bi, h // g].double()
        members = [valid[i] & (assign[i] == c) for c in range(centroids.shape[1])]
        typical = torch.stack([centroids[i, c] * keys[m].norm(dim=-1).mean() for c, m in enumerate(members)])
        typical = typical.nan_to_num(0.0)
        q_assign = (torch.nn.functional.normalize(q[bi, h].double(), dim=-1) @ centroids[i].T).argmax(-1)
        for n in range(n_q):
            rows = [r for r in range(n * block, min((n + 1) * block, tq)) if real[bi, offset + r]]
            first, last = offset + n * block, offset + min((n + 1) * block, tq) - 1
            seen = [m for m in range(n_k) if m * block <= last]  # reachable from some query of the block
            if call.sliding_window is not None:
                seen = [m for m in seen if (m + 1) * block - 1 > first - call.sliding_window]
            cells = {}  # (key block, cluster) -> keys
            for j in range(min(tk, (seen[-1] + 1) * block) if seen else 0):
                if valid[i, j] and j // block in seen:
                    cells.setdefault((j // block, int(assign[i, j])), []).append(keys[j])
            for c in sorted({int(q_assign[r]) for r in rows}):
                rep = torch.stack([q[bi, h, r].double() for r in rows if q_assign[r] == c]).mean(0)
                rep = rep * call.scale
                routed = range(centroids.shape[1])
                if top_clusters is not None and top_clusters < centroids.shape[1]:
                    empty = torch.tensor([not m.any() for m in members])
                    logit = (typical @ rep).masked_fill(empty, -math.inf)
                    routed = logit.topk(top_clusters).indices.tolist()
                mass = {}
                for (m, cc), ks in cells.items():
                    if cc in routed:
                        logit = rep @ torch.stack(ks).mean(0)
                        if call.softcap is not None:
                            logit = torch.tanh(logit / call.softcap) * call.softcap
                        mass[m] = mass.get(m, 0.0) + math.exp(logit + math.log(len(ks)))
                total = sum(mass.values())
                for m, value in mass.items():
                    out[bi, h, n, m] = max(out[bi, h, n, m], math.log(value / total))
    return out


@pytest.mark.parametrize(
    "tq, tk, top, window, softcap, padded",
    [
        pytest.param(96, 96, None, None, None, False, id="soft"),
        pytest.param(50, 90, 2, None, None, False, id="top2-ragged"),
        pytest.param(64, 64, None, 24, 5.0, False, id="window-softcap"),
        pytest.param(80, 80, None, None, None, True, id="left-padding"),
    ],
)
def test_routing_cells_match_the_loop_reference(tq, tk, top, window, softcap, padded, monkeypatch):
    from sparse_llm.backends import routing, selection

    monkeypatch.setattr(routing, "MAX_SIMILARITIES", 100)  # several chunks of query cells
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)  # as the one-hot test
    q, k, padding = _clustered_inputs(tq, tk, padded)
    call = LayerCall(0, 0.25, softcap=softcap, sliding_window=window, key_padding_mask=padding)
    kw = dict(n_clusters=7, top_clusters=top, iterations=3, seed=1)
    got = routing.cell_block_scores(q, k, call, block=16, **kw)
    want = _routing_cell_reference(q, k, call, 16, **kw)
    assert got.isneginf().equal(want.isneginf())
    # fp32 log shares against a float64 reference
    got, want = got.double().nan_to_num(neginf=0), want.nan_to_num(neginf=0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padding"])
def test_kmeans_with_bf16_similarities_assigns_each_key_a_nearest_centroid(padded, monkeypatch):
    """On a CPU with native bf16 the k-means similarities are bf16 (the sums fp32): every real key
    joins a centroid whose cosine is within bf16 rounding of its best one, centroids are unit norm."""
    from sparse_llm.backends import routing, selection

    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    dtypes = []
    nearest = routing.nearest
    monkeypatch.setattr(routing, "nearest", lambda xn, *a: dtypes.append(xn.dtype) or nearest(xn, *a))
    _, k, padding = _clustered_inputs(8, 300, padded)
    valid = (torch.ones(2, 300, dtype=torch.bool) if padding is None else padding).repeat_interleave(2, 0)
    centroids, assign = routing.spherical_kmeans(k.flatten(0, 1), 7, 3, 1, valid)
    assert set(dtypes) == {torch.bfloat16}
    cos = torch.nn.functional.normalize(k.flatten(0, 1).double(), dim=-1) @ centroids.double().transpose(1, 2)
    chosen = cos.gather(-1, assign[..., None])[..., 0]
    # a bf16 cosine of unit vectors is off by <= 2u (rounded inputs) + u (rounded output), u = 2^-8
    assert (cos.amax(-1) - chosen)[valid].max() <= 2 * 3 * 2**-8
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(4, 7))
    # the farthest-point picks are those of exact arithmetic (the contenders re-scored in fp32)
    picked, _ = routing.spherical_kmeans(k.flatten(0, 1), 7, 0, 1, valid)
    picked_ref, _ = _kmeans_reference(k.flatten(0, 1), 7, 0, 1, valid)
    torch.testing.assert_close(picked.double(), picked_ref, rtol=0, atol=1e-6)


def test_routing_ties_go_to_the_recent_blocks():
    k = torch.ones(1, 1, 512, 16)  # every key alike: every full block has the same routed mass
    q = torch.randn(1, 2, 512, 16, generator=torch.Generator().manual_seed(0))
    method = get_method(
        "routing", dense_tail_blocks=0, budget=4 * 32, sink_tokens=32, local_tokens=32, block_size=32
    )
    dense = method.block_mask(q, k, k, LayerCall(0, 0.25)).to_dense()[0]
    assert dense[:, -1].nonzero()[:, 1].tolist() == [0, 13, 14, 15] * 2
    assert dense[:, 8].nonzero()[:, 1].tolist() == [0, 6, 7, 8] * 2


def test_prefer_late_ties_keeps_the_order_of_distinct_scores():
    from sparse_llm.backends.selection import prefer_late_ties

    inf = float("inf")
    scores = torch.tensor([[0.5, 2.0, 0.5, -inf, 1.0, 0.5], [3.0, 3.0, 3.0, 3.0, -inf, -inf]])
    ranked = prefer_late_ties(scores)
    assert ranked.isneginf().equal(scores.isneginf())
    order = ranked.argsort(-1, descending=True)[:, :4].tolist()
    assert order == [[1, 4, 5, 2], [3, 2, 1, 0]]


@pytest.mark.parametrize("lead", [(1, 1), (2, 3)], ids=["one", "batch-2-heads-3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_nt_equals_matmul_on_a_row_slice_of_keys(lead, dtype):
    from sparse_llm.backends.selection import logits_nt

    torch.manual_seed(0)
    x, y = torch.randn(*lead, 7, 16).to(dtype), torch.randn(*lead, 11, 16).to(dtype)
    got = logits_nt(x, y[..., :9, :])  # the keys a chunk sees: rows of y, as the scorers slice them
    assert got.shape == (*lead, 7, 9) and got.dtype == dtype
    want = x.double() @ y[..., :9, :].double().transpose(-1, -2)
    # Each dot product rounded once to dtype (half an ulp of it) after an fp32 accumulation of 16 terms,
    # whose error the BLAS's summation order sets, bounded by 16 fp32 ulps of the sum of |terms|.
    terms = x.double().abs() @ y[..., :9, :].double().abs().transpose(-1, -2)
    tol = torch.finfo(dtype).eps / 2 * want.abs() + 16 * torch.finfo(torch.float32).eps * terms
    assert ((got.double() - want).abs() <= tol).all()


def test_scoring_dtype_is_bf16_only_for_fp32_on_a_cpu_with_native_bf16(monkeypatch):
    from sparse_llm.backends import selection

    x32 = torch.zeros(2)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda native=native: native)
        assert selection.scoring_dtype(x32) == want
        for dtype in (torch.bfloat16, torch.float16, torch.float64):  # other dtypes score as they are
            assert selection.scoring_dtype(x32.to(dtype)) == dtype


# ------------------------------------------------------------------------------- dhsa: peak picking
def test_dhsa_peak_tie_break_does_not_depend_on_position():
    from sparse_llm.backends.dhsa import pick_peaks

    drop = torch.zeros(1, 6000)
    for start in (100, 5000):
        drop[0, start] = drop[0, start + 5] = 0.5  # equal drops inside one window: the earlier wins
        drop[0, start + 20] = 0.3
        drop[0, start + 32] = 0.3 + 1e-6  # a slightly larger drop later in the window wins
    peaks = pick_peaks(drop, min_chunk=16, n_peaks=10)[0].nonzero().flatten().tolist()
    assert peaks == [100, 132, 5000, 5032]
    # ranking: equal drops far apart go to the earlier one, a larger drop always ranks first
    assert pick_peaks(drop, min_chunk=16, n_peaks=1)[0].nonzero().flatten().tolist() == [100]
    drop[0, 5000] += 1e-6
    assert pick_peaks(drop, min_chunk=16, n_peaks=1)[0].nonzero().flatten().tolist() == [5000]


# ------------------------------------------------------------------------------------ shared checks
@pytest.mark.parametrize("name", BUDGETED)
def test_padding_keys_are_never_selected(name):
    torch.manual_seed(4)
    t, d, bs = 512, 32, 32
    q, k, v = torch.randn(2, 4, t, d), torch.randn(2, 2, t, d), torch.randn(2, 2, t, d)
    k[1, :, :100] = q[1, :, -1:].mean(0, keepdim=True) * 5  # padding keys that every query would pick
    v[1, :, :100] *= 100
    padding = torch.ones(2, t, dtype=torch.bool)
    padding[1, :100] = False
    method = budget_only(name, budget=6 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs)
    dense = method.block_mask(q, k, v, LayerCall(0, d**-0.5, key_padding_mask=padding)).to_dense()
    rows = dense[1 if dense.shape[0] > 1 else 0, :, 4:-1]  # real query blocks (the last may be dense)
    assert not rows[..., :3].any()  # blocks 0-2 hold padding only


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("block_topk", "routing")])
@pytest.mark.parametrize("probes", [pytest.param(p, id=repr(p)) for p in (-1, 65, 1.5, True)])
def test_bad_probes(name, probes):
    with pytest.raises(ValueError, match="probes must be"):
        get_method(name, probes=probes, block_size=64)


# ------------------------------------------------------------- left padding: each row as its single run
@pytest.mark.parametrize(
    "name, params",
    [
        pytest.param("routing", {}, id="routing"),  # cells, 12 clusters in each row
        pytest.param("routing", dict(n_clusters=200), id="routing-200"),  # the padded row: 160, every key
        pytest.param("routing", dict(n_clusters=12, top_clusters=3), id="routing-top3"),
        pytest.param("routing", dict(summary="cluster"), id="routing-cluster"),  # round(sqrt(real keys))
        pytest.param("dhsa", dict(chunking="dynamic"), id="dhsa-dynamic"),  # real keys // chunk_size - 1
        pytest.param("dhsa", dict(chunk_size=40), id="dhsa-fixed-40"),  # pad 96: not a multiple of 40
    ],
)
def test_left_padded_row_selects_the_blocks_of_its_unpadded_run(name, params):
    """Batch of two (256 tokens; 160 tokens left-padded by 96 = 6 whole blocks, padding keys that
    every query would like): each row's mask equals its single run's, shifted by the padding."""
    gen = torch.Generator().manual_seed(7)
    t, pad, d, bs = 256, 96, 32, 16
    q, k, v = (torch.randn(2, h, t, d, generator=gen) for h in (4, 2, 2))
    k[1, :, :pad] = q[1, :, -1:].mean(0, keepdim=True) * 3
    padding = torch.ones(2, t, dtype=torch.bool)
    padding[1, :pad] = False
    method = get_method(name, **params, budget=6 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs)
    batched = method.block_mask(q, k, v, LayerCall(0, d**-0.5, key_padding_mask=padding)).to_dense()
    assert batched.shape[0] == 2
    singles = [
        method.block_mask(*(x[i : i + 1, :, p:] for x in (q, k, v)), LayerCall(0, d**-0.5))
        for i, p in ((0, 0), (1, pad))
    ]
    shift = pad // bs
    assert batched[0].equal(singles[0].to_dense()[0])
    assert batched[1, :, shift:, shift:].equal(singles[1].to_dense()[0])
    assert not batched[1, :, shift:, :shift].any()  # real queries select no padding block
    assert singles[1].density() < 1  # really sparse, so the comparison means something
