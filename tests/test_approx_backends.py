"""The approximate methods (deltallm, lightning, lla): each against its slow reference, their exact limits,
and long inputs. End to end on the tiny models they are checked with every method, in
test_method_contract.py.

Comparisons use the tolerance rule of ``attention_cases.py``: the method in fp32 against its reference
in fp64 (truth), bounded by twice the fp32 reference's own error plus the rounding floor.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_within_rule, rounding_floor

import sparse_llm
from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends import deltallm as deltallm_module
from sparse_llm.backends._collapse import selection_far_reference
from sparse_llm.backends.deltallm import deltallm_reference, held_key_runs, held_keys, query_moment
from sparse_llm.backends.lightning import lightning_reference
from sparse_llm.backends.lla import lla_reference
from sparse_llm.kernels import BlockMask, reference_attention

BS = 16  # block size of every kernel-level case


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


def inputs(seed=0, b=2, hq=4, hkv=2, tq=113, tk=203, d=64, left_pad=(0, 29), q_gain=1.0, k_gain=1.0):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] fp32 and a LayerCall-ready padding mask (None if unpadded)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen) * q_gain
    k = torch.randn(b, hkv, tk, d, generator=gen) * k_gain
    v = torch.randn(b, hkv, tk, d, generator=gen)
    padding = None
    if any(left_pad):
        padding = torch.ones(b, tk, dtype=torch.bool)
        for row, pad in enumerate(left_pad):
            padding[row, :pad] = False
    return q, k, v, padding


def check_rule(name, got, truth, pt, softcap=None):
    assert torch.isfinite(got).all(), f"{name}: non-finite output"
    assert_within_rule(name, got, truth, pt, 3.0 if softcap else 2.0)


CASES = [
    pytest.param(dict(), id="tq113-tk203-gqa4_2-b2-pad0_29"),
    pytest.param(dict(softcap=5.0, q_gain=3.0), id="softcap5"),
    pytest.param(dict(b=1, hq=2, hkv=1, tq=1, tk=150, left_pad=(0,)), id="decode-mqa"),
    pytest.param(dict(tq=203, left_pad=(40, 0)), id="prefill-pad40"),
]


def split(case):
    case = dict(case)
    softcap = case.pop("softcap", None)
    return inputs(**case), softcap


# ----------------------------------------------------------------------------- deltallm
def test_deltallm_theta_zero_holds_every_key_and_equals_dense():
    q, k, v, padding = inputs()
    held, changed = held_keys(k, 0.0, padding)
    assert torch.equal(held, k)
    method = get_method("deltallm", theta=0.0, sink_tokens=16, local_tokens=32, block_size=BS)
    call = LayerCall(5, 64**-0.5, key_padding_mask=padding)
    out, mask = method.attend(q, k, v, call)
    assert mask.density() < 0.6  # the far part is really taken by the held-key path
    assert method.last_delta_sparsity[5] == 0.0
    causal = BlockMask.causal(q_len=113, kv_len=203, block_q=BS, block_k=BS)
    kwargs = dict(scale=64**-0.5, key_padding_mask=padding)
    truth = reference_attention(q.double(), k.double(), v.double(), causal, **kwargs)
    pt = reference_attention(q, k, v, causal, **kwargs)
    check_rule("deltallm theta=0", out, truth, pt)


def smooth(k: torch.Tensor) -> torch.Tensor:
    """Keys correlated along time (neighbours 2/3), as a model's are: whole keys then drift ~0.8 std
    from one position to the next, so thresholds near 1 hold some keys and not others."""
    return (k + k.roll(1, 2) + k.roll(2, 2)) / 3**0.5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "hold, theta", [("channel", 0.6), ("channel", 2.0), ("key", 0.7), ("key", 1.0)], ids=lambda x: str(x)
)
def test_deltallm_matches_reference(case, hold, theta):
    """Per channel: the far part with held keys, densely. Whole keys: runs collapsed to one key each
    through the kernel's key_bias, which is exact, so the same rule as the kernel applies."""
    (q, k, v, padding), softcap = split(case)
    d = 32  # the reference's held keys are a pure-Python loop over every channel
    q, k, v = q[..., :d], smooth(k)[..., :d], v[..., :d]
    if hold == "key":  # a logit threshold: the queries' gain scales the drift
        theta *= case.get("q_gain", 1.0)
    params = dict(hold=hold, theta=theta, sink_tokens=16, local_tokens=48, block_size=BS)
    method = get_method("deltallm", **params)
    out, _ = method.attend(q, k, v, LayerCall(0, d**-0.5, softcap=softcap, key_padding_mask=padding))
    kwargs = dict(scale=d**-0.5, softcap=softcap, key_padding_mask=padding)
    truth = deltallm_reference(q.double(), k.double(), v.double(), **params, **kwargs)
    pt = deltallm_reference(q, k, v, **params, **kwargs)
    causal = BlockMask.causal(q_len=q.shape[2], kv_len=k.shape[2], block_q=BS, block_k=BS)
    plain = reference_attention(q.double(), k.double(), v.double(), causal, **kwargs)
    if q.shape[2] > 1:  # the held keys matter: the result is not plain attention
        assert (truth - plain).abs().max() > 1e-3
    check_rule("deltallm", out, truth, pt, softcap)


