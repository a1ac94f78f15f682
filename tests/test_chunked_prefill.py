"""Chunked prefill for every registered method: a prompt through the KV cache a chunk at a time, so
each attention call has fewer queries than keys (1 < Tq < Tk, queries bottom-right aligned).

Parametrized from ``sparse_llm.list_methods()`` like tests/test_method_contract.py. Checked: at its
exact setting every method's chunked prefill equals the float64 whole-prompt reference under the
tolerance rule (every family, odd lengths and chunk sizes), and so do HF ``generate``'s chunked
prefill tokens; at a sparse setting every chunk's masks are valid, outputs finite, rows within the
method's budget, the dense tail on the prompt's last chunk only, and ``attention_stats`` reports each
chunk and the total; sinks and windows sit at absolute positions; methods whose selection of a query
block depends only on that block's queries and the keys before it select the same blocks chunked
(on the block grid) as whole.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import pytest
import torch
from conftest import float64_reference, random_ids, rule_bound
from method_cases import BLOCK, METHODS, VARIANTS, method_class, model_of, sparse_setting

import sparse_llm
from sparse_llm.backends import LayerCall
from sparse_llm.backends.base import BudgetedMethod
from sparse_llm.kernels import BlockMask
from sparse_llm.kernels.reference import element_mask

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 157  # odd: no chunk size below divides it, so the last chunk is ragged
IDS = random_ids(1, SEQ, seed=11)
# Methods whose selection for a query block depends only on that block's queries and the keys up to
# it (positions, per-block scores, per-key norms): chunked on the block grid they pick the blocks of
# the whole prompt. The others score with prompt-wide statistics (clusters, chunk boundaries, key
# standard deviations, the last queries' attention), which a chunk computes over its own context.
CHUNK_INVARIANT = ("streaming", "neighborhood", "block_topk", "xattention", "dma", "lightning", "lla")


def final_hidden(model, run) -> torch.Tensor:
    """The final norm's output ``[1, SEQ, hidden]`` over every forward ``run()`` makes (concatenated
    over chunks): the model's output at every position, before the LM head."""
    parts = []
    handle = model.get_decoder().norm.register_forward_hook(lambda mod, args, out: parts.append(out))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return torch.cat(parts, 1)


@functools.cache
def references(variant: str):
    """(float64 eager, float32 HF) final hidden states of the whole prompt ``IDS``."""
    model = model_of(variant)
    ref = float64_reference(model)
    return final_hidden(ref, lambda: ref(IDS)), final_hidden(model, lambda: model(IDS))


@contextlib.contextmanager
def captured_masks(model):
    """Every ``(LayerCall, BlockMask)`` the active method builds inside the block, in call order."""
    method = sparse_llm.active_method(model)
    seen = []
    inner = method.block_mask

    def block_mask(q, k, v, call):
        mask = inner(q, k, v, call)
        seen.append((call, mask))
        return mask

    method.block_mask = block_mask  # an instance attribute shadows the method
    try:
        yield seen
    finally:
        del method.block_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", METHODS)
def test_chunked_prefill_at_exact_params_equals_the_whole_prompt(name, variant):
    cls = method_class(name)
    if cls.exact_params is None:
        pytest.skip(f"{name} declares no exact setting (exact_params = None)")
    model = model_of(variant)
    ref64, pt = references(variant)
    bound = rule_bound(ref64, pt)
    with sparse_llm.sparse_attention(model, name, **{"block_size": BLOCK, **cls.exact_params}):
        for chunk in (37, 64):  # off and on the block grid
            ours = final_hidden(model, lambda chunk=chunk: sparse_llm.prefill(model, IDS, chunk))
            assert ours.shape == ref64.shape and torch.isfinite(ours).all()
            err = (ours.double() - ref64).abs().max().item()
            assert err <= bound, f"{name} in chunks of {chunk}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", METHODS)
