"""The kernel's per-key logit bias (``key_bias``): CPU path vs the dense reference under the tolerance
rule of ``attention_cases.py``, the run-collapse identity it exists for, the LSE merge, bad inputs.

Spec: ``key_bias`` [B or 1, Hkv, Tk] is added to every logit of key j after scale and softcap, before
masking and the softmax; -inf masks the key; the LSE includes it.
"""

from __future__ import annotations

import math

import pytest
import torch
from attention_cases import BASE, GRID, Case, build, check_attention, params
from test_kernels import split_mask

from sparse_llm.kernels import BlockMask, block_sparse_attention, merge_attention
from sparse_llm.kernels import cpu as cpu_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def key_bias(case: Case, batch: int | None = None, dtype: torch.dtype = torch.float32, masked: float = 0.1):
    """[B or batch, Hkv, Tk]: log run lengths (log 1..8), a fraction ``masked`` of keys at -inf and
    one whole key block at -inf, so that some rows lose every key."""
    gen = torch.Generator().manual_seed(case.seed + 7)
    b = case.b if batch is None else batch
    bias = torch.randint(1, 9, (b, case.hkv, case.tk), generator=gen).float().log()
    bias[torch.rand(bias.shape, generator=gen) < masked] = float("-inf")
    bias[..., : min(case.block_k, case.tk)] = float("-inf")
    return bias.to(dtype)


# Every shape class of the grid (views, gathers, causal rows, decode, softcap, windows, key rules,
# per-query-head masks, left padding, non-causal) with a bias.
BIAS_CASES = [c for c in GRID if c.tq < 1000] + [
    Case(tq=1023, tk=1024, hq=2, hkv=1, d=64, block_q=64, block_k=64, mask="sink"),
    Case(tq=200, tk=200, hq=4, hkv=2, d=64, block_q=32, block_k=32, mask="causal"),  # causal rows
]


@pytest.mark.parametrize("case", params(BIAS_CASES))
def test_cpu_path_with_key_bias_matches_reference(case):
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize(
    "case, batch, dtype",
    [
        pytest.param(BASE.but(b=2, left_pad=(0, 29)), 1, torch.float32, id="batch1-broadcast"),
        pytest.param(BASE.but(dtype="bfloat16"), None, torch.bfloat16, id="bias-in-bf16"),
        pytest.param(BASE.but(mask="causal", softcap=20.0), None, torch.float32, id="softcap-then-bias"),
    ],
)
def test_key_bias_broadcast_dtype_and_softcap(case, batch, dtype):
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case, batch, dtype)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params([BASE, BASE.but(mask="sink", softcap=30.0, tk=260)]))
def test_cpu_path_without_fused_op_applies_key_bias(case, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_fused_op", lambda device, softcap: None)
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


def test_zero_bias_equals_no_bias_and_a_constant_shifts_only_the_lse():
    q, k, v, mask, kwargs = build(BASE.but(mask="sink"))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, **kwargs)
    zero = torch.zeros(1, k.shape[1], k.shape[2])
    out0, lse0 = block_sparse_attention(q, k, v, mask, return_lse=True, key_bias=zero, **kwargs)
    torch.testing.assert_close(out0, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse0, lse, rtol=0, atol=1e-6)
    out3, lse3 = block_sparse_attention(q, k, v, mask, return_lse=True, key_bias=zero + 3.0, **kwargs)
    torch.testing.assert_close(out3, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse3, lse + 3.0, rtol=0, atol=1e-5)


