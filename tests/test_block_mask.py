"""BlockMask builders vs a slow elementwise oracle (attention-gym's to_dense() equality pattern)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparse_llm.kernels import BlockMask


def element_allowed(q_len, kv_len, causal=True, window=None) -> torch.Tensor:
    """bool [Tq, Tk], written from the definition: query i sits at kv_len - q_len + i."""
    allowed = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = kv_len - q_len + i
        for j in range(kv_len):
            ok = (j <= p) if causal else True
            if window is not None:
                ok = ok and j > p - window
            allowed[i, j] = ok
    return allowed


def oracle_blocks(q_len, kv_len, block_q, block_k, causal=True, window=None):
    """(reachable, full) bool [nQ, nK] by looking at every element of every block."""
    allowed = element_allowed(q_len, kv_len, causal, window)
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    reach = torch.zeros(n_q, n_k, dtype=torch.bool)
    full = torch.zeros(n_q, n_k, dtype=torch.bool)
    for n in range(n_q):
        for m in range(n_k):
            tile = allowed[n * block_q : (n + 1) * block_q, m * block_k : (m + 1) * block_k]
            reach[n, m], full[n, m] = tile.any(), tile.all()
    return reach, full


def partial_and_full(mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    def dense(num, idx):
        out = torch.zeros(*num.shape, mask.num_kv_blocks, dtype=torch.bool)
        for row in range(num.numel()):
            b, h, n = torch.unravel_index(torch.tensor(row), num.shape)
            out[b, h, n, idx[b, h, n, : num[b, h, n]].long()] = True
        return out

    return dense(mask.kv_num_blocks, mask.kv_indices), dense(mask.full_kv_num_blocks, mask.full_kv_indices)


GEOMETRIES = [
    pytest.param(dict(q_len=1, kv_len=77, block_q=16, block_k=16), id="decode"),
    pytest.param(dict(q_len=63, kv_len=63, block_q=16, block_k=16), id="square-63"),
    pytest.param(dict(q_len=113, kv_len=203, block_q=32, block_k=16), id="tq113-tk203"),
    pytest.param(dict(q_len=100, kv_len=130, block_q=16, block_k=64), id="wide-kblocks"),
    pytest.param(dict(q_len=40, kv_len=90, block_q=8, block_k=8, window=20), id="window20"),
    pytest.param(dict(q_len=70, kv_len=70, block_q=16, block_k=32, window=5), id="window5"),
    pytest.param(dict(q_len=50, kv_len=120, block_q=16, block_k=16, causal=False), id="noncausal"),
]


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_from_dense_keeps_reachable_blocks_and_classifies_full_vs_partial(geo):
    geo = dict(geo)
    causal, window = geo.pop("causal", True), geo.pop("window", None)
    n_q, n_k = -(-geo["q_len"] // geo["block_q"]), -(-geo["kv_len"] // geo["block_k"])
    selected = torch.rand(2, 3, n_q, n_k, generator=torch.Generator().manual_seed(0)) < 0.6
    mask = BlockMask.from_dense(selected, **geo, causal=causal, sliding_window=window).validate()
    reach, full = oracle_blocks(**geo, causal=causal, window=window)
    partial_blocks, full_blocks = partial_and_full(mask)
    assert torch.equal(mask.to_dense(), selected & reach)
    assert torch.equal(full_blocks, selected & full)
    assert torch.equal(partial_blocks, selected & reach & ~full)
    assert mask.kv_indices.dtype == torch.int32 and mask.kv_num_blocks.shape == (2, 3, n_q)


@pytest.mark.parametrize("geo", GEOMETRIES[:6])
def test_causal_selects_every_reachable_block_with_density_one(geo):
    geo = dict(geo)
    window = geo.pop("window", None)
    mask = BlockMask.causal(**geo, batch=2, heads=2, sliding_window=window).validate()
    reach, full = oracle_blocks(**geo, window=window)
    assert torch.equal(mask.to_dense(), reach.expand(2, 2, *reach.shape))
    assert torch.equal(partial_and_full(mask)[1][0, 0], full)
    assert mask.density() == 1.0
    assert mask.num_selected_blocks == 4 * int(reach.sum())


def sink_window_oracle(q_len, kv_len, block_q, block_k, sink, local, window=None):
    """Key-level sets, then 'block overlaps the set', then intersect with reachability."""
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for n in range(n_q):
        q_end = kv_len - q_len + min((n + 1) * block_q, q_len) - 1
        keys = [j for j in range(kv_len) if j < sink or q_end - local < j <= q_end]
        for j in keys:
            out[n, j // block_k] = True
    return out & oracle_blocks(q_len, kv_len, block_q, block_k, window=window)[0]


@pytest.mark.parametrize(
    "geo,sink,local",
    [
        pytest.param(dict(q_len=200, kv_len=200, block_q=16, block_k=16), 16, 32, id="aligned"),
        pytest.param(dict(q_len=113, kv_len=300, block_q=32, block_k=16), 5, 40, id="rounded-up"),
        pytest.param(dict(q_len=1, kv_len=90, block_q=16, block_k=8), 0, 17, id="decode-no-sink"),
        pytest.param(dict(q_len=64, kv_len=64, block_q=16, block_k=16), 8, 0, id="sink-only"),
        pytest.param(dict(q_len=90, kv_len=150, block_q=16, block_k=16, window=40), 16, 64, id="window"),
    ],
)
def test_sink_window_matches_keywise_oracle(geo, sink, local):
    geo = dict(geo)
    window = geo.pop("window", None)
    mask = BlockMask.sink_window(**geo, sink_tokens=sink, local_tokens=local, heads=2, sliding_window=window)
    expected = sink_window_oracle(**geo, sink=sink, local=local, window=window)
    assert torch.equal(mask.validate().to_dense(), expected.expand(1, 2, *expected.shape))
    reach = oracle_blocks(**geo, window=window)[0]
    assert mask.density() == pytest.approx(expected.sum().item() / reach.sum().item())


def test_from_topk_picks_highest_scores_with_low_index_ties():
    geo = dict(q_len=64, kv_len=96, block_q=16, block_k=16)
    scores = torch.randn(1, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    scores[0, 0, 3] = 1.0  # all tied: lowest indices win
    mask = BlockMask.from_topk(scores, 2, **geo).validate()
    reach = oracle_blocks(**geo)[0]
    dense = mask.to_dense()
    for h in range(2):
        for n in range(4):
            order = sorted(
                (m for m in range(6) if reach[n, m]), key=lambda m: (-scores[0, h, n, m].item(), m)
            )
            assert dense[0, h, n].nonzero().flatten().tolist() == sorted(order[:2])
    assert dense[0, 0, 3].nonzero().flatten().tolist() == [0, 1]


def test_empty_mask_has_zero_density_and_one_index_column():
    mask = BlockMask.from_dense(
        torch.zeros(1, 1, 2, 3, dtype=torch.bool), q_len=32, kv_len=48, block_q=16, block_k=16
    )
    assert mask.density() == 0.0 and mask.num_selected_blocks == 0
    assert mask.kv_indices.shape == (1, 1, 2, 1) and mask.full_kv_indices.shape == (1, 1, 2, 1)


def test_split_groups_partitions_the_selection_and_keeps_full_blocks():
    geo = dict(q_len=150, kv_len=290, block_q=32, block_k=16)
    dense = torch.rand(2, 4, 5, 19, generator=torch.Generator().manual_seed(0)) < 0.4
    dense[:, :, :, :2] = True  # sinks in every head
    mask = BlockMask.from_dense(dense, **geo)
    shared, rest = mask.split_groups(2)
    assert shared.shape[:2] == (2, 2) and rest.shape[:2] == (2, 4)
    wide = shared.to_dense().repeat_interleave(2, 1)
    assert torch.equal(wide, mask.to_dense().unflatten(1, (2, 2)).all(2).repeat_interleave(2, 1))
    assert torch.equal(wide | rest.to_dense(), mask.to_dense()) and not (wide & rest.to_dense()).any()
    full = _full_blocks(mask)
    assert full.any() and (~full & mask.to_dense()).any()
    assert torch.equal(_full_blocks(shared).repeat_interleave(2, 1), full & wide)
    assert torch.equal(_full_blocks(rest), full & rest.to_dense())
    shared.validate(), rest.validate()
    assert mask.split_groups(1)[1].num_selected_blocks == 0
    with pytest.raises(ValueError, match="group"):
        mask.split_groups(3)


def _full_blocks(mask: BlockMask) -> torch.Tensor:
    """bool [B, H, nQ, nK]: the mask's full blocks."""
    return replace(mask, kv_num_blocks=torch.zeros_like(mask.kv_num_blocks)).to_dense()


