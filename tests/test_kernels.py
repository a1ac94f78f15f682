"""Kernel vs dense reference under the tolerance rule (tests/attention_cases.py), merge, bad inputs."""

from __future__ import annotations

import pytest
import torch
from attention_cases import BASE, GRID, Case, build, check_attention, params, rounding_floor, truth_and_pt

from sparse_llm.kernels import BlockMask, block_sparse_attention, merge_attention, merge_attention_
from sparse_llm.kernels import cpu as cpu_kernel


def run(case: Case, impl: str, device: str = "cpu"):
    q, k, v, mask, kwargs = build(case, device)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl=impl, **kwargs)
    return out, lse, (q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params(GRID))
def test_cpu_path_matches_reference(case):
    out, lse, inputs = run(case, "cpu")
    check_attention(out, lse, *inputs)


# Shapes that reach the CPU path's shortcuts (strided K/V views for window and sink + local rows, one
# fused is_causal call for the whole causal triangle) with Tq < Tk, key padding, Hkv > 1 and HF layout.
SHORTCUT_CASES = [
    BASE.but(mask="sink", tq=150, tk=290, b=2, left_pad=(0, 45), block_k=16),
    BASE.but(mask="causal", window=70, tq=200, tk=300, b=2, left_pad=(37, 0), block_q=64, block_k=32),
    BASE.but(
        mask="causal", window=64, tq=250, tk=250, dtype="bfloat16", block_q=16, block_k=16, softcap=30.0
    ),
    Case(tq=100, tk=300, hq=4, hkv=2, mask="causal", transposed=True),
    # per-query-head rows that all hold one run (a dense tail): a slice of the KV heads, no gather
    Case(tq=100, tk=300, hq=4, hkv=2, mask="full_rows", mask_heads="q", block_q=16, block_k=16),
]


@pytest.mark.parametrize("case", params(SHORTCUT_CASES))
def test_cpu_path_shortcuts_match_reference(case):
    out, lse, inputs = run(case, "cpu")
    check_attention(out, lse, *inputs)


@pytest.mark.parametrize("case", params([BASE, BASE.but(dtype="bfloat16", mask="empty_rows", left_pad=(9,))]))
def test_cpu_path_without_fused_op_matches_reference(case, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_fused_op", lambda device, softcap: None)
    out, lse, inputs = run(case, "cpu")
    check_attention(out, lse, *inputs)


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_path_zeroes_runs_of_empty_query_blocks(causal):
    """Query blocks that select nothing (a far-field level's first blocks) come out as 0 with lse
    -inf, in runs and alone, for every batch row, beside blocks computed as the reference says."""
    q, k, v, mask, kwargs = build(BASE.but(b=2, hq=4, hkv=1, causal=causal, transposed=True))
    dense = mask.to_dense().clone()
    dense[..., [0, 1, 3], :] = False  # a run of two empty query blocks, then one alone
    mask = BlockMask.from_dense(
        dense, block_q=mask.block_q, block_k=mask.block_k, q_len=mask.q_len, kv_len=mask.kv_len, causal=causal
    )
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)
    empty = [*range(0, 64), *range(96, 113)]  # rows of query blocks 0, 1 and 3 (block_q 32, Tq 113)
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()


def test_cpu_path_key_chunks_merge_exactly(monkeypatch):
    """The matmul path splits long rows into key chunks (the fused op needs none: flash tiles)."""
    case = BASE.but(mask="full_rows", b=2, left_pad=(0, 40), window=90)
    monkeypatch.setattr(cpu_kernel, "_fused_op", lambda device, softcap: None)
    monkeypatch.setattr(cpu_kernel, "_MAX_SCORE_ELEMENTS", 2 * 2 * 64 * 16)  # 16-key chunks
    out, lse, inputs = run(case, "cpu")
    check_attention(out, lse, *inputs)


WORK_CASES = [
    Case(tq=1024, tk=1024, hq=2, hkv=1, block_q=64, block_k=64, mask="sink"),  # two strided views
    Case(tq=1024, tk=1024, hq=2, hkv=1, block_q=64, block_k=32, mask="causal", window=200),  # one view
    Case(tq=1024, tk=1024, hq=2, hkv=1, block_q=64, block_k=64, mask="causal", left_pad=(5,)),  # gathers
]


