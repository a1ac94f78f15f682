"""The mean-key far field every budgeted selection method can add (``far_keys="mean"``): equal to its
written-out reference on the method's own mask, exact with groups of one, reported by
``attention_stats``, validated.

Comparisons use the tolerance rule of ``attention_cases.py``: the method in fp32 against the reference
in fp64 (truth), bounded by a multiple of the fp32 reference's own error plus the rounding floor.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_within_rule
from conftest import float64_reference, random_ids, rule_bound
from method_cases import model_of, sparse_setting

import sparse_llm
from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends._collapse import (
    far_blocks,
    far_levels,
    pyramid_levels_reference,
    selection_far_reference,
)
from sparse_llm.backends.base import BudgetedMethod
from sparse_llm.kernels import BlockMask, reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread

BUDGETED = [
    pytest.param(name, id=name)
    for name in sparse_llm.list_methods()
    if isinstance(get_method(name), BudgetedMethod)
]
SCALE = 32**-0.5


def inputs(seed=0, b=2, hq=4, hkv=2, tq=181, tk=245, d=32, left_pad=(0, 37)):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen) * 2.0
    k, v = torch.randn(b, hkv, tk, d, generator=gen), torch.randn(b, hkv, tk, d, generator=gen)
    padding = torch.ones(b, tk, dtype=torch.bool)
    for row, pad in enumerate(left_pad):
        padding[row, :pad] = False
    return q, k, v, padding


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("group, span", [(1, None), (4, None), (4, 16), (2, 32)])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap5"])
def test_far_field_matches_reference_on_the_methods_own_mask(name, group, span, softcap):
    """Selected blocks exact, every other causal real key in mean keys of ``group`` (growing 4x per
    level past ``span`` tokens): through the kernel (key_bias log n) as written out, for per-query-head
    and shared masks, GQA, padding, Tq < Tk."""
    q, k, v, padding = inputs()
    method = get_method(name, **sparse_setting(name), far_keys="mean", far_group=group, far_span=span)
    call = LayerCall(3, SCALE, softcap=softcap, key_padding_mask=padding)
    out, mask = method.attend(q, k, v, call)
    assert mask.density() < 1.0  # there is a far field to test
    kwargs = dict(scale=SCALE, far_group=group, softcap=softcap, key_padding_mask=padding, far_span=span)
    truth = selection_far_reference(q.double(), k.double(), v.double(), mask, **kwargs)
    pt = selection_far_reference(q, k, v, mask, **kwargs)
    real_rows = padding[:, -q.shape[2] :]  # fully padded query rows are garbage in any method
    real_rows = real_rows[:, None, :, None]
    assert torch.isfinite(out).all()
    assert_within_rule(
        f"{name} far {group}",
        out * real_rows,
        truth * real_rows,
        pt * real_rows,
        3.0 if softcap else 2.0,
    )
    stats = method.layer_stats()[3]
    assert 0 < stats["far_density"] <= 1 / group + 1e-9
    assert stats["far_groups"] * group >= stats["far_keys"] > 0


@pytest.mark.parametrize("name", BUDGETED)
def test_far_field_without_padding_matches_reference(name):
    """No padded keys and whole blocks: the mean keys are summed straight from the keys (no copy)."""
    q, k, v, _ = inputs(b=1, tq=192, tk=256, left_pad=())
    method = get_method(name, **sparse_setting(name), far_keys="mean", far_group=4, far_span=16)
    out, mask = method.attend(q, k, v, LayerCall(3, SCALE))
    assert mask.density() < 1.0
    kwargs = dict(scale=SCALE, far_group=4, far_span=16)
    truth = selection_far_reference(q.double(), k.double(), v.double(), mask, **kwargs)
    assert_within_rule(name, out, truth, selection_far_reference(q, k, v, mask, **kwargs), 2.0)


@pytest.mark.parametrize("name", BUDGETED)
def test_far_field_with_groups_of_one_is_dense_attention(name):
    """With one key per group the far field is exact, so selection + far field = dense attention."""
    q, k, v, padding = inputs(seed=1, left_pad=(0, 0))
    call = LayerCall(0, SCALE)
    out, _ = get_method(name, **sparse_setting(name), far_keys="mean", far_group=1).attend(q, k, v, call)
    causal = BlockMask.causal(q_len=q.shape[2], kv_len=k.shape[2], block_q=16, block_k=16)
    truth = reference_attention(q.double(), k.double(), v.double(), causal, scale=SCALE)
    pt = reference_attention(q, k, v, causal, scale=SCALE)
    assert_within_rule(f"{name} far 1 vs dense", out, truth, pt, 2.0)


def test_far_field_on_by_default_and_reported_by_attention_stats():
    """Selection methods add the far field by default (``far_keys="none"`` turns it off); every
    sparsified layer of a model reports it, and with groups of one the model's logits are dense
    attention's."""
    model, ids = model_of("llama"), random_ids(2, 200, seed=3)
    params = sparse_setting("block_topk")
    assert len(BUDGETED) >= 6 and all(get_method(p.values[0]).far_keys == "mean" for p in BUDGETED)
    with torch.no_grad():
        truth, pt = float64_reference(model)(ids).logits, model(ids).logits
        with sparse_llm.sparse_attention(model, "block_topk", **params, far_keys="none"):
            plain = model(ids).logits
            layers = sparse_llm.attention_stats(model)["layers"].values()
            assert not any("far_density" in layer for layer in layers)
        with sparse_llm.sparse_attention(model, "block_topk", **params, far_keys="mean", far_group=1):
            far = model(ids).logits
            stats = sparse_llm.attention_stats(model)
    assert stats["density"] < 1.0
    assert all(layer["far_density"] > 0 for layer in stats["layers"].values() if layer["sparse"])
    bound = rule_bound(truth, pt)
    assert (far.double() - truth).abs().max().item() <= bound
    assert (plain.double() - truth).abs().max().item() > bound  # the selection alone is not dense


