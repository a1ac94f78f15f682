"""``neighborhood`` against a plain element-mask reference, its blocks, and the BlockMask key rule.

The reference is written from the method's definition, one query and key at a time: positions count
from the row's first real token, queries in groups of ``stride`` share the ``window`` (+ ``halo``)
keys ending at the group's last query, each query sees them up to itself, and the first
``sink_tokens`` real tokens are always kept. Attention over that element mask is computed densely in
float64 (truth) and float32 (PyTorch's own error), and the method's output must meet the tolerance
rule (tests/attention_cases.py).
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import BASE, assert_within_rule, build, check_attention, params

import sparse_llm
from sparse_llm.backends import LayerCall
from sparse_llm.kernels import BlockMask, block_sparse_attention
from sparse_llm.kernels import cpu as cpu_kernel
from sparse_llm.kernels.block_mask import block_geometry
from sparse_llm.kernels.reference import element_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def element_pattern(window, stride, sink_tokens, q_len, kv_len, start=0, halo=0) -> torch.Tensor:
    """bool [Tq, Tk] from the definition; ``start`` is the row's first real key (left padding)."""
    allowed = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = kv_len - q_len + i
        if p < start:
            continue  # a padding query attends nothing
        group_end = start + ((p - start) // stride) * stride + stride - 1
        for j in range(start, p + 1):
            in_window = j > group_end - window - halo
            allowed[i, j] = in_window or j < start + sink_tokens
    return allowed


def naive_attention(q, k, v, allowed, scale):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], allowed bool [B, Tq, Tk]; K/V repeated (test only)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def listed_full(mask: BlockMask) -> torch.Tensor:
    """bool [B, nQ, nK]: the blocks head row 0 of ``mask`` lists as full."""
    b, _, n_q, n_k = mask.shape
    out = torch.zeros(b, n_q, n_k, dtype=torch.bool)
    for row in range(b):
        for n in range(n_q):
            out[row, n, mask.full_kv_indices[row, 0, n, : mask.full_kv_num_blocks[row, 0, n]].long()] = True
    return out


# (params, q_len, kv_len, Hq, Hkv, left_pad): odd lengths, GQA/MQA, padding, decode, chunks
MODES = {
    "sliding": dict(window=37, stride=1, sink_tokens=5),
    "sliding-nosink": dict(window=50, stride=1, sink_tokens=0),
    "strided": dict(window=40, stride=7, sink_tokens=3),
    "strided-aligned": dict(window=64, stride=32, sink_tokens=16),
    "blocked": dict(window=24, stride=24, sink_tokens=0),
    "blocked-halo": dict(window=24, stride=24, halo=9, sink_tokens=4),
}
SHAPES = {
    "square113": (113, 113, 4, 2, ()),
    "mqa203": (203, 203, 4, 1, ()),
    "pad": (150, 150, 4, 2, (0, 29)),
    "decode": (1, 77, 4, 2, ()),
    "decode-pad": (1, 90, 2, 1, (0, 13)),
    "chunk": (50, 203, 4, 2, ()),
    "chunk-pad": (64, 180, 2, 2, (21, 0)),
}
CASES = [
    pytest.param(mode, shape, block, id=f"{mode}-{shape}-bs{block}")
    for mode in MODES
    for shape in SHAPES
    for block in (16, 32)
    if block == 16 or shape in ("square113", "pad")
]


def inputs(shape: str, seed: int = 0):
    q_len, kv_len, hq, hkv, pads = SHAPES[shape]
    b = max(len(pads), 1)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, h, t, 32, generator=gen) for h, t in ((hq, q_len), (hkv, kv_len), (hkv, kv_len))
    )
    kpm = None
    if pads:
        kpm = torch.ones(b, kv_len, dtype=torch.bool)
        for row, pad in enumerate(pads):
            kpm[row, :pad] = False
    return q, k, v, kpm, [pads[r] if pads else 0 for r in range(b)]


