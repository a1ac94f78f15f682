"""The demo runner on a tiny random Gemma 3 model (the embedded-model loader is replaced; no files read)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS
from tiny_tokenizer import train_tokenizer
from transformers import AutoModelForCausalLM

from sparse_llm import demo
from sparse_llm.eval.haystack import INTRO, NEEDLES
from sparse_llm.texts import REPEAT_FILLER


@pytest.fixture
def tiny_load(monkeypatch):
    tokenizer = train_tokenizer(
        [REPEAT_FILLER, INTRO, *(n.text + " " + n.question for n in NEEDLES.values())]
    )
    config = CONFIGS["gemma3"]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    calls = []

    def load_tokenizer(name):
        calls.append(("tokenizer", name))
        return tokenizer

    def load_model(name, *, device="cpu"):
        calls.append(("model", name))
        return model

    monkeypatch.setattr(demo, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(demo, "load_model", load_model)
    monkeypatch.setattr(demo, "max_positions", lambda name: config.max_position_embeddings)
    return calls


def test_demo_rows_start_with_the_sdpa_baseline(tiny_load):
    rows = demo.run_demo(
        "tiny", context_tokens=300, methods=("dense", "sdpa", "dense"), max_new_tokens=3, progress=False
    )
    assert tiny_load == [("tokenizer", "tiny"), ("model", "tiny")]
    assert [row.method for row in rows] == ["sdpa", "dense"]
    assert rows[0].density is None and rows[1].density == pytest.approx(1.0)
    for row in rows:
        assert row.prefill_s > 0 and row.peak_mem_mb >= 0
        assert isinstance(row.answer, str) and row.correct is (NEEDLES["passkey"].answer in row.answer)
    # Same weights, exact method: the same greedy answer.
    assert rows[1].answer == rows[0].answer
    table = demo.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["method", "density", "far", "prefill"]
    assert table[2].startswith("sdpa") and table[3].startswith("dense") and "1.000" in table[3]
    assert rows[1].far_density == 0.0 and table[3].split()[2] == "-"  # dense has no far field


def test_demo_table_shows_the_far_field_of_a_selection_method(tiny_load):
    rows = demo.run_demo(
        "tiny",
        context_tokens=300,
        methods=("block_topk",),
        method_params={"block_topk": {"block_size": 16, "budget": 64, "sink_tokens": 16, "local_tokens": 32}},
        max_new_tokens=2,
        progress=False,
    )
    far = rows[1].far_density
    assert 0 < far < 1 and rows[1].density < 1
    assert demo.format_table(rows).splitlines()[3].split()[2] == f"{far:.3f}"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"methods": ("nope",)}, "nope", id="unknown-method"),
        pytest.param(
            {"methods": ("dense",), "method_params": {"streaming": {}}}, "not run", id="params-unused"
        ),
        pytest.param({"haystack": "bible"}, "haystack", id="unknown-haystack"),
        pytest.param({"max_new_tokens": 0}, "max_new_tokens", id="no-new-tokens"),
        pytest.param(
            {"context_tokens": 1020},
            r"lengths \[1020\] do not fit the model's context: 1024 positions \(max_position_embeddings\) "
            "minus 12 answer tokens = 1012",
            id="beyond-the-context",
        ),
    ],
)
def test_demo_rejects_bad_arguments_before_loading(tiny_load, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.run_demo("tiny", **{"context_tokens": 300, **kwargs})
    assert tiny_load == []


def test_demo_rejects_a_prompt_too_short_for_the_needle_before_loading_the_model(tiny_load):
    with pytest.raises(ValueError, match="context_tokens=10 is too short"):
        demo.run_demo("tiny", context_tokens=10)
    assert tiny_load == [("tokenizer", "tiny")]