def test_generate_with_prefill_chunk_size_at_exact_params_gives_the_sdpa_tokens(name):
    cls = method_class(name)
    if cls.exact_params is None:
        pytest.skip(f"{name} declares no exact setting (exact_params = None)")
    model = model_of("gemma3")
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = model.generate(IDS, **gen)
        with sparse_llm.sparse_attention(model, name, **{"block_size": BLOCK, **cls.exact_params}):
            got = model.generate(IDS, prefill_chunk_size=45, **gen)
            chunks = sparse_llm.attention_stats(model)["prefill"]["chunks"]
    assert torch.equal(got, expected)
    assert [(c["start"], c["length"]) for c in chunks] == [(0, 45), (45, 45), (90, 45), (135, 22)]


def row_limit(method, kv_len: int) -> int | None:
    """Most key blocks a (non dense-tail) query block may select: the budget of a budgeted method,
    else sinks plus the keys of the block's windows (one more block: a run off the block grid
    straddles one)."""
    if isinstance(method, BudgetedMethod):
        return method.budget_blocks
    base = getattr(method, "_base", None)  # lla: its base method's blocks
    if base is not None:
        return row_limit(base, kv_len)
    if not hasattr(method, "sink_tokens"):
        return None
    bs = method.block_size
    window = getattr(method, "window", None)
    if callable(window):  # deltallm: a window that grows with the context
        local = window(kv_len)
    elif window is not None:  # neighborhood: per-query windows, the block's first query reaches back furthest
        local = window + method.halo + bs - 1
    else:
        local = method.local_tokens
    return -(-method.sink_tokens // bs) + -(-local // bs) + 1


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
@pytest.mark.parametrize("name", METHODS)
def test_sparse_chunks_are_valid_finite_within_budget_with_one_dense_tail(name, variant):
    model = model_of(variant)
    chunk = 48
    with sparse_llm.sparse_attention(model, name, **sparse_setting(name)):
        method = sparse_llm.active_method(model)
        with captured_masks(model) as seen:
            hidden = final_hidden(model, lambda: sparse_llm.prefill(model, IDS, chunk))
        stats = sparse_llm.attention_stats(model)["prefill"]
    assert torch.isfinite(hidden).all()
    starts = list(range(0, SEQ, chunk))
    assert [(c["start"], c["length"]) for c in stats["chunks"]] == [(s, min(chunk, SEQ - s)) for s in starts]
    assert all(0 < c["density"] <= 1 for c in stats["chunks"]) and 0 < stats["density"] <= 1
    tail = getattr(method, "dense_tail_blocks", 0)
    per_chunk = {}
    for call, mask in seen:
        mask.validate()
        start = mask.kv_len - mask.q_len
        assert start in starts and call.prompt_continues == (start != starts[-1])
        per_chunk.setdefault(start, []).append(mask.density())
        rows = mask.to_dense().sum(-1)  # [B, H, nQ]
        limit = row_limit(method, mask.kv_len)
        if not call.prompt_continues and tail:  # the prompt's end: its last blocks attend every key
            reach = mask.reachable()[-tail:].sum(-1)
            assert (rows[..., -tail:] == reach).all(), f"{name}: dense tail missing at the prompt's end"
            rows = rows[..., :-tail]
        if limit is not None and rows.numel():
            assert rows.max() <= limit, (
                f"{name}: a row of the chunk at {start} selects {rows.max()} > {limit}"
            )
    # Every call the method saw is a sparse layer's: the reported chunk density is their mean.
    for c in stats["chunks"] if seen else ():
        densities = per_chunk[c["start"]]
        assert c["density"] == pytest.approx(sum(densities) / len(densities))


@pytest.mark.parametrize("name", ["block_topk", "routing", "dhsa"])
def test_group_heads_select_one_row_per_kv_head_in_every_chunk(name):
    """heads="group" under chunked prefill: one mask row per KV head in every chunk, finite outputs."""
    model = model_of("llama")  # Hq = 4, Hkv = 2
    with sparse_llm.sparse_attention(model, name, heads="group", **sparse_setting(name)):
        with captured_masks(model) as seen:
            hidden = final_hidden(model, lambda: sparse_llm.prefill(model, IDS, 48))
    assert torch.isfinite(hidden).all()
    assert seen and {mask.kv_num_blocks.shape[1] for _, mask in seen} == {model.config.num_key_value_heads}


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n) for n in CHUNK_INVARIANT if n in sparse_llm.list_methods()]
)
def test_chunks_on_the_block_grid_select_the_blocks_of_the_whole_prompt(name):
    model = model_of("llama")
    with sparse_llm.sparse_attention(model, name, **sparse_setting(name)):
        whole = final_hidden(model, lambda: sparse_llm.prefill(model, IDS))
        density = sparse_llm.attention_stats(model)["prefill"]["density"]
        chunked = final_hidden(model, lambda: sparse_llm.prefill(model, IDS, 3 * BLOCK))
        stats = sparse_llm.attention_stats(model)["prefill"]
    assert density < 1, f"{name} is not sparse at {sparse_setting(name)}"
    # Same blocks: the same density, and the same output up to float32 rounding of a different
    # summation order (both are float32 computations of one attention: the rule bounds them).
    assert stats["density"] == pytest.approx(density)
    bound = rule_bound(*references("llama"))
    assert (chunked - whole).abs().max().item() <= bound


