"""``flexprefill``: profiles against a slow reference, planted patterns, budget, padding (model level:
test_method_contract.py)."""

from __future__ import annotations

import pytest
import torch

from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends.flexprefill import pattern_distance, pooled_estimate, window_profiles
from sparse_llm.backends.selection import block_means, reachable_blocks
from sparse_llm.kernels.block_mask import block_geometry


def reference_profiles(q, k, call, window):
    """Vertical and slash profiles by plain loops over window rows, in float64 ([B, Hq, Tk] each)."""
    (b, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    w = min(window, q_len)
    vertical = torch.zeros(b, hq, kv_len, dtype=torch.float64)
    slash = torch.zeros_like(vertical)
    for bi in range(b):
        for h in range(hq):
            for i in range(w):
                pos = kv_len - w + i  # bottom-right alignment: the window holds the last queries
                logits = k[bi, h // (hq // hkv)].double() @ q[bi, h, q_len - w + i].double() * call.scale
                if call.softcap is not None:
                    logits = torch.tanh(logits / call.softcap) * call.softcap
                allowed = torch.arange(kv_len) <= pos
                if call.key_padding_mask is not None:
                    allowed &= call.key_padding_mask[bi]
                probs = torch.zeros(kv_len, dtype=torch.float64)
                probs[allowed] = logits[allowed].softmax(0)
                vertical[bi, h] += probs / w
                slash[bi, h, : pos + 1] += probs[: pos + 1].flip(0) / w  # slash[o] gets key pos - o
    return vertical, slash


def inputs(seed=0, b=1, hq=4, hkv=2, tq=200, tk=200, d=32, left_pad=None, q_gain=1.0):
    torch.manual_seed(seed)
    q, k = torch.randn(b, hq, tq, d) * q_gain, torch.randn(b, hkv, tk, d)
    padding = None
    if left_pad is not None:
        padding = torch.ones(b, tk, dtype=torch.bool)
        for row, pad in enumerate(left_pad):
            padding[row, :pad] = False
    return q, k, padding


@pytest.mark.parametrize(
    "case, softcap, window",
    [
        pytest.param(dict(), None, 32, id="tk200-gqa4_2-w32"),
        pytest.param(dict(tq=77), None, 32, id="chunk-tq77-tk200"),
        pytest.param(dict(hkv=1), None, 32, id="mqa4_1"),
        pytest.param(dict(b=2, left_pad=(0, 37)), None, 32, id="b2-pad37"),
        pytest.param(dict(q_gain=4.0), 5.0, 32, id="softcap5"),
        pytest.param(dict(tq=20, tk=131), None, 32, id="window-longer-than-tq"),
        pytest.param(dict(tq=1, tk=90), None, 32, id="decode"),
    ],
)
def test_window_profiles_match_the_loop_reference(case, softcap, window):
    q, k, padding = inputs(**case)
    call = LayerCall(0, 32**-0.5, softcap=softcap, key_padding_mask=padding)
    vertical, slash = window_profiles(q, k, call, window)
    ref_vertical, ref_slash = reference_profiles(q, k, call, window)
    torch.testing.assert_close(vertical.double(), ref_vertical, rtol=0, atol=1e-6)
    torch.testing.assert_close(slash.double(), ref_slash, rtol=0, atol=1e-6)
    torch.testing.assert_close(slash.sum(-1), torch.ones(slash.shape[:2]), rtol=0, atol=1e-5)


def reference_pooled(q, k, call, block, pool):
    """The query-aware estimate by loops, float64 ``[B, Hq, nQ, nK]``: per query block, the mean over
    its real queries of the softmax, over the block-causally visible key blocks holding a real key, of
    (the mean of the query's run of ``pool`` real queries) . (the key block's mean real key)."""
    (b, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    n_q, n_k = -(-q_len // block), -(-kv_len // block)
    pad = call.key_padding_mask
    real_k = torch.ones(b, kv_len, dtype=torch.bool) if pad is None else pad
    real_q = real_k[:, kv_len - q_len :]
    out = torch.zeros(b, hq, n_q, n_k, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            keys = k[bi, h // (hq // hkv)].double()
            spans = [slice(m * block, (m + 1) * block) for m in range(n_k)]
            means = [keys[span][real_k[bi, span]] for span in spans]
            for n in range(n_q):
                last_pos = min((n + 1) * block, q_len) - 1 + kv_len - q_len  # block-causal: its last query
                visible = [m for m in range(n_k) if m * block <= last_pos and len(means[m])]
                runs = range(n * block, min((n + 1) * block, q_len), pool)
                rows = [q[bi, h, i : i + pool][real_q[bi, i : i + pool]].double() for i in runs]
                total = sum(len(r) for r in rows)
                for r in rows:
                    if not len(r) or not visible:
                        continue
                    logits = torch.stack([r.mean(0) @ means[m].mean(0) for m in visible]) * call.scale
                    if call.softcap is not None:
                        logits = torch.tanh(logits / call.softcap) * call.softcap
                    out[bi, h, n, visible] += logits.softmax(0) * len(r) / total
    return out


@pytest.mark.parametrize("pool", [1, 8, 32])
@pytest.mark.parametrize(
    "case, softcap",
    [
        pytest.param(dict(), None, id="tk200-gqa4_2"),
        pytest.param(dict(tq=77), None, id="chunk-tq77-tk200"),
        pytest.param(dict(b=2, left_pad=(0, 37)), None, id="b2-pad37"),
        pytest.param(dict(q_gain=4.0), 5.0, id="softcap5"),
    ],
)
def test_pooled_estimate_matches_the_loop_reference(case, softcap, pool):
    q, k, padding = inputs(**case)
    call = LayerCall(0, 32**-0.5, softcap=softcap, key_padding_mask=padding)
    bs, (q_len, kv_len) = 32, (q.shape[2], k.shape[2])
    real = torch.nn.functional.pad(
        torch.ones(1, kv_len, dtype=torch.bool) if padding is None else padding, (0, -kv_len % bs)
    )
    real_blocks = real.unflatten(1, (-1, bs)).any(-1)[:, None, None]
    visible = reachable_blocks(q_len, kv_len, bs, None, q.device) & real_blocks
    q_valid = None if padding is None else padding[:, -q_len:]
    got = pooled_estimate(q, block_means(k, bs, padding), call, bs, pool, q_valid, visible)
    torch.testing.assert_close(got.double(), reference_pooled(q, k, call, bs, pool), rtol=0, atol=1e-6)


def test_sub_block_pooling_keeps_what_part_of_a_query_block_looks_for():
    """Half of a query block asks strongly for cluster A, half weakly for cluster B: one mean query per
    block (the paper's estimate) puts almost all mass on A and drops B; sub-block means keep both."""
    torch.manual_seed(7)
    t, d, bs = 512, 32, 32
    a, b_dir = torch.linalg.qr(torch.randn(d, 2))[0].T * 6.0
    k = 0.1 * torch.randn(1, 1, t, d)
    k[:, :, 2 * bs : 3 * bs] += a  # key block 2: cluster A
    k[:, :, 5 * bs : 6 * bs] += b_dir  # key block 5: cluster B
    q = 0.1 * torch.randn(1, 2, t, d)
    q[:, :, -bs : -bs // 2] += 2.0 * a
    q[:, :, -bs // 2 :] += 0.5 * b_dir
    call = LayerCall(0, d**-0.5)
    params = dict(budget=8 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs, dense_tail_blocks=0)
    paper = get_method("flexprefill", query_pool=bs, **params).block_mask(q, k, k, call).to_dense()[0, :, -1]
    pooled = get_method("flexprefill", **params).block_mask(q, k, k, call).to_dense()[0, :, -1]
    assert paper[:, 2].all() and not paper[:, 5].any()
    assert pooled[:, 2].all() and pooled[:, 5].all()


def _distance(q, k, call, bs=32, window=32):
    vertical, _ = window_profiles(q, k, call, window)
    v_blocks = vertical.unflatten(-1, (-1, bs)).sum(-1)
    real = torch.ones(1, v_blocks.shape[-1], dtype=torch.bool)
    return pattern_distance(q, block_means(k, bs), call, window, v_blocks, real)


def _spike(seed=0, t=512, d=64, key=5 * 32 + 7):
    """Every window query (last 32) attends one key (a vertical line) that block means dilute."""
    q, k, _ = inputs(seed=seed, hq=2, hkv=1, tq=t, tk=t, d=d)
    q, k = q * 0.1, k * 0.1
    direction = torch.randn(d)
    q[:, :, -32:] += direction
    k[:, :, key] += 2 * direction
    return q, k


def test_planted_vertical_key_is_kept_for_every_query_block_that_sees_it():
    q, k = _spike()
    call = LayerCall(0, 64**-0.5)
    assert (_distance(q, k, call) > 0.1).all()  # pooled means miss the single key: vertical-slash
    method = get_method(
        "flexprefill",
        tau=0.1,
        dense_tail_blocks=0,
        budget=256,
        sink_tokens=32,
        local_tokens=32,
        block_size=32,
    )
    dense = method.block_mask(q, k, k, call).validate().to_dense()[0]  # [Hq, nQ, nK]
    assert dense[:, 5:, 5].all()
    assert not dense[:, 2:4, 5].any()  # causality: query blocks before it cannot see it
    n = torch.arange(1, dense.shape[1])  # offset bin 0 (diagonal) always reaches the previous block too
    assert dense[:, n, n - 1].all()


def test_planted_slash_keeps_the_matching_diagonal_band():
    torch.manual_seed(3)
    t, d, offset, bs = 512, 64, 100, 32
    k = torch.randn(1, 1, t, d)
    q = 0.1 * torch.randn(1, 2, t, d)
    q[:, :, offset:] = 2 * k[:, :, :-offset]  # query i looks at key i - 100
    call = LayerCall(0, d**-0.5)
    assert (_distance(q, k, call) > 0.1).all()
    method = get_method(
        "flexprefill",
        tau=0.1,
        dense_tail_blocks=0,
        budget=10 * bs,
        sink_tokens=bs,
        local_tokens=2 * bs,
        block_size=bs,
    )
    dense = method.block_mask(q, k, k, call).validate().to_dense()[0]
    for n in range(offset // bs + 1, t // bs):  # keys at offset 100 of block n lie in blocks n-4, n-3
        assert dense[:, n, n - 4].all() and dense[:, n, n - 3].all(), n
    assert not dense[:, 8, 2].any()  # far from the band, the vertical lines and the forced blocks


def _clusters(seed=0, t=512, d=32, bs=32, gain=6.7):
    """Key block m holds keys of cluster m % 4; query block n asks for cluster (n + 1) % 4."""
    torch.manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, 4))[0].T * gain  # orthogonal
    blocks = torch.arange(t // bs)
    k = directions[blocks % 4].repeat_interleave(bs, 0) + 0.1 * torch.randn(t, d)
    q = directions[(blocks + 1) % 4].repeat_interleave(bs, 0) + 0.1 * torch.randn(2, t, d)
    return q[None], k[None, None]


def test_head_type_decision_flips_with_tau():
    q, k = _clusters()
    call = LayerCall(0, 32**-0.5)
    assert (_distance(q, k, call) < 0.1).all()  # block means explain the window: query-aware
    params = dict(budget=256, sink_tokens=32, local_tokens=32, block_size=32, dense_tail_blocks=0)
    aware = get_method("flexprefill", **params).block_mask(q, k, k, call).validate().to_dense()[0]
    # From block 3 on, each query block keeps its own cluster, the sink and its diagonal block (before,
    # its cluster is not in sight and the flat pooled row keeps every block).
    assert aware[:, :3].sum(-1).tolist() == [[1, 2, 3]] * 2
    for n in range(3, aware.shape[1]):
        expected = {m for m in range(n + 1) if m % 4 == (n + 1) % 4} | {0, n}
        assert set(aware[0, n].nonzero().flatten().tolist()) == expected, n
    assert (aware[0] == aware[1]).all()
    assert get_method("flexprefill", tau=0.1, **params).block_mask(q, k, k, call).to_dense()[0].equal(aware)
    # tau = 0 forces vertical-slash: every row keeps the last window's cluster (0) as vertical lines.
    lines = get_method("flexprefill", tau=0.0, **params).block_mask(q, k, k, call).to_dense()[0]
    assert lines[:, 13, [4, 8, 12]].all() and not aware[:, 13, [4, 8, 12]].any()


@pytest.mark.parametrize("case", [dict(), dict(tq=150, tk=300), dict(b=2, left_pad=(0, 90))], ids=str)
def test_tau_above_the_largest_distance_skips_the_window_and_selects_the_same(case, monkeypatch):
    from sparse_llm.backends import flexprefill

    q, k, padding = inputs(seed=7, **case)
    call = LayerCall(0, 32**-0.5, key_padding_mask=padding)
    method = get_method("flexprefill", tau=1.0, budget=128, sink_tokens=32, local_tokens=32, block_size=32)
    shortcut = method.block_mask(q, k, k, call).to_dense()
    monkeypatch.setattr(flexprefill, "MAX_DISTANCE", 2.0)  # the general path: profiles, distances, where
    monkeypatch.setattr(flexprefill, "window_profiles", counted := _Counted(flexprefill.window_profiles))
    assert torch.equal(method.block_mask(q, k, k, call).to_dense(), shortcut)
    assert counted.calls == 1  # the general path did run


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(dict(tq=300, tk=300), id="t300"),
        pytest.param(dict(tq=150, tk=300), id="chunk-tq150-tk300"),
        pytest.param(dict(b=2, tq=300, tk=300, left_pad=(0, 90)), id="b2-pad90"),
        pytest.param(dict(tq=300, tk=300, hkv=1, q_gain=4.0), id="mqa-peaked"),
    ],
)
def test_budget_cap_forced_blocks_and_dense_tail(case):
    q, k, padding = inputs(seed=4, **case)
    call = LayerCall(0, 32**-0.5, key_padding_mask=padding)
    bs, budget = 32, 4 * 32
    method = get_method(
        "flexprefill",
        gamma=0.99,
        budget=budget,
        sink_tokens=bs,
        local_tokens=bs,
        block_size=bs,
        dense_tail_blocks=1,
    )
    mask = method.block_mask(q, k, k, call).validate()
    dense = mask.to_dense()
    assert dense.shape[1] == q.shape[1]  # one row per query head
    assert (dense[:, :, :-1].sum(-1) <= budget // bs).all()
    reach, _ = block_geometry(q_len=q.shape[2], kv_len=k.shape[2], block_q=bs, block_k=bs)
    real = torch.ones(1, k.shape[2], dtype=torch.bool) if padding is None else padding
    real = torch.nn.functional.pad(real, (0, -k.shape[2] % bs)).unflatten(1, (-1, bs)).any(-1)
    # The dense tail row keeps every causal block holding a real key.
    assert (dense[:, :, -1] == (reach[-1] & real[:, None, :])).all()
    forced = method.forced_blocks(q, k, call) & reach & real[:, None, None, :]
    assert (dense | ~forced).all()


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.0], ids=["query-aware", "mixed", "vertical-slash"])
def test_padding_keys_are_never_selected_and_padded_batch_equals_single_runs(tau):
    bs, pad = 32, 64
    torch.manual_seed(5)
    long_q, long_k = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32)
    short_q, short_k = torch.randn(1, 4, 256 - pad, 32), torch.randn(1, 2, 256 - pad, 32)
    q = torch.cat([long_q, torch.cat([torch.randn(1, 4, pad, 32) * 50, short_q], 2)])
    k = torch.cat([long_k, torch.cat([torch.randn(1, 2, pad, 32) * 50, short_k], 2)])
    padding = torch.ones(2, 256, dtype=torch.bool)
    padding[1, :pad] = False
    method = get_method(
        "flexprefill",
        dense_tail_blocks=0,
        tau=tau,
        budget=4 * bs,
        sink_tokens=bs,
        local_tokens=bs,
        block_size=bs,
    )
    batched = method.block_mask(q, k, k, LayerCall(0, 32**-0.5, key_padding_mask=padding)).to_dense()
    assert not batched[1, :, :, : pad // bs].any()
    singles = [
        method.block_mask(x, y, y, LayerCall(0, 32**-0.5)).to_dense()[0]
        for x, y in [(long_q, long_k), (short_q, short_k)]
    ]
    assert torch.equal(batched[0], singles[0])
    assert torch.equal(batched[1, :, pad // bs :, pad // bs :], singles[1])


@pytest.mark.parametrize(
    "params, match",
    [
        pytest.param(dict(gamma=0.0), "gamma must be a number in", id="zero-gamma"),
        pytest.param(dict(gamma=1.5), "gamma must be a number in", id="gamma-above-1"),
        pytest.param(dict(gamma=float("nan")), "gamma must be", id="nan-gamma"),
        pytest.param(dict(gamma="0.9"), "gamma must be", id="str-gamma"),
        pytest.param(dict(tau=-0.1), "tau must be a finite number >= 0", id="neg-tau"),
        pytest.param(dict(tau=float("inf")), "tau must be", id="inf-tau"),
        pytest.param(dict(window=0), "window must be None", id="zero-window"),
        pytest.param(dict(window=True), "window must be", id="bool-window"),
        pytest.param(dict(query_pool=24), "query_pool must be None", id="pool-not-dividing"),
        pytest.param(dict(query_pool=0), "query_pool must be None", id="zero-pool"),
        pytest.param(dict(budget=0), "budget must be a positive int", id="zero-budget"),
        pytest.param(dict(budget=100), "must cover", id="budget-below-forced"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("flexprefill", **params)