def test_deltallm_held_keys_stay_within_threshold_and_sparsity_grows_with_theta():
    _, k, _, padding = inputs(seed=1)
    window = dict(hold="channel", sink_tokens=16, local_tokens=32, block_size=BS)
    real = padding[:, None, :, None]
    std = torch.stack([k[i, :, padding[i]].std(1, unbiased=False) for i in range(k.shape[0])])  # [B, Hkv, D]
    sparsity = []
    for theta in (0.0, 0.3, 0.6, 1.5):
        held, changed = held_keys(k, theta, padding)
        gap = ((held - k).abs() * real).amax(2)
        assert (gap <= theta * std + 1e-6).all()
        method = get_method("deltallm", theta=theta, **window)
        q = torch.randn(2, 4, 20, 64)
        method.attend(q, k, k, LayerCall(2, 0.125, key_padding_mask=padding))
        sparsity.append(method.last_delta_sparsity[2])
    assert sparsity[0] == 0.0 and all(a < b for a, b in zip(sparsity, sparsity[1:], strict=False)), sparsity
    assert sparsity[-1] > 0.5


def test_deltallm_whole_key_runs_hold_within_theta_and_cost_falls_with_sparsity():
    q, k, v, padding = inputs(seed=2)
    k = smooth(k)
    real = padding
    call = LayerCall(3, 0.125, key_padding_mask=padding)
    moment = query_moment(q, k.shape[1], call)
    g, q_real = q.shape[1] // k.shape[1], padding[:, -q.shape[2] :]
    slots, sparsity = [], []
    for theta in (0.0, 0.8, 1.0, 1.3):
        runs = held_key_runs(k, moment, theta, real, BS)
        # every key's logits are within theta (RMS over the group's real queries) of its run's first key's
        block_start = (torch.arange(203) // BS) * BS
        for b, h in ((0, 0), (1, 1)):
            r = runs[b, h]
            same_run = (r[:, None] == r[None, :]) & (block_start[:, None] == block_start[None, :])
            first = same_run.int().argmax(-1)  # the run's first key
            queries = q[b, h * g : (h + 1) * g][:, q_real[b]].flatten(0, 1)  # [N, D]
            logits = 0.125 * (k[b, h] - k[b, h, first]) @ queries.T  # [Tk, N]
            drift = logits.pow(2).mean(-1).sqrt()
            assert (drift[r >= 0] <= theta + 1e-4).all()
            assert (r[~real[b]] == -1).all() and (r[real[b]] >= 0).all()
        method = get_method("deltallm", theta=theta, sink_tokens=16, local_tokens=32, block_size=BS)
        method.attend(q, k, v, call)
        stats = method.layer_stats()[3]
        slots.append(stats["far_slots"])
        sparsity.append(method.last_delta_sparsity[3])
        assert stats["far_groups"] <= min(stats["far_keys"], stats["far_slots"])
    assert sparsity[0] == 0.0 and all(a < b for a, b in zip(sparsity, sparsity[1:], strict=False)), sparsity
    assert all(a >= b for a, b in zip(slots, slots[1:], strict=False)) and slots[-1] < slots[0], slots


def test_deltallm_query_moment_is_the_mean_outer_product_over_each_groups_real_queries():
    q, _, _, padding = inputs(seed=5)  # GQA 4 / 2, left padding in row 1
    scale = 0.125
    hf_layout = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Tq, D] view of [B, Tq, Hq, D]
    moment = query_moment(hf_layout, 2, LayerCall(0, scale, key_padding_mask=padding))
    real = padding[:, -q.shape[2] :]
    for b in range(2):
        for h in range(2):
            rows = q[b, 2 * h : 2 * h + 2][:, real[b]].flatten(0, 1)  # the group's real queries
            expected = scale**2 * rows.T @ rows / rows.shape[0]
            torch.testing.assert_close(moment[b, h], expected, rtol=1e-5, atol=1e-6)


