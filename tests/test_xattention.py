"""XAttention (``xattention``): antidiagonal block scores against a plain-loop reference, the threshold
and budget rules of the selection, padding. Model level: test_method_contract.py."""

from __future__ import annotations

import pytest
import torch

from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends.xattention import antidiagonal_block_scores
from sparse_llm.kernels import BlockMask


def reference_scores(q, k, call: LayerCall, block: int, stride: int, dtype=torch.float64) -> torch.Tensor:
    """The same block scores from dense logits (K repeated per query head), with plain loops."""
    (b, hq, tq, _), (_, hkv, tk, _) = q.shape, k.shape
    s = stride
    real = torch.ones(b, tk, dtype=torch.bool) if call.key_padding_mask is None else call.key_padding_mask
    kk = k.repeat_interleave(hq // hkv, 1).to(dtype) * real[:, None, :, None]  # padded keys: logit 0
    logits = q.to(dtype) @ kk.transpose(-1, -2)  # [B, Hq, Tq, Tk]
    n_qg, n_kg = -(-tq // s), -(-tk // s)
    anti = torch.zeros(b, hq, n_qg, n_kg, dtype=dtype)
    for i in range(n_qg):
        for j in range(n_kg):
            for t in range(s):  # antidiagonal of tile (i, j): query iS+S-1-t with key jS+t
                qi, kj = i * s + s - 1 - t, j * s + t
                if qi < tq and kj < tk:
                    anti[:, :, i, j] += logits[:, :, qi, kj]
    x = anti * (call.scale / s)
    if call.softcap is not None:
        x = call.softcap * torch.tanh(x / call.softcap)
    out = torch.zeros(b, hq, -(-tq // block), -(-tk // block), dtype=dtype)
    for bi in range(b):
        for i in range(n_qg):
            last = tk - tq + min(i * s + s - 1, tq - 1)  # the group's last query, absolute position
            allowed = torch.tensor(
                [j * s <= last and bool(real[bi, j * s : j * s + s].any()) for j in range(n_kg)]
            )
            if allowed.any():
                p = x[bi, :, i].masked_fill(~allowed, float("-inf")).softmax(-1)
                for j in range(n_kg):
                    out[bi, :, i * s // block, j * s // block] += p[:, j]
    return out


def _inputs(b=1, hq=2, hkv=2, tq=200, tk=200, d=16, seed=0, hf_layout=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, tk, hkv, d, generator=gen).transpose(1, 2)
    return (q, k) if hf_layout else (q.contiguous(), k.contiguous())


def _padding(b: int, tk: int, pads: tuple[int, ...]) -> torch.Tensor:
    mask = torch.ones(b, tk, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


@pytest.mark.parametrize("max_elements", [pytest.param(2**25, id="one-chunk"), pytest.param(1, id="chunked")])
@pytest.mark.parametrize(
    "shape, block, stride, pads, softcap",
    [
        pytest.param(dict(), 32, 8, (), None, id="odd-200-b32-s8"),
        pytest.param(dict(tq=77, hq=4), 32, 8, (), None, id="chunk-77-of-200-gqa"),
        pytest.param(dict(tq=131, tk=131, hq=4, hkv=2, hf_layout=True), 32, 8, (), None, id="gqa-4-2-131"),
        pytest.param(dict(tq=150, tk=150, hq=4, hkv=1), 32, 8, (), None, id="mqa-4-1-150"),
        pytest.param(dict(b=2, hq=4), 32, 8, (0, 37), None, id="left-pad-37"),
        pytest.param(dict(b=2, tq=90, hq=4, hkv=1), 32, 8, (5, 70), None, id="left-pad-chunk"),
        pytest.param(dict(tq=1), 32, 8, (), None, id="decode"),
        pytest.param(dict(tq=100, tk=123), 64, 16, (), None, id="stride16-b64"),
        pytest.param(dict(tq=45, tk=45), 16, 1, (), None, id="stride1"),
        pytest.param(dict(), 32, 8, (), 2.0, id="softcap"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scores_match_the_loop_reference(shape, block, stride, pads, softcap, max_elements, dtype):
    q, k = _inputs(**shape)
    if softcap is not None:  # mean antidiagonal logits well past the cap, so it bites
        q = q * 8
    padding = _padding(q.shape[0], k.shape[2], pads) if pads else None
    call = LayerCall(0, q.shape[-1] ** -0.5, softcap=softcap, key_padding_mask=padding)
    ours = antidiagonal_block_scores(q, k, call, block, stride, max_elements=max_elements, dtype=dtype)
    truth = reference_scores(q, k, call, block, stride)
    pt = reference_scores(q, k, call, block, stride, dtype=dtype)  # PyTorch's error in the same precision
    floor = 2 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    bound = (3 if softcap else 2) * (pt.double() - truth).abs().max().item() + floor
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert (ours.double() - truth).abs().max().item() <= bound
    full_rows = truth[..., : q.shape[2] // block, :].sum(-1)  # full query blocks hold block/S groups
    assert torch.allclose(full_rows[full_rows > 0], torch.tensor(block / stride, dtype=torch.float64))


def _method(**params):
    defaults = dict(block_size=32, stride=8, sink_tokens=32, local_tokens=32, budget=512, dense_tail_blocks=0)
    return get_method("xattention", **{**defaults, **params})


def _planted(hq=4, hkv=2, t=512, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(1, hq, t, d, generator=gen), 0.1 * torch.randn(1, hkv, t, d, generator=gen)


def test_threshold_keeps_a_concentrated_block_and_few_others():
    q, k = _planted()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 1.5
    q[:, :, -32:] += direction  # the last query block of every head ...
    k[:, :, 5 * 32 : 6 * 32] += direction  # ... puts nearly all its mass on key block 5
    mask = _method(threshold=0.9).block_mask(q, k, k, LayerCall(0, 32**-0.5)).validate()
    dense = mask.to_dense()[0]  # [Hq, nQ, nK]
    assert [row.nonzero().flatten().tolist() for row in dense[:, -1]] == [[0, 5, 15]] * 4
    assert (dense[:, 10].sum(-1) >= 8).all()  # a diffuse row needs most of its 11 blocks for 90%


def test_needle_far_outside_the_window_is_found_under_a_small_budget():
    q, k = _planted()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 1.5
    q[:, :2, 12 * 32 : 13 * 32] += direction  # query block 12 of the heads of KV group 0 ...
    k[:, 0, 3 * 32 : 4 * 32] += direction  # ... matches key block 3 of KV head 0
    mask = _method(budget=3 * 32).block_mask(q, k, k, LayerCall(0, 32**-0.5)).validate()
    dense = mask.to_dense()[0]
    assert dense[:2, 12, 3].all() and dense[:2, 12, [0, 12]].all()
    assert dense.sum(-1).max() <= 3 and not dense[2:, 12, 3].any()


@pytest.mark.parametrize("tq", [pytest.param(200, id="prefill"), pytest.param(77, id="chunk-77")])
def test_full_threshold_and_budget_keep_every_reachable_block(tq):
    q, k = _inputs(hq=4, tq=tq, seed=3)
    mask = _method(threshold=1.0, budget=256).block_mask(q, k, k, LayerCall(0, 0.25)).validate()
    assert mask.density() == 1.0


def test_budget_caps_every_row_and_forced_blocks_are_kept():
    q, k = _inputs(hq=4, tq=200, seed=4)
    call = LayerCall(0, 0.25)
    forced = BlockMask.sink_window(
        q_len=200, kv_len=200, block_q=32, block_k=32, sink_tokens=32, local_tokens=32
    ).to_dense()
    for threshold in (1.0, 0.9, 0.01):
        method = _method(threshold=threshold, budget=3 * 32, dense_tail_blocks=1)
        mask = method.block_mask(q, k, k, call).validate()
        dense, reach = mask.to_dense(), mask.reachable()
        assert (dense[..., :-1, :].sum(-1) <= 3).all() and dense[..., -1, :].eq(reach[-1]).all()
        assert (dense | ~forced).all()
        if threshold == 1.0:  # wants every block, so the cap decides
            assert dense[..., :-1, :].sum(-1).eq(reach[:-1].sum(-1).clamp(max=3)).all()


def test_padding_keys_are_never_selected():
    q, k = _inputs(b=2, hq=4, seed=5)
    padding = _padding(2, 200, (0, 70))  # row 1: blocks 0-1 are padding, block 2 partly
    call = LayerCall(0, 0.25, key_padding_mask=padding)
    dense = _method(threshold=1.0).block_mask(q, k, k, call).validate().to_dense()
    assert not dense[1, :, :, :2].any() and dense[1, :, 3:, 2].all() and dense[0, :, :, :2].any()


def test_left_padded_batch_selects_as_the_single_runs():
    method = _method(threshold=0.9, budget=4 * 32)
    (q0, k0), (q1, k1) = _inputs(hq=4, tq=256, tk=256, seed=6), _inputs(hq=4, tq=192, tk=192, seed=7)
    q, k = torch.cat([q0, q0]), torch.cat([k0, k0])  # row 1: 64 padding tokens, then (q1, k1)
    q[1:, :, 64:], k[1:, :, 64:] = q1, k1
    call = LayerCall(0, 0.25, key_padding_mask=_padding(2, 256, (0, 64)))
    batch = method.block_mask(q, k, k, call).validate().to_dense()
    single0 = method.block_mask(q0, k0, k0, LayerCall(0, 0.25)).to_dense()
    single1 = method.block_mask(q1, k1, k1, LayerCall(0, 0.25)).to_dense()
    assert torch.equal(batch[0], single0[0]) and torch.equal(batch[1, :, 2:, 2:], single1[0])


@pytest.mark.parametrize(
    "params, match",
    [
        pytest.param(dict(threshold=0.0), "threshold must be a number in", id="threshold-0"),
        pytest.param(dict(threshold=1.5), "threshold must be a number in", id="threshold-1.5"),
        pytest.param(dict(threshold=float("nan")), "threshold must be a number in", id="threshold-nan"),
        pytest.param(dict(threshold="0.9"), "threshold must be", id="threshold-str"),
        pytest.param(dict(stride=3), "stride must be a power of two", id="stride-3"),
        pytest.param(dict(stride=0), "stride must be a power of two", id="stride-0"),
        pytest.param(dict(stride=128), "stride must be a power of two dividing", id="stride-over-block"),
        pytest.param(dict(stride=True), "stride must be", id="stride-bool"),
        pytest.param(dict(budget=64, sink_tokens=64, local_tokens=512), "must cover", id="budget-small"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("xattention", **params)