def test_runs_of_equal_keys_collapse_to_one_key_with_log_n_bias():
    """What deltallm relies on: n copies of a key with values v_1..v_n weigh exactly like one key with
    bias log n and the mean value, in the output and the LSE."""
    gen = torch.Generator().manual_seed(3)
    runs = [1, 4, 2, 7, 1, 3, 5, 1, 6, 2]  # 32 keys in 10 runs
    d, hq = 64, 4
    q = torch.randn(1, hq, 8, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(1, 1, len(runs), d, generator=gen, dtype=torch.float64)
    k = keys.repeat_interleave(torch.tensor(runs), 2)
    v = torch.randn(1, 1, k.shape[2], d, generator=gen, dtype=torch.float64)
    v_mean = torch.stack([c.mean(2) for c in v.split(runs, 2)], 2)
    geo = dict(block_q=8, block_k=8, causal=False)
    full = BlockMask.from_dense(torch.ones(1, 1, 1, 4, dtype=torch.bool), q_len=8, kv_len=32, **geo)
    out, lse = block_sparse_attention(q.float(), k.float(), v.float(), full, return_lse=True, causal=False)
    # collapsed: 10 keys, padded to 16 with masked (-inf) keys
    pad = 16 - len(runs)
    kc = torch.cat([keys, torch.zeros(1, 1, pad, d, dtype=torch.float64)], 2)
    vc = torch.cat([v_mean, torch.zeros(1, 1, pad, d, dtype=torch.float64)], 2)
    bias = torch.tensor([math.log(n) for n in runs] + [float("-inf")] * pad)[None, None]
    one = BlockMask.from_dense(torch.ones(1, 1, 1, 2, dtype=torch.bool), q_len=8, kv_len=16, **geo)
    out_c, lse_c = block_sparse_attention(
        q.float(), kc.float(), vc.float(), one, return_lse=True, causal=False, key_bias=bias.float()
    )
    torch.testing.assert_close(out_c, out, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse_c, lse, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "case", params([BASE.but(mask="full_rows"), BASE.but(mask="empty_rows", mask_heads="q", softcap=30.0)])
)
def test_split_masks_with_key_bias_merge_to_the_union(case):
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case)
    part_a, part_b = split_mask(mask, case.seed + 1)
    out_a, lse_a = block_sparse_attention(q, k, v, part_a, return_lse=True, **kwargs)
    out_b, lse_b = block_sparse_attention(q, k, v, part_b, return_lse=True, **kwargs)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    check_attention(out, lse, q, k, v, mask, kwargs)


def test_rejects_bad_key_bias():
    q, k, v, mask, kwargs = build(BASE)
    good = torch.zeros(1, k.shape[1], k.shape[2])
    for bad, error, match in (
        (good[0], ValueError, r"key_bias has shape \(2, 203\)"),
        (good[:, :1], ValueError, r"expected \(1 or 1, 2, 203\)"),
        (good.double(), TypeError, "key_bias must be a float32 or torch.float32 tensor"),
        (good.bool(), TypeError, "key_bias must be a float32"),
        ("0", TypeError, "key_bias must be"),
        (good.clone().fill_(float("nan")), ValueError, "NaN or \\+inf"),
        (good.clone().fill_(float("inf")), ValueError, "NaN or \\+inf"),
    ):
        with pytest.raises(error, match=match):
            block_sparse_attention(q, k, v, mask, key_bias=bad, **kwargs)
    with pytest.raises(ValueError, match="key_bias is on meta"):
        block_sparse_attention(q, k, v, mask, key_bias=good.to("meta"), **kwargs)


