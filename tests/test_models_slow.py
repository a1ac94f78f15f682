"""The embedded models load, answer a factual prompt, reuse their cache, and agree across attentions.

Slow: the first run builds each model's cache (about a minute per model on a small CPU); later runs
load it in seconds.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from sparse_llm import models
from sparse_llm.texts import load_haystack_text

pytestmark = pytest.mark.slow

FACTS = [
    pytest.param("gemma3-270m", "The Eiffel Tower is located in the city of", "Paris", id="gemma3-270m"),
    pytest.param("smollm2-135m", "What is the capital of France?", "Paris", id="smollm2-135m"),
]
NAMES = [p.values[0] for p in FACTS]


def _ids(tokenizer, text: str) -> torch.Tensor:
    if tokenizer.chat_template:  # the instruct model answers the question as a chat turn
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("name, prompt, word", FACTS)
def test_greedy_completion_is_factual(name, prompt, word):
    model, tokenizer = models.load(name)
    ids = _ids(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert word in completion, completion


def test_build_writes_a_complete_cache_atomically(tmp_path):
    model, tokenizer = models.load("smollm2-135m", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary folder left
    files = {p.name for p in (tmp_path / "smollm2-135m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "sparse_llm_model.json"} <= files
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template


@pytest.mark.parametrize("name", NAMES)
def test_second_load_reads_the_cache(name, monkeypatch):
    models.load(name)  # builds the cache if this is the first use

    def no_build(*args):
        raise AssertionError("the cached checkpoint was not reused")

    monkeypatch.setattr(models, "_build", no_build)
    start = time.perf_counter()
    model, _ = models.load(name, dtype=torch.bfloat16)
    assert time.perf_counter() - start < 30
    assert model.dtype == torch.bfloat16 and not model.training


@pytest.mark.parametrize("name", NAMES)
def test_registry_context_is_the_built_config_s(name):
    config = json.loads((models.ensure_built(name) / "config.json").read_text())
    assert models.max_positions(name) == config["max_position_embeddings"]


def test_gemma3_sliding_window_config_survives_the_cache():
    model, _ = models.load("gemma3-270m")
    config = model.config
    assert config.model_type == "gemma3_text" and type(model).__name__ == "Gemma3ForCausalLM"
    assert config.sliding_window == 512
    # Gemma 3: five sliding-window layers, then one global layer.
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert set(config.rope_parameters) == {"sliding_attention", "full_attention"}
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == [512 if kind == "sliding_attention" else None for kind in config.layer_types]


@pytest.mark.parametrize("name", NAMES)
def test_sdpa_matches_eager(name):
    """sdpa and eager logits agree under the 2x rule against a float64 eager reference.

    The prompt (700 tokens) is longer than Gemma 3's 512-token window, and the logits compared are
    those of the last 64 positions, which see the window cut off their earliest keys.
    """
    sdpa, tokenizer = models.load(name, attn_implementation="sdpa")
    eager, _ = models.load(name, attn_implementation="eager")
    ref, _ = models.load(name, attn_implementation="eager", dtype=torch.float64)
    ids = tokenizer(load_haystack_text()[:20_000], return_tensors="pt").input_ids[:, :700]
    assert ids.shape[1] == 700
    with torch.inference_mode():
        out, pt, gold = (m(ids, logits_to_keep=64).logits for m in (sdpa, eager, ref))
    floor = 2 * torch.finfo(torch.float32).eps * gold.abs().max().item()
    err, err_pt = (out.double() - gold).abs().max().item(), (pt.double() - gold).abs().max().item()
    assert err <= 2 * err_pt + floor, (err, err_pt, floor)
    assert torch.equal(out.argmax(-1), pt.argmax(-1))