def test_as_partial_keeps_the_selection():
    mask = BlockMask.causal(q_len=100, kv_len=100, block_q=16, block_k=16)
    partial = mask.as_partial()
    assert torch.equal(partial.to_dense(), mask.to_dense())
    assert partial.full_kv_num_blocks.sum() == 0


def test_to_string_repr_and_to():
    mask = BlockMask.sink_window(q_len=64, kv_len=64, block_q=16, block_k=16, sink_tokens=16, local_tokens=16)
    assert mask.to_string().splitlines() == ["+   ", "#+  ", "#.+ ", "#..+"]
    assert "density=" in repr(mask) and "block_q=16" in repr(mask)
    moved = mask.to("cpu")
    assert torch.equal(moved.to_dense(), mask.to_dense()) and moved.device.type == "cpu"


# ----------------------------------------------------------------------------- validation
def _rows(*idx):
    return torch.tensor([[list(idx)]], dtype=torch.int32).view(1, 1, 1, -1)


def _mask(part_idx, part_num, full_idx=(0,), full_num=0, **geo):
    geo = {"block_q": 16, "block_k": 16, "q_len": 16, "kv_len": 64, **geo}
    return BlockMask(
        torch.tensor([[[part_num]]], dtype=torch.int32),
        _rows(*part_idx),
        torch.tensor([[[full_num]]], dtype=torch.int32),
        _rows(*full_idx),
        **geo,
    )