@pytest.mark.parametrize("mode, shape, block", CASES)
def test_output_equals_the_element_mask_reference(mode, shape, block):
    q, k, v, kpm, starts = inputs(shape)
    method = sparse_llm.get_method("neighborhood", block_size=block, **MODES[mode])
    call = LayerCall(0, 32**-0.5, key_padding_mask=kpm)
    out, mask = method.attend(q, k, v, call)
    mask.validate()
    allowed = torch.stack(
        [element_pattern(**MODES[mode], q_len=q.shape[2], kv_len=k.shape[2], start=s) for s in starts]
    )
    truth = naive_attention(q.double(), k.double(), v.double(), allowed, call.scale)
    pt = naive_attention(q, k, v, allowed, call.scale)
    real = allowed.any(-1)  # padding queries (no key) are not compared: their rows are 0 in both
    assert torch.isfinite(out).all()
    sel = real[:, None, :, None].expand_as(out)
    assert_within_rule("out", out[sel], truth[sel], pt[sel], 2.0)


@pytest.mark.parametrize("mode, shape, block", CASES)
def test_blocks_are_the_pattern_blocks_and_full_exactly_where_no_element_is_masked(mode, shape, block):
    q, k, v, kpm, starts = inputs(shape)
    method = sparse_llm.get_method("neighborhood", block_size=block, **MODES[mode])
    mask = method.block_mask(q, k, v, LayerCall(0, 1.0, key_padding_mask=kpm))
    q_len, kv_len = q.shape[2], k.shape[2]
    n_q, n_k = -(-q_len // block), -(-kv_len // block)
    for row, start in enumerate(starts):
        allowed = element_pattern(**MODES[mode], q_len=q_len, kv_len=kv_len, start=start)
        tiles = torch.nn.functional.pad(allowed, (0, n_k * block - kv_len, 0, n_q * block - q_len))
        tiles = tiles.view(n_q, block, n_k, block)
        b = min(row, mask.shape[0] - 1)
        assert torch.equal(mask.to_dense()[b, 0], tiles.any(-1).any(1)), "selected blocks != pattern blocks"
        if start == 0:  # full: every pair of the block's real (query, key) positions allowed
            valid = torch.zeros(n_q * block, n_k * block, dtype=torch.bool)
            valid[:q_len, :kv_len] = True
            valid = valid.view(n_q, block, n_k, block)
            full = (tiles | ~valid).all(-1).all(1) & tiles.any(-1).any(1)
            assert torch.equal(listed_full(mask)[b], full)


@pytest.mark.parametrize(
    "params, q_len, kv_len",
    [
        pytest.param(dict(window=64, stride=32, sink_tokens=16), 160, 160, id="strided-prefill"),
        pytest.param(dict(window=48, stride=48, sink_tokens=0), 160, 160, id="blocked"),
        pytest.param(dict(window=32, stride=32, halo=16, sink_tokens=32), 160, 160, id="blocked-halo"),
        pytest.param(dict(window=64, stride=16, sink_tokens=16), 64, 160, id="strided-chunk"),
        pytest.param(dict(window=64, stride=16, sink_tokens=16), 1, 160, id="decode"),
    ],
)
def test_block_aligned_configurations_have_no_partial_block_off_the_causal_diagonal(params, q_len, kv_len):
    method = sparse_llm.get_method("neighborhood", block_size=16, **params)
    q, k = torch.randn(1, 2, q_len, 8), torch.randn(1, 1, kv_len, 8)
    mask = method.block_mask(q, k, k, LayerCall(0, 1.0)).validate()
    reach, full = block_geometry(q_len=q_len, kv_len=kv_len, block_q=16, block_k=16)
    partial = mask.to_dense()[0, 0] & ~listed_full(mask)[0]
    assert torch.equal(partial, mask.to_dense()[0, 0] & reach & ~full)  # the causal diagonal only
    assert mask.full_kv_num_blocks.sum() > 0 and mask.density() < 1


def test_non_aligned_configurations_have_partial_blocks_off_the_diagonal():
    method = sparse_llm.get_method("neighborhood", block_size=16, window=40, stride=8, sink_tokens=4)
    q = torch.randn(1, 1, 160, 8)
    mask = method.block_mask(q, q, q, LayerCall(0, 1.0))
    assert (mask.kv_num_blocks[0, 0, 3:] >= 2).all()  # the window's first block and the diagonal


def test_stride_one_is_the_sliding_window_and_blocked_mode_has_no_overlap():
    sliding = element_pattern(window=10, stride=1, halo=0, sink_tokens=0, q_len=40, kv_len=40)
    i, j = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    assert torch.equal(sliding, (j <= i) & (j > i - 10))
    blocked = element_pattern(window=8, stride=8, halo=0, sink_tokens=0, q_len=40, kv_len=40)
    assert torch.equal(blocked, (j <= i) & (j // 8 == i // 8))
    halo = element_pattern(window=8, stride=8, halo=3, sink_tokens=0, q_len=40, kv_len=40)
    assert torch.equal(halo, (j <= i) & (j >= (i // 8) * 8 - 3))


def test_exact_setting_is_dense_and_carries_no_key_rule():
    method = sparse_llm.get_method("neighborhood", block_size=16, window=1 << 20)
    q = torch.randn(1, 1, 100, 8)
    mask = method.block_mask(q, q, q, LayerCall(0, 1.0))
    assert mask.window_start is None and mask.density() == 1.0


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(window=0), "window"),
        (dict(window=16, stride=32), "stride"),
        (dict(window=32, stride=8, halo=4), "halo"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(halo=1.5, window=8, stride=8), "halo"),
        (dict(stride=True), "stride"),
    ],
)
def test_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        sparse_llm.get_method("neighborhood", **params)


# ----------------------------------------------------------------- the BlockMask key rule


def rule_oracle(window_start, sink_end, q_len, kv_len, block):
    """(reachable, full) bool [B', nQ, nK] over the elements: causal and the key rule."""
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    allowed = (j <= pos) & ((j >= window_start[:, :, None]) | (j < sink_end[:, None, None]))
    n_q, n_k = -(-q_len // block), -(-kv_len // block)
    reach = torch.zeros(allowed.shape[0], n_q, n_k, dtype=torch.bool)
    full = torch.zeros_like(reach)
    for n in range(n_q):
        for m in range(n_k):
            tile = allowed[:, n * block : (n + 1) * block, m * block : (m + 1) * block]
            reach[:, n, m], full[:, n, m] = tile.flatten(1).any(1), tile.flatten(1).all(1)
    return reach, full


@pytest.mark.parametrize("q_len, kv_len", [(70, 70), (33, 101), (1, 50)])
def test_from_dense_with_a_key_rule_matches_the_element_oracle(q_len, kv_len):
    gen = torch.Generator().manual_seed(q_len)
    window_start = torch.randint(-10, kv_len, (2, q_len), generator=gen, dtype=torch.int32)
    sink_end = torch.tensor([0, 13], dtype=torch.int32)
    every = torch.ones(2, 1, -(-q_len // 16), -(-kv_len // 16), dtype=torch.bool)
    mask = BlockMask.from_dense(
        every,
        block_q=16,
        block_k=16,
        q_len=q_len,
        kv_len=kv_len,
        window_start=window_start,
        sink_end=sink_end,
    ).validate()
    reach, full = rule_oracle(window_start, sink_end, q_len, kv_len, 16)
    dense = mask.to_dense()[:, 0]
    assert torch.equal(listed_full(mask), full)
    assert not (reach & ~dense).any(), "a block with an allowed pair was dropped"
    # kept blocks without an allowed pair: only those no single query block masks wholly (conservative)
    assert (dense & ~reach).sum() <= dense.sum() // 4


def test_key_rule_that_masks_nothing_is_left_out_and_kept_by_as_partial_and_to():
    every = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    geo = dict(block_q=16, block_k=16, q_len=64, kv_len=64)
    noop = BlockMask.from_dense(
        every,
        **geo,
        window_start=torch.full((1, 64), 3, dtype=torch.int32),
        sink_end=torch.tensor([5], dtype=torch.int32),
    )
    assert noop.window_start is None
    ws = (torch.arange(64) - 20).to(torch.int32)[None]
    mask = BlockMask.from_dense(every, **geo, window_start=ws, sink_end=torch.tensor([4], dtype=torch.int32))
    for other in (mask.as_partial(), mask.to("cpu")):
        assert torch.equal(other.window_start, ws) and torch.equal(other.sink_end, mask.sink_end)
    assert "key rule" in repr(mask)


def test_validate_rejects_a_full_block_the_key_rule_cuts():
    geo = dict(block_q=16, block_k=16, q_len=64, kv_len=64)
    plain = BlockMask.causal(**geo)
    ws = (torch.arange(64) - 20).to(torch.int32)[None]
    cut = BlockMask(
        plain.kv_num_blocks,
        plain.kv_indices,
        plain.full_kv_num_blocks,
        plain.full_kv_indices,
        16,
        16,
        64,
        64,
        True,
        None,
        ws,
        torch.tensor([0], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="full"):
        cut.validate()


@pytest.mark.parametrize(
    "rule, match",
    [
        (dict(window_start=torch.zeros(1, 64, dtype=torch.int32)), "together"),
        (
            dict(
                window_start=torch.zeros(1, 64, dtype=torch.int64), sink_end=torch.zeros(1, dtype=torch.int32)
            ),
            "int32",
        ),
        (
            dict(
                window_start=torch.zeros(1, 63, dtype=torch.int32), sink_end=torch.zeros(1, dtype=torch.int32)
            ),
            "shape",
        ),
        (
            dict(
                window_start=torch.zeros(3, 64, dtype=torch.int32), sink_end=torch.zeros(3, dtype=torch.int32)
            ),
            "batch",
        ),
        (
            dict(
                window_start=torch.ones(1, 64, dtype=torch.int32),
                sink_end=torch.zeros(1, dtype=torch.int32),
                causal=False,
            ),
            "causal",
        ),
    ],
)
def test_key_rule_is_validated(rule, match):
    every = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        BlockMask.from_dense(every, block_q=16, block_k=16, q_len=64, kv_len=64, **rule)


def test_kernel_rejects_a_key_rule_without_causal():
    q = torch.randn(1, 1, 64, 8)
    ws = (torch.arange(64) - 20).to(torch.int32)[None]
    mask = BlockMask.from_dense(
        torch.ones(1, 1, 4, 4, dtype=torch.bool),
        block_q=16,
        block_k=16,
        q_len=64,
        kv_len=64,
        window_start=ws,
        sink_end=torch.tensor([2], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="causal"):
        block_sparse_attention(q, q, q, mask, causal=False)


# The CPU path's other routes with a key rule: strided views (sink + window rows), per-query-head
# masks, key padding and Tq < Tk; and the matmul path without ATen's fused op.
RULE_CASES = [
    BASE.but(key_rule=True, mask="sink", tq=150, tk=290, b=2, left_pad=(0, 45), block_k=16),
    BASE.but(key_rule=True, mask="causal", window=70, tq=200, tk=300, block_q=64, block_k=32),
    BASE.but(key_rule=True, mask="random", mask_heads="q", dtype="bfloat16", transposed=True),
    BASE.but(key_rule=True, mask="empty_rows", softcap=30.0, b=2, left_pad=(9, 0), mask_batch=1),
]


@pytest.mark.parametrize("case", params(RULE_CASES))
def test_cpu_kernel_applies_the_key_rule(case):
    q, k, v, mask, kwargs = build(case)
    assert mask.window_start is not None
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params(RULE_CASES[:2]))
def test_cpu_kernel_applies_the_key_rule_without_fused_op(case, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_fused_op", lambda device, softcap: None)
    q, k, v, mask, kwargs = build(case)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize(
    "params, q_len, kv_len",
    [
        pytest.param(dict(window=64, stride=64, sink_tokens=16), 256, 256, id="blocked-sinks"),
        pytest.param(dict(window=48, stride=48, halo=8, sink_tokens=0), 192, 240, id="halo-chunk"),
        pytest.param(dict(window=64, stride=32, sink_tokens=16), 160, 160, id="strided-aligned"),
    ],
)
def test_cpu_kernel_runs_block_diagonal_rows_as_causal_calls(params, q_len, kv_len):
    """Query blocks that select every block from a common start to their own take one fused causal
    call (blocked attention), with merged views for sinks and cut first blocks; same result."""
    method = sparse_llm.get_method("neighborhood", block_size=16, **params)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, t, 32, generator=gen) for h, t in ((4, q_len), (2, kv_len), (2, kv_len)))
    mask = method.block_mask(q, k, v, LayerCall(0, 32**-0.5))
    shapes = cpu_kernel.Shapes.of(q, k, mask)
    plan = cpu_kernel.plan_gather(mask, shapes, causal=True, sliding_window=None, padding=False, fused=True)
    causal_calls = [c for c in plan.calls if isinstance(c, cpu_kernel.CausalCall)]
    assert causal_calls and all(c.n1 - c.n0 >= 2 for c in causal_calls)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, scale=32**-0.5, impl="cpu")
    check_attention(out, lse, q, k, v, mask, dict(scale=32**-0.5))


def test_on_the_grid_with_stride_one_block_it_is_streaming():
    """window = local_tokens, stride = block_size, sinks of whole blocks: the keys of every query are
    those of streaming's query block (whose window ends at the block's last query)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, 160, 32, generator=gen) for h in (4, 2, 2))
    call = LayerCall(0, 32**-0.5)
    ours, mask = sparse_llm.get_method(
        "neighborhood", block_size=16, window=48, stride=16, sink_tokens=16
    ).attend(q, k, v, call)
    theirs, streaming = sparse_llm.get_method(
        "streaming", block_size=16, local_tokens=48, sink_tokens=16
    ).attend(q, k, v, call)
    assert torch.equal(mask.to_dense(), streaming.to_dense())
    allowed = element_mask(mask, num_q_heads=4, num_kv_heads=2)
    assert torch.equal(allowed, element_mask(streaming, num_q_heads=4, num_kv_heads=2))
    truth = naive_attention(q.double(), k.double(), v.double(), allowed[:, 0, 0], call.scale)
    assert_within_rule("out", ours, truth, theirs, 2.0)


def test_cpu_kernel_serves_strided_windows_off_the_grid_with_padded_views():
    """Window runs that end one block further per query block but start irregularly share one view of
    the longest run's length (the extra keys are masked by the key rule); same result."""
    method = sparse_llm.get_method("neighborhood", block_size=16, window=70, stride=24, sink_tokens=8)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, t, 32, generator=gen) for h, t in ((4, 300), (1, 333), (1, 333)))
    mask = method.block_mask(q, k, v, LayerCall(0, 32**-0.5))
    shapes = cpu_kernel.Shapes.of(q, k, mask)
    plan = cpu_kernel.plan_gather(mask, shapes, causal=True, sliding_window=None, padding=False, fused=True)
    selected = mask.to_dense()[0, 0].sum(-1)  # blocks per query block (sinks included)
    padded = [
        c
        for c in plan.calls
        if isinstance(c, cpu_kernel.ViewCall)
        and c.stride == 1
        and c.count > int(selected[c.n0 : c.n1].min()) - 1
    ]
    assert padded and max(c.n1 - c.n0 for c in padded) >= 4
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, scale=32**-0.5, impl="cpu")
    check_attention(out, lse, q, k, v, mask, dict(scale=32**-0.5))


@pytest.mark.parametrize("window, stride", [(96, 24), (50, 1)])
def test_window_view_runs_one_broadcast_mask_per_phase(window, stride, monkeypatch):
    """A strided window's mask repeats every stride / gcd(stride, block) query blocks (a sliding one's
    every block): the kernel's window view runs as that many calls, each with one mask broadcast over
    its query blocks (not one mask per query block; the ragged last block's padding rows do not count);
    exact against the element-mask reference."""
    method = sparse_llm.get_method(
        "neighborhood", block_size=16, window=window, stride=stride, sink_tokens=16
    )
    q, k, v, _, starts = inputs("mqa203")
    q, k, v = (torch.cat([x, x.flip(2)], 2) for x in (q, k, v))  # 406 tokens: many query blocks per phase
    masks = []
    attend = cpu_kernel._attend
    monkeypatch.setattr(
        cpu_kernel, "_attend", lambda qs, ks, vs, bias, *a: masks.append(bias) or attend(qs, ks, vs, bias, *a)
    )
    call = LayerCall(0, 32**-0.5)
    out, _ = method.attend(q, k, v, call)
    allowed = element_pattern(window, stride, 16, q_len=406, kv_len=406)[None]
    truth = naive_attention(q.double(), k.double(), v.double(), allowed, call.scale)
    assert_within_rule("out", out, truth, naive_attention(q, k, v, allowed, call.scale), 2.0)
    per_block = [m for m in masks if m is not None and m.shape[0] > 1]
    assert not per_block and len(masks) >= 3  # the window view's phases, sinks, the first blocks
