"""Needle prompts: exact length, needle depth, chat templates, scoring and input errors (offline)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from tiny_tokenizer import train_tokenizer

from sparse_llm.eval.haystack import (
    INTRO,
    NEEDLES,
    Needle,
    build_needle_prompt,
    score_answer,
    split_sentences,
)
from sparse_llm.texts import REPEAT_FILLER, load_haystack_text

# Numbered sentences of equal token length: the sentences before the needle give its depth.
FIRST, COUNT = 1000, 2000
NUMBERED = " ".join(f"Line number {n} is here." for n in range(FIRST, FIRST + COUNT))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [NUMBERED, REPEAT_FILLER, INTRO, *(n.text + " " + n.question for n in NEEDLES.values())]
    return train_tokenizer(corpus)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = None


@pytest.mark.parametrize("context_tokens", [120, 513, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_is_exact(tokenizer, context_tokens, depth):
    prompt = build_needle_prompt(tokenizer, context_tokens=context_tokens, depth=depth, haystack=NUMBERED)
    assert prompt.input_ids.shape == (1, context_tokens)
    assert prompt.context_tokens == context_tokens


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_needle_lands_at_depth_on_a_sentence_boundary(tokenizer, depth):
    prompt = build_needle_prompt(tokenizer, context_tokens=2000, depth=depth, haystack=NUMBERED)
    ids = prompt.input_ids[0].tolist()
    start, end = prompt.needle_span
    assert tokenizer.decode(ids[start:end]).strip() == NEEDLES["passkey"].text
    before = tokenizer.decode(ids[:start])
    numbers = [int(n) for n in re.findall(r"Line number (\d+)", tokenizer.decode(ids))]
    count_before = len(re.findall(r"Line number \d+ is here\.", before))
    assert numbers == list(range(FIRST, FIRST + len(numbers)))  # nothing lost or reordered
    # Within one sentence of the requested depth, and right after a complete sentence (or the intro).
    assert abs(count_before - depth * len(numbers)) <= 1
    assert before.endswith("is here.") or (count_before == 0 and before.endswith("\n\n"))
    assert prompt.needle_depth == pytest.approx(depth, abs=1.5 / len(numbers))


def test_plain_prompt_layout(tokenizer):
    prompt = build_needle_prompt(
        tokenizer, context_tokens=300, depth=0.5, haystack=NUMBERED, chat_template=True
    )
    ids = prompt.input_ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids  # the post-processor's EOS is not carried into the prompt
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(INTRO + "\n\nLine number 1000 is here. Line number 1001")
    assert text.endswith("\n\nWhat is the pass key?\nThe pass key is")


def test_chat_template_is_applied(chat_tokenizer):
    prompt = build_needle_prompt(
        chat_tokenizer, context_tokens=300, depth=0.5, haystack=NUMBERED, needle="city"
    )
    ids = prompt.input_ids[0].tolist()
    assert ids.count(chat_tokenizer.bos_token_id) == 1 and ids[0] == chat_tokenizer.bos_token_id
    text = chat_tokenizer.decode(ids)
    assert text.startswith(f"<bos><|user|>{INTRO}\n\nLine number 1000")
    city = NEEDLES["city"]
    assert text.endswith(f"{city.question}<|end|><|assistant|>{city.answer_prefix}")
    assert prompt.answer == city.answer and city.text in text
    plain = build_needle_prompt(
        chat_tokenizer, context_tokens=300, depth=0.5, haystack=NUMBERED, chat_template=False
    )
    assert "<|assistant|>" not in chat_tokenizer.decode(plain.input_ids[0])


def test_short_haystack_is_repeated(tokenizer):
    prompt = build_needle_prompt(tokenizer, context_tokens=800, depth=0.5, haystack=REPEAT_FILLER)
    assert prompt.input_ids.shape == (1, 800)
    assert tokenizer.decode(prompt.input_ids[0]).count("The sky is blue.") > 20


def test_custom_needle(tokenizer):
    needle = Needle("The secret word is banana.", "What is the secret word?", "banana", "The secret word is")
    prompt = build_needle_prompt(tokenizer, context_tokens=256, depth=0.2, needle=needle, haystack=NUMBERED)
    assert prompt.answer == "banana"
    assert "The secret word is banana." in tokenizer.decode(prompt.input_ids[0])


@pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None, reason="needs its data")
def test_default_haystack_is_the_essays(tokenizer):
    text = load_haystack_text()
    assert len(text) > 1_000_000
    sentences = split_sentences(text)
    assert sentences[0].startswith("April 2012 A palliative care nurse")  # date heading split off
    prompt = build_needle_prompt(tokenizer, context_tokens=512, depth=0.5)
    assert prompt.input_ids.shape == (1, 512)


def test_split_sentences_restores_lost_paragraph_breaks():
    assert split_sentences('Five\n mistakes.If you had  to. Why? "Yes." Done') == [
        "Five mistakes.",
        "If you had to.",
        "Why?",
        '"Yes."',
        "Done",
    ]


@pytest.mark.parametrize(
    "generated, answer, expected",
    [
        pytest.param(" 71432. Remember it.", "71432", True, id="number-then-period"),
        pytest.param("The pass key is 71432", "71432", True, id="at-end"),
        pytest.param("714321", "71432", False, id="longer-number"),
        pytest.param("171432", "71432", False, id="number-suffix"),
        pytest.param("71 432", "71432", False, id="split-digits"),
        pytest.param("the key to success", "71432", False, id="missing"),
        pytest.param("It is BANANA!", "banana", True, id="case-insensitive"),
        pytest.param("bananas", "banana", False, id="word-prefix"),
        pytest.param("", "71432", False, id="empty-generation"),
    ],
)
def test_score_answer(generated, answer, expected):
    assert score_answer(generated, answer) is expected


def test_score_answer_rejects_bad_input():
    with pytest.raises(ValueError, match="answer"):
        score_answer("71432", " ")
    with pytest.raises(TypeError):
        score_answer(None, "71432")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"context_tokens": 0, "depth": 0.5}, "context_tokens", id="zero-length"),
        pytest.param({"context_tokens": 512.0, "depth": 0.5}, "context_tokens", id="float-length"),
        pytest.param({"context_tokens": True, "depth": 0.5}, "context_tokens", id="bool-length"),
        pytest.param({"context_tokens": 30, "depth": 0.5}, "too short", id="shorter-than-frame"),
        pytest.param({"context_tokens": 512, "depth": -0.1}, "depth", id="negative-depth"),
        pytest.param({"context_tokens": 512, "depth": 1.5}, "depth", id="depth-above-one"),
        pytest.param({"context_tokens": 512, "depth": "0.5"}, "depth", id="string-depth"),
        pytest.param(
            {"context_tokens": 512, "depth": 0.5, "needle": "pasky"}, "unknown needle", id="bad-needle"
        ),
        pytest.param({"context_tokens": 512, "depth": 0.5, "haystack": " \n "}, "empty", id="empty-haystack"),
    ],
)
def test_bad_prompt_arguments(tokenizer, kwargs, match):
    kwargs.setdefault("haystack", NUMBERED)
    with pytest.raises(ValueError, match=match):
        build_needle_prompt(tokenizer, **kwargs)


def test_needle_must_contain_its_answer():
    with pytest.raises(ValueError, match="does not occur"):
        Needle("The pass key is 71432.", "What is the pass key?", "12345")
    with pytest.raises(ValueError, match="question"):
        Needle("The pass key is 71432.", "", "71432")


def test_haystack_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_haystack_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_haystack_text(empty)
    text = tmp_path / "text.txt"
    text.write_text("One sentence. Another one.", encoding="utf-8")
    assert load_haystack_text(text) == "One sentence. Another one."
