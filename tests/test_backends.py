"""Selection of the built-in methods, checked on hand-built inputs against obvious expectations."""

from __future__ import annotations

import pytest
import torch

from sparse_llm.backends import LayerCall, get_method
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
    method = get_method("block_topk", budget=5 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs)
    mask = method.block_mask(q, k, k, LayerCall(0, d**-0.5))
    last = mask.to_dense()[0, :, -1]  # [Hkv, nK]
    n_k = t // bs
    assert last[0, 5] and last[0, 0] and last[0, n_k - 2 :].all()
    assert last.sum(-1).tolist() == [5, 5]  # budget / block_size blocks per query block
    # query block n reaches n + 1 blocks and keeps min(n + 1, 5) of them
    assert mask.density() == pytest.approx(sum(min(n + 1, 5) for n in range(n_k)) / sum(range(1, n_k + 1)))


def test_block_topk_budget_must_cover_the_forced_blocks():
    with pytest.raises(ValueError, match="must cover sink_tokens"):
        get_method("block_topk", budget=256, sink_tokens=128, local_tokens=512)


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
    method = get_method("dma", budget=4 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs)
    dense = method.block_mask(q, k, v, LayerCall(0, 0.125)).to_dense()[0]  # [Hkv, nQ, nK]
    assert dense[0, 7:, 7].all()  # every query block that can see block 7 attends it
    # one key set per head: away from the sink and local blocks, all late rows pick the same blocks
    rows = dense[:, 12:, 1:10]
    assert (rows == rows[:, :1]).all()
    assert dense.sum(-1).max() <= 4  # budget / block_size blocks per query block


def test_dma_observation_picks_the_keys_the_last_queries_attend():
    q, k, v = _planted(seed=1)
    bs = 32
    direction = torch.randn(64) * 3
    q[:, 2:4, -16:] += direction  # the last queries of group 1 ...
    k[:, 1, 5 * bs + 3] += direction  # ... look at one key in block 5 of KV head 1
    method = get_method(
        "dma", score="observation", window=16, budget=3 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs
    )
    dense = method.block_mask(q, k, v, LayerCall(0, 64**-0.5)).to_dense()[0]
    assert dense[1, -1, 5] and dense[1, 5:, 5].all()


def test_dma_skips_padding_keys():
    q, k, v = _planted(seed=2)
    v[:, :, :64] *= 100  # huge values, but they are padding
    padding = torch.ones(1, 512, dtype=torch.bool)
    padding[:, :64] = False
    method = get_method("dma", budget=128, sink_tokens=32, local_tokens=32, block_size=32)
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


@pytest.mark.parametrize(
    "params, match",
    [
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


SELECTION = ["block_topk", "dma", "routing", "dhsa"]


@pytest.mark.parametrize("name", SELECTION)
def test_achieved_budget_is_within_ten_percent(name):
    torch.manual_seed(0)
    bs, t, d, budget = 32, 2048, 32, 512
    q, k, v = torch.randn(2, 4, t, d), torch.randn(2, 2, t, d), torch.randn(2, 2, t, d)
    method = get_method(name, budget=budget, sink_tokens=32, local_tokens=128, block_size=bs)
    dense = method.block_mask(q, k, v, LayerCall(0, d**-0.5)).to_dense()
    # The last query block can see every key, so it must spend the budget, never more.
    tokens = dense[..., -2, :].sum(-1).float() * bs  # [B, H]; -2: dhsa keeps the last block dense
    assert (tokens <= budget).all()
    assert (tokens >= 0.9 * budget).all(), tokens


@pytest.mark.parametrize("name", SELECTION)
def test_budget_above_the_context_is_clamped_with_one_warning(name, caplog):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 1, 128, 16)
    method = get_method(name, budget=256, sink_tokens=16, local_tokens=16, block_size=16)
    with caplog.at_level("WARNING", logger="sparse_llm.backends.base"):
        for _ in range(3):  # one warning per method object, not one per layer call
            mask = method.block_mask(q, k, k, LayerCall(0, 0.25))
    assert mask.density() == 1.0
    warnings = [r for r in caplog.records if "budget 256 >= context length 128" in r.getMessage()]
    assert len(warnings) == 1
    caplog.clear()
    get_method(name, budget=64, sink_tokens=16, local_tokens=16, block_size=16).block_mask(
        q, k, k, LayerCall(0, 0.25)
    )
    assert not caplog.records