@pytest.mark.parametrize(
    "mask_args,match",
    [
        pytest.param(((3, 1), 2), "strictly ascending", id="unsorted"),
        pytest.param(((2, 2), 2), "strictly ascending", id="duplicate"),
        pytest.param(((7,), 1), "indices must lie in", id="out-of-range"),
        pytest.param(((0,), 2), "counts must lie in", id="count-too-big"),
        pytest.param(((3,), 1, (3,), 1), "both partial and full", id="overlap"),
        pytest.param(((0,), 0, (3,), 1), "needs an element mask", id="diagonal-listed-full"),
    ],
)
def test_validate_rejects_broken_masks(mask_args, match):
    with pytest.raises(ValueError, match=match):
        _mask(*mask_args).validate()


def test_validate_rejects_unreachable_blocks():
    # queries at 48..63 with a 4-token window cannot see block 0 (keys 0..15)
    with pytest.raises(ValueError, match="fully masked by the causal/window geometry"):
        _mask((0,), 1, sliding_window=4).validate()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        pytest.param(dict(block_q=12), ValueError, "power of two", id="block-not-pow2"),
        pytest.param(dict(block_k=-16), ValueError, "power of two", id="block-negative"),
        pytest.param(dict(block_q=16.0), TypeError, "must be an int", id="block-float"),
        pytest.param(dict(q_len=80), ValueError, "q_len \\(80\\) must be <= kv_len", id="tq-gt-tk"),
        pytest.param(dict(q_len=0), ValueError, "q_len must be a positive int", id="empty"),
        pytest.param(
            dict(sliding_window=0), ValueError, "sliding_window must be None or an int >= 1", id="window0"
        ),
    ],
)
def test_constructors_reject_bad_geometry(kwargs, error, match):
    geo = {"q_len": 64, "kv_len": 64, "block_q": 16, "block_k": 16, **kwargs}
    with pytest.raises(error, match=match):
        BlockMask.causal(**geo)


def test_from_dense_rejects_shape_and_dtype_mismatch():
    geo = dict(q_len=64, kv_len=64, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="expected \\[B, H, 4, 4\\]"):
        BlockMask.from_dense(torch.ones(1, 1, 4, 5, dtype=torch.bool), **geo)
    with pytest.raises(TypeError, match="bool tensor"):
        BlockMask.from_dense(torch.ones(1, 1, 4, 4), **geo)


def test_direct_construction_checks_dtypes_and_shapes():
    good = BlockMask.causal(q_len=64, kv_len=64, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="int32 tensor"):
        BlockMask(
            good.kv_num_blocks.long(),
            good.kv_indices,
            good.full_kv_num_blocks,
            good.full_kv_indices,
            16,
            16,
            64,
            64,
        )
    with pytest.raises(ValueError, match="expected \\(1, 1, 4\\)"):
        BlockMask(
            good.kv_num_blocks[..., :3],
            good.kv_indices[..., :3, :],
            good.full_kv_num_blocks,
            good.full_kv_indices,
            16,
            16,
            64,
            64,
        )


class _CountTorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _torch_calls(build, tokens: int) -> int:
    with _CountTorchCalls() as counter:
        build(tokens)
    return counter.calls


def _scores(tokens: int) -> torch.Tensor:
    n = tokens // 128
    return torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0))


BUILDERS = {
    "causal": lambda t: BlockMask.causal(q_len=t, kv_len=t, block_q=128, block_k=128),
    "sink_window": lambda t: BlockMask.sink_window(
        q_len=t, kv_len=t, block_q=128, block_k=128, sink_tokens=128, local_tokens=4096, sliding_window=8192
    ),
    "from_dense": lambda t: BlockMask.from_dense(_scores(t) > 1, block_q=128, block_k=128, q_len=t, kv_len=t),
    "from_topk": lambda t: BlockMask.from_topk(_scores(t), 8, block_q=128, block_k=128, q_len=t, kv_len=t),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_are_vectorized_at_long_context(name):
    """The torch calls a builder makes do not grow with the number of blocks (no per-block Python loop,
    which at 128K tokens in 128-token blocks, 1024 x 1024 blocks, would take minutes): the same count
    at 2K tokens as at 128K. Counting calls instead of timing them keeps the test independent of the
    machine's load."""
    build = BUILDERS[name]
    assert _torch_calls(build, 131072) == _torch_calls(build, 2048)
    assert build(131072).kv_num_blocks.shape[-1] == 1024