@pytest.mark.parametrize("case", params(WORK_CASES))
def test_cpu_path_work_scales_with_selected_blocks(case, monkeypatch):
    """Keys sent to attention calls = selected blocks x block_k: no Tq x Tk work, nothing dense."""
    q, k, v, mask, kwargs = build(case)
    seen = []
    attend = cpu_kernel._attend
    tile_rows = cpu_kernel.Shapes.of(q, k, mask).r  # rows of one query block's tile

    def counting(qs, ks, vs, *args, **kw):
        # (query blocks x batch) x keys; a call may stack several query blocks' rows over one run
        seen.append(ks.shape[0] * (qs.shape[2] // tile_rows) * ks.shape[2])
        return attend(qs, ks, vs, *args, **kw)

    causal = cpu_kernel._causal_attention

    def counting_causal(qs, ks, vs, *args):  # leading dense query blocks: the causal triangle's blocks
        offset = ks.shape[2] - qs.shape[2]
        blocks = [
            -(-(offset + (n + 1) * case.block_q) // case.block_k) for n in range(qs.shape[2] // case.block_q)
        ]
        seen.append(qs.shape[0] * sum(blocks) * case.block_k)
        return causal(qs, ks, vs, *args)

    monkeypatch.setattr(cpu_kernel, "_attend", counting)
    monkeypatch.setattr(cpu_kernel, "_causal_attention", counting_causal)
    block_sparse_attention(q, k, v, mask, impl="cpu", **kwargs)
    selected = mask.num_selected_blocks * case.block_k
    # Rows with unequal counts may share a call padded with masked slots, down to _PAD_RATIO.
    assert selected <= sum(seen) <= selected / cpu_kernel._PAD_RATIO
    if case.mask != "causal" or not case.left_pad:
        assert sum(seen) == selected  # views: exactly the selected keys


# Per-query-head masks whose KV groups share their sink and local blocks (a selection method's): the
# CPU path runs the blocks a whole group selects as one mask per KV head, the rest per query head.
GROUP_CASES = [
    Case(tq=300, tk=300, hq=4, hkv=1, mask="group", mask_heads="q"),
    BASE.but(mask="group", mask_heads="q", b=2, left_pad=(0, 45), transposed=True),
    BASE.but(mask="group", mask_heads="q", tq=203, dtype="bfloat16", softcap=30.0, window=100),
    BASE.but(mask="group", mask_heads="q", key_rule=True, block_k=16),
]


def _planned_masks(case: Case, monkeypatch):
    """Run ``case`` through the CPU path (checked against the reference); return (the case's mask, the
    masks the path planned and ran, in order)."""
    q, k, v, mask, kwargs = build(case)
    masks = []
    gather = cpu_kernel._gather_fp32

    def recording(q, k, v, block_mask, **kw):
        masks.append(block_mask)
        return gather(q, k, v, block_mask, **kw)

    monkeypatch.setattr(cpu_kernel, "_gather_fp32", recording)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)
    return mask, masks


@pytest.mark.parametrize("case", params(GROUP_CASES))
def test_cpu_path_runs_the_blocks_a_kv_group_shares_as_one_mask(case, monkeypatch):
    _, masks = _planned_masks(case, monkeypatch)
    assert [m.shape[1] for m in masks] == [case.hkv, case.hq]  # the group's shared blocks, then the rest


def test_cpu_path_keeps_a_mask_whole_when_its_groups_share_little(monkeypatch):
    """Per-head random blocks of a group of 4 rarely coincide: one mask, one plan (no split)."""
    mask, masks = _planned_masks(BASE.but(hq=8, hkv=2, tq=203, mask_heads="q"), monkeypatch)
    shared, _ = mask.split_groups(4)
    assert shared.num_selected_blocks * 4 < cpu_kernel._GROUP_SHARED_MIN * mask.num_selected_blocks
    assert len(masks) == 1 and masks[0] is mask


def test_cpu_path_slices_a_run_that_every_query_head_holds(monkeypatch):
    """A per-query-head mask whose rows all hold one run (the dense tail of a selection method) reads
    a slice of the KV heads, shared by their query heads: no per-head copies of the keys."""
    case = Case(tq=100, tk=300, hq=4, hkv=2, mask_heads="q", block_q=16, block_k=16)
    q, k, v, _, kwargs = build(case)
    dense = torch.zeros(1, case.hq, 7, 19, dtype=torch.bool)
    dense[:, :, -1] = True  # the last query block reads every key block, in every head
    mask = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=100, kv_len=300)
    gathers = []
    index_select = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **kw: gathers.append(a) or index_select(*a, **kw))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)
    assert not gathers