@pytest.mark.parametrize("name", BUDGETED)
def test_pyramid_far_field_is_exact_when_keys_are_equal(name):
    """A mean key stands exactly for a group of equal keys, at any group size: with every key of a head
    equal, selection + pyramid far field = dense attention, so each far key is read exactly once."""
    q, k, v, _ = inputs(seed=2, left_pad=(0, 0))
    k = k[:, :, :1].expand_as(k).contiguous()
    method = get_method(name, **sparse_setting(name), far_keys="mean", far_group=4, far_span=16)
    out, _ = method.attend(q, k, v, LayerCall(0, SCALE))
    causal = BlockMask.causal(q_len=q.shape[2], kv_len=k.shape[2], block_q=16, block_k=16)
    truth = reference_attention(q.double(), k.double(), v.double(), causal, scale=SCALE)
    pt = reference_attention(q, k, v, causal, scale=SCALE)
    assert_within_rule(f"{name} pyramid, equal keys, vs dense", out, truth, pt, 2.0)


def test_far_levels_cover_every_far_block_once_coarser_with_distance():
    """``far_levels`` vs its block-by-block reference at 2K keys: each far block read at one level,
    levels 1-2 in use, and the far field reads fewer mean keys than with one level."""
    q, k, v, _ = inputs(seed=4, b=1, hq=2, hkv=1, tq=2048, tk=2048, left_pad=(0,))
    method = get_method("block_topk", block_size=16, budget=128, sink_tokens=16, local_tokens=32)
    mask = method.block_mask(q, k, v, LayerCall(0, SCALE))
    far = far_blocks(mask)
    levels = far_levels(far, mask, far_span=64)
    truth = pyramid_levels_reference(far, mask, far_span=64)
    assert len(levels) == 4 and all(int(level.sum()) > 0 for level in levels[1:3])
    for lv, taken in enumerate(levels):
        assert torch.equal(taken.repeat_interleave(4**lv, -1)[..., : far.shape[-1]], truth == lv)
    stats = {}
    for span in (None, 64):
        method.far_span = span
        method.attend(q, k, v, LayerCall(0, SCALE))
        stats[span] = method.layer_stats()[0]
    assert stats[None]["far_keys"] == stats[64]["far_keys"]
    assert stats[64]["far_density"] < 0.5 * stats[None]["far_density"]


@pytest.mark.parametrize("name", ["block_topk", "lightning"])
def test_default_far_span_keeps_one_level_to_8k_tokens(name):
    """The default ``far_span`` (8192) reads prompts up to 8192 tokens at one level, as ``None`` does,
    and longer ones at coarser levels beyond 8192 tokens."""
    method = get_method(name)
    assert method.far_span == 8192
    for tokens, n_levels in ((4096, 1), (8192, 1), (8192 + 512, 2), (32768, 2)):
        n = tokens // 64
        keep = torch.zeros(1, 1, n, n, dtype=torch.bool)
        keep[..., torch.arange(n), torch.arange(n)] = True  # the diagonal: every other causal block is far
        mask = BlockMask.from_dense(keep, block_q=64, block_k=64, q_len=tokens, kv_len=tokens)
        far = far_blocks(mask)
        levels = far_levels(far, mask, method.far_span)
        assert len(levels) == n_levels and all(int(level.sum()) > 0 for level in levels), tokens
        assert sum(int(level.sum()) * 4**lv for lv, level in enumerate(levels)) == int(far.sum())


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(far_span=40), "far_span must be None or a positive multiple"),
        (dict(far_span=0), "far_span must be None or a positive multiple"),
        (dict(far_span=True), "far_span must be"),
        (dict(far_keys="taylor"), "far_keys must be one of"),
        (dict(far_group=3), "far_group must be a power of two"),
        (dict(far_group=128), "far_group must be a power of two"),
        (dict(far_group=True), "far_group must be"),
    ],
)
def test_far_field_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("xattention", **params)


@pytest.mark.parametrize("span", [None, 32])
def test_far_density_of_a_chunked_prefill_equals_the_whole_prompts(span):
    """``attention_stats``: the far field's reads per chunk and in total, cost-weighted like the
    density, so that a prompt in chunks reports what the same prompt reports in one piece (the
    pyramid's levels sit at absolute positions)."""
    model, ids = model_of("llama"), random_ids(1, 200, seed=3)
    params = {**sparse_setting("xattention"), "far_keys": "mean", "dense_tail_blocks": 0, "far_span": span}
    with torch.no_grad(), sparse_llm.sparse_attention(model, "xattention", **params):
        model(ids)
        whole = sparse_llm.attention_stats(model)
        sparse_llm.prefill(model, ids, 64)
        chunked = sparse_llm.attention_stats(model)["prefill"]
    assert whole["far_density"] > 0 and whole["prefill"]["far_density"] == pytest.approx(whole["far_density"])
    assert chunked["far_density"] == pytest.approx(whole["far_density"])
    assert chunked["density"] == pytest.approx(whole["density"])
    assert chunked["chunks"][0]["far_density"] == 0.0  # the first chunk has nothing far
    assert any(c["far_density"] > 0 for c in chunked["chunks"])