def test_deltallm_collapsed_slots_leave_under_one_slot_width_unused_per_key_block():
    q, k, v, padding = inputs(seed=2)
    method = get_method("deltallm", theta=1.0, sink_tokens=16, local_tokens=32, block_size=BS)
    method.attend(q, smooth(k), v, LayerCall(3, 0.125, key_padding_mask=padding))
    stats = method.layer_stats()[3]
    width = max(1, BS // deltallm_module._SLOTS_PER_BLOCK)
    far_blocks_per_row = -(-203 // BS) * 2 * 2  # at most every key block of both rows and KV heads
    # each key block's runs take whole slots of ``width``: at most width - 1 unused per block
    assert stats["far_groups"] <= stats["far_slots"] <= stats["far_groups"] + far_blocks_per_row * (width - 1)


def test_deltallm_holds_keys_that_move_where_no_query_looks():
    """Keys that move a lot along one direction the queries never probe form one run per block; the
    same moves along a direction the queries weigh break every run."""
    torch.manual_seed(0)
    d, t = 16, 128
    q = torch.randn(1, 2, t, d)
    q[..., 0] = 0.0  # no query probes channel 0
    k = 0.01 * torch.randn(1, 1, t, d)
    k[..., 0] += 5.0 * torch.randn(t)  # the keys jump along channel 0 only
    call = LayerCall(0, d**-0.5)
    everywhere = torch.ones(1, t, dtype=torch.bool)
    runs = held_key_runs(k, query_moment(q, 1, call), 0.5, everywhere, BS)
    assert (runs.amax(-1) == 0).all()  # one run per key block: every key is held
    q[..., 0] = 1.0
    runs = held_key_runs(k, query_moment(q, 1, call), 0.5, everywhere, BS)
    assert runs.amax().item() > BS // 2  # most keys start their own run


# ----------------------------------------------------------------------------- lightning
@pytest.mark.parametrize("case", CASES)
def test_lightning_without_far_keys_equals_streaming(case):
    (q, k, v, padding), softcap = split(case)
    call = LayerCall(0, 64**-0.5, softcap=softcap, key_padding_mask=padding)
    window = dict(sink_tokens=16, local_tokens=32, block_size=BS)
    out, mask = get_method("lightning", far_keys="none", **window).attend(q, k, v, call)
    expected, expected_mask = get_method("streaming", **window).attend(q, k, v, call)
    assert torch.equal(mask.to_dense(), expected_mask.to_dense())
    assert torch.equal(out, expected)


def test_lightning_still_accepts_its_old_far_field_parameter_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'far_field' is now 'far_keys'"):
        method = get_method("lightning", far_field="none")
    assert method.far_keys == "none"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", [1, 2])
def test_lightning_matches_reference(case, order):
    (q, k, v, padding), softcap = split(case)
    window = dict(sink_tokens=16, local_tokens=32, block_size=BS)
    method = get_method("lightning", far_keys="taylor", taylor_order=order, **window)
    out, _ = method.attend(q, k, v, LayerCall(0, 64**-0.5, softcap=softcap, key_padding_mask=padding))
    kwargs = dict(scale=64**-0.5, order=order, softcap=softcap, key_padding_mask=padding, **window)
    truth = lightning_reference(q.double(), k.double(), v.double(), **kwargs)
    pt = lightning_reference(q, k, v, **kwargs)
    check_rule(f"lightning order {order}", out, truth, pt, softcap)


def test_lightning_taylor_approaches_softmax_as_order_grows():
    # small scores (std ~0.2): exp is close to its Taylor polynomials around the mean score
    q, k, v, padding = inputs(seed=3, q_gain=0.5, k_gain=0.5)
    call = LayerCall(0, 64**-0.5, key_padding_mask=padding)
    causal = BlockMask.causal(q_len=113, kv_len=203, block_q=BS, block_k=BS)
    exact = reference_attention(
        q.double(), k.double(), v.double(), causal, scale=64**-0.5, key_padding_mask=padding
    )
    window = dict(sink_tokens=16, local_tokens=32, block_size=BS)
    err = {}
    taylor = dict(far_keys="taylor")
    for label, params in (
        ("none", dict(far_keys="none")),
        ("1", dict(taylor_order=1, **taylor)),
        ("2", taylor),
    ):
        out, _ = get_method("lightning", **window, **params).attend(q, k, v, call)
        err[label] = (out.double() - exact).abs().max().item()
    assert err["2"] < 0.5 * err["1"] and err["1"] < 0.2 * err["none"], err


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("group", [4, 8])
def test_lightning_mean_far_field_matches_reference(case, group):
    """The compressed far field through the kernel (key_bias log n, mean keys and values) equals its
    written-out reference: the same approximation, so the kernel's tolerance rule applies."""
    (q, k, v, padding), softcap = split(case)
    window = dict(sink_tokens=16, local_tokens=32, block_size=BS)
    method = get_method("lightning", far_keys="mean", far_group=group, **window)
    call = LayerCall(4, 64**-0.5, softcap=softcap, key_padding_mask=padding)
    out, mask = method.attend(q, k, v, call)
    kwargs = dict(scale=64**-0.5, far_keys="mean", far_group=group, softcap=softcap, key_padding_mask=padding)
    truth = lightning_reference(q.double(), k.double(), v.double(), **window, **kwargs)
    pt = lightning_reference(q, k, v, **window, **kwargs)
    check_rule(f"lightning mean {group}", out, truth, pt, softcap)
    stats = method.layer_stats()[4]
    assert stats["far_density"] <= 1 / group + 1e-9 and stats["far_groups"] * group >= stats["far_keys"]


@pytest.mark.parametrize("case", CASES)
def test_lightning_pyramid_far_field_matches_reference(case):
    """With ``far_span`` the far keys' groups grow 4x per level with distance: the kernel's result
    equals the written-out pyramid over lightning's own sink + window mask."""
    (q, k, v, padding), softcap = split(case)
    method = get_method("lightning", far_span=16, sink_tokens=16, local_tokens=32, block_size=BS)
    out, mask = method.attend(q, k, v, LayerCall(4, 64**-0.5, softcap=softcap, key_padding_mask=padding))
    kwargs = dict(scale=64**-0.5, far_group=4, softcap=softcap, key_padding_mask=padding, far_span=16)
    truth = selection_far_reference(q.double(), k.double(), v.double(), mask, **kwargs)
    pt = selection_far_reference(q, k, v, mask, **kwargs)
    check_rule("lightning pyramid", out, truth, pt, softcap)
    stats = method.layer_stats()[4]
    assert 0 < stats["far_density"] < get_method("lightning").far_group ** -1


def test_lightning_mean_far_field_is_exact_with_groups_of_one_and_degrades_with_size():
    q, k, v, padding = inputs(seed=6)
    k = smooth(k)
    call = LayerCall(0, 64**-0.5, key_padding_mask=padding)
    causal = BlockMask.causal(q_len=113, kv_len=203, block_q=BS, block_k=BS)
    kwargs = dict(scale=64**-0.5, key_padding_mask=padding)
    truth = reference_attention(q.double(), k.double(), v.double(), causal, **kwargs)
    pt = reference_attention(q, k, v, causal, **kwargs)
    window = dict(sink_tokens=16, local_tokens=32, block_size=BS)
    out, _ = get_method("lightning", far_group=1, **window).attend(q, k, v, call)
    check_rule("lightning mean, groups of 1", out, truth, pt)
    err = {}
    for group in (2, 4, 16):
        out, _ = get_method("lightning", far_group=group, **window).attend(q, k, v, call)
        err[group] = (out.double() - truth).abs().max().item()
    none, _ = get_method("lightning", far_keys="none", **window).attend(q, k, v, call)
    err["none"] = (none.double() - truth).abs().max().item()
    assert err[2] < err[4] < err[16] < err["none"], err


# ----------------------------------------------------------------------------- lla
@pytest.mark.parametrize(
    "base, base_params", [("dense", {}), ("streaming", dict(sink_tokens=16, local_tokens=32))]
)
def test_lla_with_huge_ridge_equals_softmax_over_the_base_blocks(base, base_params):
    q, k, v, padding = inputs(seed=4)
    method = get_method("lla", ridge=1e8, base=base, base_params=base_params, block_size=BS)
    out, mask = method.attend(q, k, v, LayerCall(0, 64**-0.5, key_padding_mask=padding))
    kwargs = dict(scale=64**-0.5, key_padding_mask=padding)
    truth = reference_attention(q.double(), k.double(), v.double(), mask, **kwargs)
    pt = reference_attention(q, k, v, mask, **kwargs)
    check_rule(f"lla ridge=1e8 base={base}", out, truth, pt)
    # ... and a moderate ridge really changes the output
    moderate, _ = get_method("lla", ridge=1.0, base=base, base_params=base_params, block_size=BS).attend(
        q, k, v, LayerCall(0, 64**-0.5, key_padding_mask=padding)
    )
    assert (moderate.double() - truth).abs().max() > 0.1


LLA_BASES = [
    pytest.param("streaming", dict(sink_tokens=16, local_tokens=32), id="streaming"),
    pytest.param("dense", {}, id="dense"),
    pytest.param("block_topk", dict(budget=64, sink_tokens=16, local_tokens=16), id="block_topk"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("base, base_params", LLA_BASES)
def test_lla_matches_reference(case, base, base_params):
    (q, k, v, padding), softcap = split(case)
    d = 32  # the reference holds Tq x Tk x D tensors
    q, k, v = q[..., :d], k[..., :d], v[..., :d]
    method = get_method(
        "lla", ridge=0.5, base=base, base_params=base_params, block_size=BS, solver="cholesky"
    )
    out, mask = method.attend(q, k, v, LayerCall(0, d**-0.5, softcap=softcap, key_padding_mask=padding))
    kwargs = dict(scale=d**-0.5, ridge=0.5, softcap=softcap, key_padding_mask=padding)
    truth = lla_reference(q.double(), k.double(), v.double(), mask, **kwargs)
    pt = lla_reference(q, k, v, mask, **kwargs)
    check_rule(f"lla base={base}", out, truth, pt, softcap)


TILT_CASES = [
    pytest.param(dict(), 1e3, 0.02, id="gqa-pad-ridge1e3"),
    pytest.param(dict(), 1e2, 0.15, id="gqa-pad-ridge1e2"),
    pytest.param(dict(softcap=50.0), 1e3, 0.02, id="softcap50-ridge1e3"),
    pytest.param(dict(b=1, hq=2, hkv=1, tq=1, tk=150, left_pad=(0,)), 1e3, 0.02, id="decode-mqa"),
    pytest.param(dict(tq=203, left_pad=(40, 0)), 1e4, 0.005, id="prefill-pad40-ridge1e4"),
]


@pytest.mark.parametrize("case, ridge, ratio", TILT_CASES)
@pytest.mark.parametrize("base, base_params", LLA_BASES[:2])
def test_lla_tilt_stays_within_its_bound_of_the_exact_solve(case, ridge, ratio, base, base_params):
    """The two-pass tilt (solver="tilt") against the exact solve: its error is at most ``ratio`` of the
    LLA correction itself (the bound falls as 1/ridge), plus the rounding the rule allows."""
    (q, k, v, padding), softcap = split(case)
    d = 32
    q, k, v = q[..., :d], k[..., :d], v[..., :d]
    method = get_method("lla", ridge=ridge, base=base, base_params=base_params, block_size=BS)
    out, mask = method.attend(q, k, v, LayerCall(0, d**-0.5, softcap=softcap, key_padding_mask=padding))
    kwargs = dict(scale=d**-0.5, softcap=softcap, key_padding_mask=padding)
    truth = lla_reference(q.double(), k.double(), v.double(), mask, ridge=ridge, **kwargs)
    pt = lla_reference(q, k, v, mask, ridge=ridge, **kwargs)
    softmax = reference_attention(q.double(), k.double(), v.double(), mask, **kwargs)
    correction = (truth - softmax).abs().max().item()
    err = (out.double() - truth).abs().max().item()
    bound = ratio * correction + 2 * (pt.double() - truth).abs().max().item() + rounding_floor(truth)
    assert correction > 1e-5 or q.shape[2] == 1
    assert err <= bound, (
        f"tilt error {err:.3e} > {ratio} x correction {correction:.3e} + rounding = {bound:.3e}"
    )


def test_lla_tilt_in_bf16_is_computed_in_fp32():
    q, k, v, padding = inputs(seed=8, d=32)
    method = get_method("lla", ridge=1e3, base="dense", block_size=BS)
    call = LayerCall(0, 32**-0.5, key_padding_mask=padding)
    out16, mask = method.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), call)
    out32, _ = method.attend(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), call)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16, out32.bfloat16(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- all three
LONG = {
    "deltallm": dict(),  # local_tokens default: max(256, 5% of Tk)
    "lightning": dict(local_tokens=256),
    "lla": dict(base_params=dict(sink_tokens=64, local_tokens=256)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(LONG))
def test_long_inputs_stay_finite(method, dtype):
    q, k, v, _ = inputs(seed=5, b=1, hq=2, hkv=1, tq=2048, tk=2048, left_pad=(0,), q_gain=2.0)
    out, _ = get_method(method, **LONG[method]).attend(
        q.to(dtype), k.to(dtype), v.to(dtype), LayerCall(0, 64**-0.5, softcap=None)
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert out.float().abs().max() < 10  # a convex-ish mix of unit-scale values, not a blow-up


@pytest.mark.parametrize(
    "method, params, match",
    [
        pytest.param("deltallm", dict(theta=-0.1), "theta must be a finite number >= 0", id="neg-theta"),
        pytest.param("deltallm", dict(theta=float("nan")), "theta must be", id="nan-theta"),
        pytest.param(
            "deltallm", dict(local_tokens=0), "local_tokens must be a positive int", id="zero-local"
        ),
        pytest.param("deltallm", dict(sink_tokens=-1), "sink_tokens must be a positive int", id="neg-sink"),
        pytest.param("deltallm", dict(hold="vector"), "hold must be one of", id="bad-hold"),
        pytest.param(
            "deltallm", dict(local_tokens=32, block_size=64), "must be >= block_size", id="key-local-lt-block"
        ),
        pytest.param("lightning", dict(far_keys="rff"), "far_keys must be one of", id="bad-far-keys"),
        pytest.param("lightning", dict(taylor_order=3), "taylor_order must be 1 or 2", id="order-3"),
        pytest.param("lightning", dict(far_group=3), "far_group must be a power of two", id="group-3"),
        pytest.param(
            "lightning", dict(far_group=128), "far_group must be a power of two", id="group-gt-block"
        ),
        pytest.param(
            "lightning", dict(local_tokens=0), "local_tokens must be a positive int", id="zero-local"
        ),
        pytest.param(
            "lightning", dict(local_tokens=32, block_size=64), "must be >= block_size", id="local-lt-block"
        ),
        pytest.param("lla", dict(ridge=0.0), "ridge must be a finite number > 0", id="zero-ridge"),
        pytest.param("lla", dict(ridge="big"), "ridge must be", id="str-ridge"),
        pytest.param("lla", dict(base="streamin"), "unknown method 'streamin'", id="unknown-base"),
        pytest.param("lla", dict(base_params=[("sink_tokens", 4)]), "base_params must be", id="list-params"),
        pytest.param("lla", dict(base_params=dict(window=3)), "unknown parameters", id="bad-base-param"),
        pytest.param("lla", dict(base="lla"), "not 'lla' itself", id="self-base"),
        pytest.param("lla", dict(solver="lu"), "solver must be one of", id="bad-solver"),
    ],
)
def test_bad_parameters_raise(method, params, match):
    with pytest.raises(ValueError, match=match):
        get_method(method, **params)


def test_approximate_methods_say_so_in_their_descriptions():
    methods = sparse_llm.list_methods()
    assert "approximate" in methods["deltallm"] and "approximate" in methods["lightning"]
    assert get_method("deltallm").params()["theta"] == 2.0  # the report attribute is not a parameter
    assert get_method("deltallm", hold="channel").params()["theta"] == 0.6
    assert "last_delta_sparsity" not in get_method("deltallm").params()