@pytest.mark.parametrize("hq", [1, 4])
def test_cpu_path_shares_a_call_for_full_and_partial_blocks_only_on_one_heads_rows(hq):
    """Few keys per query block (a sink, a far block, the diagonal): one head's tiles run full and
    partial blocks in one call; a KV group's stacked tiles run them apart (their row mask costs more
    than the merge). Both equal the reference."""
    case = Case(tq=320, tk=320, hq=hq, hkv=1, block_q=16, block_k=16)
    q, k, v, _, kwargs = build(case)
    dense = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    rows = torch.arange(20)
    dense[0, 0, rows, 0] = dense[0, 0, rows, rows] = dense[0, 0, rows, rows // 2] = True
    mask = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=320, kv_len=320)
    shapes = cpu_kernel.Shapes.of(q, k, mask)
    plan = cpu_kernel.plan_gather(mask, shapes, causal=True, sliding_window=None, padding=False, fused=True)
    gathers = [c for c in plan.calls if isinstance(c, cpu_kernel.GatherCall)]
    shared = [c for c in gathers if c.full and c.partial]
    assert gathers and bool(shared) == (shapes.r == case.block_q)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("hkv, mask_heads", [(1, "kv"), (2, "kv"), (2, "1")])
def test_cpu_path_serves_the_sink_run_of_a_window_in_one_call(hkv, mask_heads, monkeypatch):
    """Sink + sliding window: the sink run, seen whole by every query block past it, is one call with
    the segment's query rows stacked over one copy of the sink keys (not one short item per query
    block); exact under the rule."""
    case = Case(
        tq=1000, tk=1000, hq=4, hkv=hkv, b=2, block_q=64, block_k=64, mask="sink", mask_heads=mask_heads
    )
    q, k, v, mask, kwargs = build(case)
    calls = []
    attend = cpu_kernel._attend
    monkeypatch.setattr(
        cpu_kernel, "_attend", lambda qs, ks, *a, **kw: calls.append((qs, ks)) or attend(qs, ks, *a, **kw)
    )
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)
    sink = k[:, :, : case.block_k].float().flatten(0, 1)  # [B * Hkv, block_k, D]
    sink_calls = [
        (qs, ks) for qs, ks in calls if ks.shape[1:3] == sink.shape[:2] and torch.equal(ks[0], sink)
    ]
    assert len(sink_calls) == 1
    (qs, ks), tile_rows = sink_calls[0], cpu_kernel.Shapes.of(q, k, mask).r
    assert ks.shape[0] == 1 and qs.shape[2] > tile_rows  # one item, several query blocks' rows


@pytest.mark.parametrize("tq", [1, 300, 1024])
def test_cpu_path_full_causal_mask_is_one_fused_causal_call(tq, monkeypatch):
    """A mask covering the whole causal triangle skips the block machinery: ATen's flash kernel with
    is_causal (plus one unmasked call for the Tk - Tq keys every query sees), exact under the rule."""
    case = Case(tq=tq, tk=1024, hq=4, hkv=2, block_q=64, block_k=64, mask="causal")
    calls = []
    monkeypatch.setattr(cpu_kernel, "_attend", lambda *args, **kw: calls.append(args))
    out, lse, inputs = run(case, "cpu")
    assert not calls
    check_attention(out, lse, *inputs)


def test_cpu_path_keeps_gather_buffers_between_calls_until_released():
    """Gathered K/V land in two per-thread buffers kept between calls (no page faults per call): a
    smaller call after a larger one reuses them, every call stays exact, release_workspace frees them."""
    cpu_kernel.release_workspace()
    large = BASE.but(tq=300, tk=400, hq=4, hkv=4, seed=1)
    for case in (BASE, large, BASE.but(mask_heads="q", seed=2)):
        out, lse, inputs = run(case, "cpu")
        check_attention(out, lse, *inputs)
        if case is large:
            kept = {name: buf.data_ptr() for name, buf in cpu_kernel._gather_buffers.__dict__.items()}
    assert {key[0] for key in kept} == {"k", "v"}  # (name, device, compute dtype)
    assert {name: buf.data_ptr() for name, buf in cpu_kernel._gather_buffers.__dict__.items()} == kept
    cpu_kernel.release_workspace()
    assert not cpu_kernel._gather_buffers.__dict__


