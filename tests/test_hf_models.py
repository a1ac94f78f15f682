"""Model-level checks on tiny random Llama / Gemma2 / Gemma3 / BitNet models (no hub)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, float64_reference, random_ids, rule_bound, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import sparse_llm

SEQ = 150  # not a multiple of the block size; longer than the tiny Gemma windows (48)


def logits(model, ids, attention_mask=None):
    position_ids = None
    if attention_mask is not None:  # as generate() does: positions count real tokens only
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_matches_hf_reference_logits(family):
    model = tiny_model(family)
    ids = random_ids(1, SEQ)
    ref64 = logits(float64_reference(model), ids)
    pt = logits(model, ids)
    with sparse_llm.sparse_attention(model, "dense", block_size=32):
        ours = logits(model, ids)
    err = (ours.double() - ref64).abs().max().item()
    assert err <= rule_bound(ref64, pt), f"{family}: dense error {err:.3g} vs HF fp32 error"


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_greedy_generation_matches_hf_with_kv_cache(family):
    model = tiny_model(family)
    ids = random_ids(1, 70, seed=1)
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **gen)
        with sparse_llm.sparse_attention(model, "dense", block_size=16):
            got = model.generate(ids, **gen)
    assert got.shape[1] == ids.shape[1] + 20
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_single_runs(family):
    model = tiny_model(family)
    long, short = random_ids(1, 120, seed=2), random_ids(1, 77, seed=3)
    pad = long.shape[1] - short.shape[1]
    # Padding positions hold ordinary tokens, so only the attention mask keeps them out.
    batch = torch.cat([long, torch.cat([random_ids(1, pad, seed=9), short], 1)])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :pad] = 0
    ref64 = float64_reference(model)
    with sparse_llm.sparse_attention(model, "dense", block_size=32):
        batched = logits(model, batch, attention_mask)
    for row, single in enumerate([long, short]):
        ours = batched[row, -single.shape[1] :]
        expected = logits(ref64, single)[0]
        pt = logits(model, single)[0]
        err = (ours.double() - expected).abs().max().item()
        assert err <= rule_bound(expected, pt), f"{family} row {row}: {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_unsparsify_restores_bit_identical_outputs(family):
    model = tiny_model(family)
    previous = model.config._attn_implementation
    ids = random_ids(1, SEQ)
    before = logits(model, ids)
    sparse_llm.sparsify(model, "streaming", sink_tokens=16, local_tokens=32, block_size=16)
    name = model.config._attn_implementation
    assert name != previous and name in AttentionInterface._global_mapping
    sparse_out = logits(model, ids)
    assert not torch.equal(sparse_out, before)  # the method was really in use
    assert sparse_llm.unsparsify(model) is model
    assert model.config._attn_implementation == previous
    assert (
        name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping
    )
    assert torch.equal(logits(model, ids), before)


def test_restoring_the_model_frees_the_kernels_gather_buffers():
    """The CPU kernel keeps its gather buffers between calls; leaving the method frees them."""
    from sparse_llm.kernels import cpu

    model = tiny_model("llama")
    params = dict(budget=64, sink_tokens=16, local_tokens=16, block_size=16, far_keys="none", min_seq_len=0)
    with sparse_llm.sparse_attention(model, "block_topk", **params):
        logits(model, random_ids(1, 300, seed=3))
        assert cpu._gather_buffers.__dict__  # selected blocks were gathered
    assert not cpu._gather_buffers.__dict__


def test_small_budget_is_sparse_and_sliding_layers_stay_exact():
    model = tiny_model("gemma3")
    ids = random_ids(1, 300, seed=5)
    with sparse_llm.sparse_attention(model, "streaming", sink_tokens=16, local_tokens=32, block_size=16):
        logits(model, ids)
        stats = sparse_llm.attention_stats(model)
    layers = stats["layers"]
    assert [layers[i]["sparse"] for i in range(3)] == [False, False, True]  # layer types of the config
    assert layers[0]["density"] == 1.0  # the local layer keeps its whole window
    assert 0 < stats["density"] < 0.5


def test_dense_layers_and_min_seq_len_keep_layers_dense():
    model = tiny_model("llama")
    ids = random_ids(1, 200, seed=6)
    with sparse_llm.sparse_attention(
        model, "streaming", sink_tokens=16, local_tokens=32, block_size=16, dense_layers=[0]
    ):
        logits(model, ids)
        layers = sparse_llm.attention_stats(model)["layers"]
    assert layers[0]["sparse"] is False and layers[1]["sparse"] is True
    with sparse_llm.sparse_attention(
        model, "streaming", sink_tokens=16, local_tokens=32, block_size=16, min_seq_len=201
    ):
        logits(model, ids)
        assert sparse_llm.attention_stats(model)["density"] == 1.0


def test_sparse_decode_uses_the_method_for_single_tokens():
    model = tiny_model("llama")
    ids = random_ids(1, 200, seed=7)
    for decode, expect_sparse in [("dense", False), ("sparse", True)]:
        with (
            sparse_llm.sparse_attention(
                model, "streaming", sink_tokens=16, local_tokens=32, block_size=16, decode=decode
            ),
            torch.no_grad(),
        ):
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            layers = sparse_llm.attention_stats(model)["layers"]
        assert layers[1]["sparse"] is expect_sparse


def test_context_manager_restores_on_error_and_nesting():
    model = tiny_model("llama")
    previous = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), sparse_llm.sparse_attention(model, "dense"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == previous
    assert sparse_llm.active_method(model) is None
    with sparse_llm.sparse_attention(model, "streaming"):
        outer = model.config._attn_implementation
        streaming = sparse_llm.active_method(model)
        with sparse_llm.sparse_attention(model, "dense"):
            assert model.config._attn_implementation != outer
            assert sparse_llm.active_method(model).name == "dense"
        assert sparse_llm.active_method(model) is streaming
        assert sparse_llm.attention_stats(model)["method"] == "streaming"
    assert model.config._attn_implementation == previous
    assert sparse_llm.active_method(model) is None


# "auto" puts everything on the CPU here; the explicit map offloads layer 1 to disk, so accelerate's
# hooks load its weights during the forward (the sharded setting, without a second device).
OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize("device_map", ["auto", OFFLOAD_MAP], ids=["auto", "disk-offload"])
def test_model_loaded_with_device_map(tmp_path, device_map):
    original = tiny_model("llama")
    original.save_pretrained(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        attn_implementation="sdpa",
    ).eval()
    if isinstance(device_map, dict):
        assert model.hf_device_map["model.layers.1"] == "disk"
    ids = random_ids(1, 100, seed=8)
    expected = logits(model, ids)
    with sparse_llm.sparse_attention(model, "dense", block_size=32):
        got = logits(model, ids)
    ref64 = logits(float64_reference(original), ids)  # an offloaded model cannot be copied and cast
    assert (got.double() - ref64).abs().max().item() <= rule_bound(ref64, expected)