@pytest.mark.parametrize(
    "q_len, kv_len",
    [
        pytest.param(203, 203, id="whole"),
        pytest.param(64, 203, id="on-grid"),  # starts at 139: off the grid of 16
        pytest.param(37, 150, id="odd"),
        pytest.param(48, 96, id="aligned"),
        pytest.param(2, 203, id="two"),
    ],
)
def test_sinks_and_window_sit_at_absolute_positions_in_a_chunk(q_len, kv_len):
    sink, local, bs = 20, 40, 16
    mask = BlockMask.sink_window(
        q_len=q_len, kv_len=kv_len, block_q=bs, block_k=bs, sink_tokens=sink, local_tokens=local
    )
    kept = element_mask(mask, num_q_heads=1, num_kv_heads=1)[0, 0, 0]  # [Tq, Tk]
    i = torch.arange(q_len)[:, None]
    pos = i + kv_len - q_len  # absolute query positions
    # The window ends at the last query of the query block (the chunk's grid), at its absolute position.
    end = torch.clamp((i // bs + 1) * bs, max=q_len) - 1 + kv_len - q_len
    key = torch.arange(kv_len)[None, :]
    causal = key <= pos
    needed = causal & ((key < sink) | (key > end - local))
    assert not (needed & ~kept).any(), "a sink or window key of its absolute position is missing"
    # Nothing beyond the sink blocks and the window rounded out to whole key blocks.
    allowed = causal & ((key < -(-sink // bs) * bs) | (key >= (end - local + 1) // bs * bs))
    assert not (kept & ~allowed).any()
    if (kv_len - q_len) % bs == 0:  # on the whole prompt's grid: its rows, exactly
        whole = BlockMask.sink_window(
            q_len=kv_len, kv_len=kv_len, block_q=bs, block_k=bs, sink_tokens=sink, local_tokens=local
        )
        n = mask.num_q_blocks
        assert torch.equal(mask.to_dense(), whole.to_dense()[:, :, -n:])


BUDGETED = [
    pytest.param(name, id=name)
    for name in sparse_llm.list_methods()
    if isinstance(sparse_llm.get_method(name), BudgetedMethod)
]


@pytest.mark.parametrize("name", BUDGETED)
def test_a_chunk_keeps_its_absolute_sinks_and_window_and_its_budget(name):
    torch.manual_seed(3)
    q_len, kv_len, bs = 70, 203, BLOCK
    q, k = torch.randn(1, 4, q_len, 32), torch.randn(1, 2, kv_len, 32)
    params = {**method_class(name).small_params, "dense_tail_blocks": 1}
    method = sparse_llm.get_method(name, **params)
    forced = BlockMask.sink_window(
        q_len=q_len,
        kv_len=kv_len,
        block_q=bs,
        block_k=bs,
        sink_tokens=method.sink_tokens,
        local_tokens=method.local_tokens,
    ).to_dense()
    call = LayerCall(0, 32**-0.5)
    for continues in (True, False):
        mask = method.block_mask(q, k, k, replace(call, prompt_continues=continues)).validate()
        dense = mask.to_dense()
        assert (dense | ~forced).all(), f"{name}: a sink or window block of the chunk is missing"
        rows = dense.sum(-1)
        if continues:  # more prompt follows: no dense tail, every row within the budget
            assert rows.max() <= method.budget_blocks
        else:  # the prompt's last block attends every key
            assert (rows[..., :-1].max() <= method.budget_blocks) and (
                rows[..., -1] == kv_len // bs + 1
            ).all()


def test_min_seq_len_counts_the_context_of_a_chunk():
    model = model_of("llama")
    params = dict(block_size=BLOCK, sink_tokens=16, local_tokens=16, min_seq_len=100)
    with sparse_llm.sparse_attention(model, "streaming", **params):
        sparse_llm.prefill(model, IDS, 48)  # contexts 48, 96, 144, 157
        chunks = sparse_llm.attention_stats(model)["prefill"]["chunks"]
    assert [c["density"] == 1 for c in chunks] == [True, True, False, False]


def test_prefill_stats_cover_the_latest_prompt_and_survive_decoding():
    model = model_of("llama")
    with sparse_llm.sparse_attention(model, "streaming", **sparse_setting("streaming")), torch.no_grad():
        sparse_llm.prefill(model, IDS)
        whole = sparse_llm.attention_stats(model)
        assert whole["prefill"] == {
            "density": pytest.approx(whole["density"]),
            "far_density": 0.0,  # streaming has no far field
            "chunks": [
                {"start": 0, "length": SEQ, "density": pytest.approx(whole["density"]), "far_density": 0.0}
            ],
        }
        model.generate(
            IDS[:, :100], prefill_chunk_size=40, max_new_tokens=3, min_new_tokens=3, do_sample=False
        )
        stats = sparse_llm.attention_stats(model)
    assert stats["layers"][0]["density"] == 1.0  # the last forward: a (dense) decode step
    assert [(c["start"], c["length"]) for c in stats["prefill"]["chunks"]] == [(0, 40), (40, 40), (80, 20)]
    # A chunk's density averages the layers; the total weighs each chunk by its reachable blocks.
    densities = [c["density"] for c in stats["prefill"]["chunks"]]
    assert min(densities) <= stats["prefill"]["density"] <= max(densities)


def test_prefill_rejects_bad_chunk_sizes_and_empty_prompts():
    model = model_of("llama")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            sparse_llm.prefill(model, IDS, bad)
    with pytest.raises(ValueError, match="empty prompt"):
        sparse_llm.prefill(model, IDS[:, :0])


def test_prefill_in_chunks_of_a_left_padded_batch_equals_its_whole_prefill():
    model = model_of("llama")
    ids = random_ids(2, 90, seed=12)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :21] = 0
    with sparse_llm.sparse_attention(model, "block_topk", **sparse_setting("block_topk")), torch.no_grad():
        whole = sparse_llm.prefill(model, ids, attention_mask=attention_mask, logits_to_keep=0).logits
        chunked = sparse_llm.prefill(model, ids, 32, attention_mask=attention_mask, logits_to_keep=0).logits
    # The last chunk's positions, both rows; both float32, within the rule of each other (its scale:
    # the dense HF float32 error against float64).
    with torch.no_grad():  # (eager float64 gives NaN on padded rows: the scale is taken unpadded)
        ref64 = float64_reference(model)(ids).logits[:, -26:]
        pt = model(ids).logits[:, -26:]
    assert torch.isfinite(chunked).all() and chunked.shape == (2, 26, whole.shape[-1])
    assert (chunked - whole[:, -26:]).abs().max().item() <= rule_bound(ref64, pt)