def test_cpu_path_threads_gather_into_their_own_buffers():
    """Concurrent calls from several threads (a server's workers) do not share gather buffers."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [BASE.but(seed=s, tq=100 + 40 * s, tk=200 + 50 * s) for s in range(4)] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: run(case, "cpu"), cases))
    for out, lse, inputs in results:
        check_attention(out, lse, *inputs)


def test_reference_impl_returns_input_dtype():
    out, lse, inputs = run(BASE.but(dtype="bfloat16"), "reference")
    check_attention(out, lse, *inputs)


def test_auto_uses_cpu_path_for_cpu_tensors():
    q, k, v, mask, kwargs = build(BASE)
    auto = block_sparse_attention(q, k, v, mask, **kwargs)
    assert torch.equal(auto, block_sparse_attention(q, k, v, mask, impl="cpu", **kwargs))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, mask, kwargs = build(BASE)
    kwargs.pop("scale")
    assert torch.equal(
        block_sparse_attention(q, k, v, mask, **kwargs),
        block_sparse_attention(q, k, v, mask, scale=BASE.d**-0.5, **kwargs),
    )


def split_mask(mask: BlockMask, seed: int) -> tuple[BlockMask, BlockMask]:
    """Two disjoint masks whose union is ``mask``, each block assigned at random."""
    dense = mask.to_dense()
    side = torch.rand(dense.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    geo = dict(
        block_q=mask.block_q,
        block_k=mask.block_k,
        q_len=mask.q_len,
        kv_len=mask.kv_len,
        causal=mask.is_causal,
        sliding_window=mask.sliding_window,
    )
    return BlockMask.from_dense(dense & side, **geo), BlockMask.from_dense(dense & ~side, **geo)


SPLIT_CASES = [
    BASE.but(mask="full_rows"),
    BASE.but(mask="causal", window=70, dtype="bfloat16", b=2, left_pad=(0, 33)),
    BASE.but(mask="empty_rows", mask_heads="q", softcap=30.0),
    Case(tq=1, tk=200, hq=4, hkv=1, mask="causal"),
]


@pytest.mark.parametrize("case", params(SPLIT_CASES))
def test_split_masks_merged_by_lse_equal_one_run_on_union(case):
    q, k, v, mask, kwargs = build(case)
    part_a, part_b = split_mask(mask, case.seed + 1)
    assert not (part_a.to_dense() & part_b.to_dense()).any()
    assert torch.equal(part_a.to_dense() | part_b.to_dense(), mask.to_dense())
    out_a, lse_a = block_sparse_attention(q, k, v, part_a, return_lse=True, **kwargs)
    out_b, lse_b = block_sparse_attention(q, k, v, part_b, return_lse=True, **kwargs)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    check_attention(out, lse, q, k, v, mask, kwargs)
    # ... and the merge equals one run on the union up to the rounding of one run: their difference
    # stays within the rule's bound with the union run in the place of the truth.
    union_out, union_lse = block_sparse_attention(q, k, v, mask, return_lse=True, **kwargs)
    empty = torch.isneginf(union_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    (t_out, t_lse), (p_out, p_lse) = truth_and_pt(q, k, v, mask, kwargs)
    factor = 3.0 if case.softcap else 2.0
    for name, got, union, truth, pt in (
        ("out", out, union_out, t_out, p_out),
        ("lse", lse[~empty], union_lse[~empty], t_lse[~empty], p_lse[~empty]),
    ):
        err = (got.double() - union.double()).abs().max().item()
        bound = factor * (pt.double() - truth.double()).abs().max().item() + rounding_floor(truth)
        assert err <= bound, f"merged {name} vs one run: {err:.3e} > {bound:.3e}"


def test_merge_handles_empty_rows():
    out_a, out_b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    lse_a = torch.tensor([[0.5, float("-inf"), float("-inf")], [1.0, 2.0, float("-inf")]])
    lse_b = torch.tensor([[float("-inf"), 0.3, float("-inf")], [1.0, float("-inf"), float("-inf")]])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 0], out_a[0, 0]) and torch.equal(out[0, 1], out_b[0, 1])
    assert (out[:, 2] == 0).all() and torch.isneginf(lse[:, 2]).all()
    torch.testing.assert_close(out[1, 0], (out_a[1, 0] + out_b[1, 0]) / 2)
    torch.testing.assert_close(lse[1, 0], torch.tensor(1.0 + torch.log(torch.tensor(2.0)).item()))


def test_in_place_merge_equals_merge_on_strided_tiles():
    """merge_attention_ writes merge_attention's result, bit for bit, into a strided view of another
    tensor's memory (as the CPU kernel's output tiles are), empty rows included."""
    torch.manual_seed(0)
    memory, lse_memory = torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3)
    out_a, lse_a = memory.transpose(1, 2), lse_memory.transpose(1, 2)  # [2, 3, 7, 8] over [2, 7, 3, 8]
    out_b, lse_b = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7)
    lse_a[0, 0, :2], lse_b[0, 0, 1:3] = float("-inf"), float("-inf")  # empty in a, in both, in b
    out_a[0, 0, :2], out_b[0, 0, 1:3] = 0.0, 0.0
    expected, expected_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    merge_attention_(out_a, lse_a, out_b, lse_b)
    assert torch.equal(memory.transpose(1, 2), expected) and torch.equal(
        lse_memory.transpose(1, 2), expected_lse
    )
    assert (expected[0, 0, 1] == 0).all() and torch.isneginf(expected_lse[0, 0, 1])
    with pytest.raises(TypeError, match="float32"):
        merge_attention_(out_a.bfloat16(), lse_a, out_b, lse_b)
    with pytest.raises(ValueError, match="same shape"):
        merge_attention_(out_a, lse_a, out_b[..., :4], lse_b)


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        merge_attention(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="out.shape"):
        merge_attention(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(3))


# ----------------------------------------------------------------------------- bad inputs
def _inputs(hq=2, hkv=1, tq=8, tk=16, d=16, dtype=torch.float32, b=1):
    q = torch.randn(b, hq, tq, d, dtype=dtype)
    k, v = torch.randn(b, hkv, tk, d, dtype=dtype), torch.randn(b, hkv, tk, d, dtype=dtype)
    return q, k, v, BlockMask.causal(q_len=tq, kv_len=tk, block_q=4, block_k=4)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.int32, id="int32")]
)
def test_rejects_unsupported_dtypes(dtype):
    q, k, v, mask = _inputs()
    with pytest.raises(TypeError, match="allowed: float32, bfloat16, float16"):
        block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)


def test_rejects_mixed_dtypes():
    q, k, v, mask = _inputs()
    with pytest.raises(TypeError, match="share one dtype"):
        block_sparse_attention(q, k.half(), v, mask)


def test_rejects_head_counts_that_do_not_divide():
    q, k, v, _ = _inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        block_sparse_attention(q, k, v, BlockMask.causal(q_len=8, kv_len=16, block_q=4, block_k=4))


def test_rejects_more_queries_than_keys():
    q, _, _, _ = _inputs(tq=16)
    k = v = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        block_sparse_attention(q, k, v, BlockMask.causal(q_len=8, kv_len=8, block_q=4, block_k=4))


def test_rejects_mismatched_batch_or_head_dim():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="agree on batch and head dim"):
        block_sparse_attention(q, k[..., :8], v[..., :8], mask)
    with pytest.raises(ValueError, match="same shape"):
        block_sparse_attention(q, k, v[:, :, :8], mask)


def test_rejects_mask_built_for_other_lengths():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="block_mask was built for q_len=4"):
        block_sparse_attention(q, k, v, BlockMask.causal(q_len=4, kv_len=16, block_q=4, block_k=4))


def test_rejects_mask_with_wrong_batch_or_heads():
    q, k, v, _ = _inputs(hq=4, hkv=2, b=2)
    with pytest.raises(ValueError, match="heads \\(3\\) must be 1, Hkv \\(2\\) or Hq \\(4\\)"):
        block_sparse_attention(q, k, v, BlockMask.causal(q_len=8, kv_len=16, block_q=4, block_k=4, heads=3))
    with pytest.raises(ValueError, match="batch \\(3\\) must be 1 or B \\(2\\)"):
        block_sparse_attention(q, k, v, BlockMask.causal(q_len=8, kv_len=16, block_q=4, block_k=4, batch=3))


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="power of two"):
        BlockMask.causal(q_len=8, kv_len=16, block_q=3, block_k=4)
    with pytest.raises(ValueError, match="power of two"):
        BlockMask.causal(q_len=8, kv_len=16, block_q=4, block_k=0)


def test_rejects_bad_options():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        block_sparse_attention(q, k, v, mask, impl="cuda")
    with pytest.raises(ValueError, match="sliding_window requires causal=True"):
        block_sparse_attention(q, k, v, mask, sliding_window=4, causal=False)
    with pytest.raises(ValueError, match="softcap must be None or a positive number"):
        block_sparse_attention(q, k, v, mask, softcap=0.0)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        block_sparse_attention(q, k, v, mask, key_padding_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        block_sparse_attention(q, k, v, mask, key_padding_mask=torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        block_sparse_attention(q, k, v, mask.to_dense())


def test_backend_keyword_is_a_deprecated_alias_of_impl():
    q, k, v, mask = _inputs()
    with pytest.warns(DeprecationWarning, match="backend= is now impl="):
        old = block_sparse_attention(q, k, v, mask, backend="reference")
    assert torch.equal(old, block_sparse_attention(q, k, v, mask, impl="reference"))


def test_rejects_device_mismatch():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="one device"):
        block_sparse_attention(q, k.to("meta"), v, mask)
    with pytest.raises(ValueError, match="block_mask is on meta"):
        block_sparse_attention(q, k, v, mask.to("meta"))


def test_triton_impl_needs_cuda_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        block_sparse_attention(q, k, v, mask, impl="triton")


# ----------------------------------------------------------------------------- CUDA
CUDA_GRID = list(dict.fromkeys([c.but(dtype=dt) for c in GRID for dt in ("bfloat16", "float16")] + GRID))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", params(CUDA_GRID))
def test_triton_kernel_matches_reference_on_cuda(case):
    out, lse, inputs = run(case, "triton", "cuda")
    check_attention(out, lse, *inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", params(SPLIT_CASES))
def test_triton_split_masks_merge_on_cuda(case):
    q, k, v, mask, kwargs = build(case, "cuda")
    part_a, part_b = split_mask(mask, case.seed + 1)
    out_a, lse_a = block_sparse_attention(q, k, v, part_a, return_lse=True, impl="triton", **kwargs)
    out_b, lse_b = block_sparse_attention(q, k, v, part_b, return_lse=True, impl="triton", **kwargs)
    check_attention(*merge_attention(out_a, lse_a, out_b, lse_b), q, k, v, mask, kwargs)


def test_truth_is_one_precision_above_input():
    q, k, v, mask, kwargs = build(BASE)
    (t_out, _), (p_out, _) = truth_and_pt(q, k, v, mask, kwargs)
    assert t_out.dtype == torch.float64 and p_out.dtype == torch.float32


BF16_PATHS = {
    "gathers": BASE.but(dtype="bfloat16"),
    "causal-call": BASE.but(dtype="bfloat16", mask="causal", tq=203, tk=203),
    "group-split": Case(tq=300, tk=300, hq=4, hkv=1, mask="group", mask_heads="q", dtype="bfloat16"),
    "key-rule-views": BASE.but(mask="group", mask_heads="q", key_rule=True, block_k=16, dtype="bfloat16"),
    "non-causal": BASE.but(dtype="bfloat16", causal=False, mask="full_rows"),
    "float16": BASE.but(dtype="float16"),
}


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
@pytest.mark.parametrize("case", BF16_PATHS.values(), ids=BF16_PATHS.keys())
def test_cpu_path_runs_bf16_inputs_in_bf16_where_the_cpu_has_it(case, native, monkeypatch):
    """Spec of ``cpu.compute_dtype``: the fused op gets bf16 operands for bf16 inputs on a CPU with
    native bf16 (AMX runs them 2-4x faster than fp32), fp32 ones otherwise and for fp16; every
    path stays within the tolerance rule of the inputs' precision either way."""
    monkeypatch.setattr(cpu_kernel, "cpu_has_native_bf16", lambda: native)
    operands, fused = [], cpu_kernel._fused_op

    def recording_op(device, softcap):
        op = fused(device, softcap)

        def run_op(q, k, v, **kwargs):
            operands.append((q.dtype, k.dtype, v.dtype))
            return op(q, k, v, **kwargs)

        return None if op is None else run_op

    monkeypatch.setattr(cpu_kernel, "_fused_op", recording_op)
    out, lse, inputs = run(case, "cpu")
    check_attention(out, lse, *inputs)
    expected = torch.bfloat16 if native and case.dtype == "bfloat16" else torch.float32
    assert operands and set(operands) == {(expected,) * 3}