def prefix_mask(
    tq: int, tk: int, block_q: int, block_k: int, batch: int = 1, heads: int = 1, fragments: bool = False
) -> BlockMask:
    """Non-causal: query block n selects key blocks [2, 2 + n) (none for n = 0): a far field over
    collapsed keys (backends/_collapse.py), each query block reading one more collapsed block. With
    ``heads`` > 1 each row also drops its own random ~10 % of those blocks (blocks a head selected
    for its exact part), so rows differ and runs have holes. With ``fragments`` the run is
    [2 + 4 * (n // 8), 2 + n) and each row also selects ~15 % of the blocks before it: a pyramid
    level's run, whose start moves by superblocks, and the pieces of superblocks split by a selection."""
    n_q, n_k = -(-tq // block_q), -(-tk // block_k)
    blocks, query_blocks = torch.arange(n_k), torch.arange(n_q)[:, None]
    first = 2 + 4 * (query_blocks // 8) if fragments else torch.full_like(query_blocks, 2)
    dense = (blocks >= first) & (blocks < 2 + query_blocks)
    dense = dense.expand(batch, heads, n_q, n_k)
    gen = torch.Generator().manual_seed(5)
    if heads > 1:
        dense = dense & (torch.rand(dense.shape, generator=gen) > 0.1)
    if fragments:
        dense = dense | ((blocks < first) & (torch.rand(dense.shape, generator=gen) < 0.15))
    geo = dict(q_len=tq, kv_len=tk, block_q=block_q, block_k=block_k, causal=False)
    return BlockMask.from_dense(dense, **geo)


NONCAUSAL = [  # far-field shapes: GQA, batch with padding, bf16
    Case(tq=400, tk=500, hq=4, hkv=1, block_q=16, block_k=4, causal=False),
    Case(tq=300, tk=300, hq=2, hkv=1, block_q=16, block_k=8, causal=False, b=2, left_pad=(0, 9)),
    Case(tq=257, tk=301, hq=4, hkv=2, block_q=16, block_k=8, causal=False, dtype="bfloat16"),
]


def checked_plan(q, k, v, mask, kwargs, monkeypatch) -> cpu_kernel.GatherPlan:
    """Run the CPU kernel on ``mask``, check it against the reference, return the plan it ran."""
    plans = []
    plan_gather = cpu_kernel.plan_gather
    monkeypatch.setattr(
        cpu_kernel, "plan_gather", lambda *a, **kw: plans.append(plan_gather(*a, **kw)) or plans[-1]
    )
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="cpu", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)
    return plans[0]


@pytest.mark.parametrize(
    "case",
    params(
        [
            *NONCAUSAL,
            # softcap: the matmul path, which stacks a KV head's query heads itself
            Case(tq=200, tk=260, hq=4, hkv=2, block_q=16, block_k=8, causal=False, softcap=20.0),
        ]
    ),
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows", ["shared", "per_kv_head", "per_q_head"])
def test_noncausal_prefix_masks_share_views_and_match_reference(case, with_bias, rows, monkeypatch):
    q, k, v, _, kwargs = build(case)
    heads = {"shared": 1, "per_kv_head": case.hkv, "per_q_head": case.hq}[rows]
    mask = prefix_mask(case.tq, case.tk, case.block_q, case.block_k, heads=heads)
    if with_bias:
        kwargs["key_bias"] = key_bias(case.but(block_k=1), masked=0.05)
    plan = checked_plan(q, k, v, mask, kwargs, monkeypatch)
    views = [c for c in plan.calls if isinstance(c, cpu_kernel.ViewCall)]
    assert views and all(c.stride == 0 and not c.merge for c in views)
    viewed = sum((c.n1 - c.n0) * c.count for c in views)  # blocks per row, holes included
    assert viewed > 0.6 * int(mask.to_dense().sum()) / heads  # most keys viewed


@pytest.mark.parametrize("case", params(NONCAUSAL))
@pytest.mark.parametrize("rows", ["shared", "per_q_head"])
def test_noncausal_views_gather_the_blocks_before_their_run(case, rows, monkeypatch):
    """A run whose start moves, with scattered blocks before it (a far-field pyramid level): the runs
    are viewed, the blocks before them gathered by merged calls, and the result is the reference's."""
    q, k, v, _, kwargs = build(case)
    heads = {"shared": 1, "per_q_head": case.hq}[rows]
    mask = prefix_mask(case.tq, case.tk, case.block_q, case.block_k, heads=heads, fragments=True)
    kwargs["key_bias"] = key_bias(case.but(block_k=1), masked=0.05)
    plan = checked_plan(q, k, v, mask, kwargs, monkeypatch)
    views = [c for c in plan.calls if isinstance(c, cpu_kernel.ViewCall)]
    rest = [c for c in plan.calls if isinstance(c, cpu_kernel.GatherCall) and c.rest]
    assert views and rest and all(c.merge for c in rest)
    viewed = {n for c in views for n in range(c.n0, c.n1)}
    assert {n for c in rest for n in range(c.n0, c.n1)} <= viewed  # the rest of a viewed block only
    assert sum((c.n1 - c.n0) * c.count for c in views) > 0.5 * int(mask.to_dense().sum()) / heads
