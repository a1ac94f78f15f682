"""``--protocol ruler``: RULER's niah_single strings, seeded draws, string_match_all, 128 answer
tokens, recorded in the results; on the tiny model and an in-process tokenizer (offline).

The strings are checked against the installed lm-eval RULER task's source (read, not imported:
importing ``prepare_niah`` downloads nltk data), and the score against its ``string_match_all``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
from tiny_tokenizer import train_tokenizer

from sparse_llm.cli import main
from sparse_llm.eval import niah, ruler, sweep
from sparse_llm.eval.common import MethodSpec
from sparse_llm.results import config_hash
from sparse_llm.texts import REPEAT_FILLER, ruler_key_words

LM_EVAL = importlib.util.find_spec("lm_eval")
RULER_DIR = Path(LM_EVAL.submodule_search_locations[0], "tasks", "ruler") if LM_EVAL else None
needs_lm_eval = pytest.mark.skipif(LM_EVAL is None, reason="compares with the installed lm-eval RULER task")
needs_words = pytest.mark.skipif(
    importlib.util.find_spec("wonderwords") is None, reason="RULER's keys come from wonderwords"
)
# Essay-like text: sentences of different lengths joined by spaces.
ESSAY = " ".join(f"Essay sentence {n} says {'very ' * (n % 5)}little." for n in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([ESSAY, REPEAT_FILLER, ruler.INTRO, ruler.NEEDLE, ruler.QUESTION])


def ruler_config(**overrides) -> niah.NiahConfig:
    kwargs = dict(model="tiny", methods=("sdpa",), protocol="ruler", haystack="repeat", lengths=(256,))
    return niah.NiahConfig(**{**kwargs, **overrides})


def assigned_string(path: Path, name: str) -> str:
    """The string literal assigned to ``name`` at the top level of a Python file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not in {path}")


# ------------------------------------------------------------------------ RULER's own definitions


@needs_lm_eval
def test_strings_are_rulers_single_needle_forms():
    template = assigned_string(RULER_DIR / "niah_utils.py", "TEMPLATE")
    # RULER's singular form for one needle and one query (prepare_niah.generate_input_output).
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(old, new)
    ours = f"{ruler.INTRO}\n{{context}}\n{ruler.QUESTION.format(key='{query}')}"
    assert template.format(type_needle_v="number", context="{context}", query="{query}") == ours
    needle = assigned_string(RULER_DIR / "prepare_niah.py", "NEEDLE")
    ours = ruler.NEEDLE.format(key="K", value="V")
    assert needle.format(type_needle_v="numbers", key="K", value="V") == ours
    source = (RULER_DIR / "prepare_niah.py").read_text()
    prefix = 'f"The special magic {type_needle_v[:-1]} for {query} mentioned in the provided text is"'
    assert prefix in source and ruler.ANSWER_PREFIX.format(key="Q") == eval(
        prefix, {"type_needle_v": "numbers", "query": "Q"}
    )
    assert re.search(r"^RANDOM_SEED = 42$", source, re.M) and ruler.SEED == 42
    assert 'haystack = "The grass is green. The sky is blue.' in source and REPEAT_FILLER in source
    yaml = (RULER_DIR / "niah_single_1.yaml").read_text()
    assert f"max_gen_toks: {ruler.TOKENS_TO_GENERATE}\n" in yaml and "do_sample: false" in yaml


@needs_lm_eval
@pytest.mark.parametrize(
    "reply, references",
    [
        pytest.param("The number is 4619832.", ["4619832"], id="found"),
        pytest.param("no number here", ["4619832"], id="none"),
        pytest.param("46198321", ["4619832"], id="substring-counts"),
        pytest.param("4619832 and 777", ["4619832", "1234567"], id="some"),
        pytest.param("a 4619832 b 1234567", ["4619832", "1234567"], id="all"),
        pytest.param("Key: BIG-Owl", ["big-owl"], id="case-insensitive"),
        pytest.param("  461\x009832 ", ["4619832"], id="control-character-splits"),
    ],
)
def test_string_match_all_is_rulers(reply, references):
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    expected = string_match_all(postprocess_pred([reply]), [references])
    assert ruler.string_match_all(reply, references) == expected


@pytest.mark.parametrize(
    "reply, references, expected",
    [
        pytest.param("... is 4619832.", ["4619832"], 1.0, id="all-found"),
        pytest.param("4619832, not the other", ["4619832", "1234567"], 0.5, id="some-found"),
        pytest.param("I do not know.", ["4619832"], 0.0, id="none-found"),
        pytest.param("THE KEY IS ABC-DEF", ["abc-def"], 1.0, id="case"),
    ],
)
def test_string_match_all_scores(reply, references, expected):
    assert ruler.string_match_all(reply, references) == expected


def test_string_match_all_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        ruler.string_match_all("4619832", [])


# -------------------------------------------------------------------------------- needles, prompts


@needs_words
def test_needle_draws_are_seeded_per_cell():
    adjectives, nouns = ruler_key_words()
    assert len(adjectives) == len(set(adjectives)) > 500 and len(nouns) == len(set(nouns)) > 5000
    needle = ruler.draw_needle(42, 4096, 0.5)
    assert needle == ruler.draw_needle(42, 4096, 0.5)  # same cell, same needle
    key = re.fullmatch(r"One of the special magic numbers for (.+) is: (\d{7})\.", needle.text).group(1)
    adjective, noun = key.split("-", 1)
    assert adjective in adjectives and noun in nouns
    assert needle.question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert needle.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    assert 10**6 <= int(needle.answer) < 10**7 and needle.answer in needle.text
    cells = [(43, 4096, 0.5), (42, 8192, 0.5), (42, 4096, 0.25)]  # another seed, length, depth
    others = {ruler.draw_needle(*cell).answer for cell in cells}
    assert needle.answer not in others and len(others) == 3


@needs_words
@pytest.mark.parametrize("haystack", ["repeat", "essay-file"])
@pytest.mark.parametrize("length, depth", [(200, 0.0), (256, 0.5), (777, 0.9), (1024, 1.0)])
def test_prompt_is_rulers_with_exactly_length_tokens(tokenizer, tmp_path, haystack, length, depth):
    if haystack == "essay-file":
        haystack = tmp_path / "essay.txt"
        haystack.write_text(ESSAY)
    config = ruler_config(haystack=str(haystack), seed=7)
    p = config.build_prompt(tokenizer, config.haystack_text(), length, depth)
    needle = ruler.draw_needle(7, length, depth)
    assert p.input_ids.shape == (1, length) and p.answer == needle.answer and p.needle_text == needle.text
    text = tokenizer.decode(p.input_ids[0], skip_special_tokens=True)
    assert text.startswith(ruler.INTRO + "\n")
    assert text.endswith(f"\n{needle.question} {needle.answer_prefix}")
    start, end = p.needle_span
    joiner = "\n" if config.haystack == "repeat" else " "
    before = tokenizer.decode(p.input_ids[0, :start], skip_special_tokens=True)
    assert tokenizer.decode(p.input_ids[0, start:end]) == (joiner if depth > 0 else "") + needle.text
    if config.haystack == "repeat":  # one filler copy per line, the needle on its own line
        assert before.endswith(("\n" + REPEAT_FILLER, ruler.INTRO + "\n"))
        assert f"\n{REPEAT_FILLER}\n" in text and f"\n{needle.text}\n" in text
    assert abs(p.needle_depth - depth) < 0.15


def test_chat_template_starts_the_reply_with_the_answer_prefix(tokenizer):
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        config = ruler_config(chat_template=True)
        p = config.build_prompt(tokenizer, REPEAT_FILLER, 300, 0.5)
    finally:
        tokenizer.chat_template = None
    needle = ruler.draw_needle(ruler.SEED, 300, 0.5)
    text = tokenizer.decode(p.input_ids[0])
    assert p.input_ids.shape == (1, 300)
    assert text.startswith(f"<bos><|user|>{ruler.INTRO}\n{REPEAT_FILLER}\n")
    assert text.endswith(f"\n{needle.question}<|end|><|assistant|>{needle.answer_prefix}")


# -------------------------------------------------------------------------------------- the config


def test_ruler_defaults_and_default_protocol_unchanged():
    config = ruler_config()
    assert (config.needle, config.seed, config.max_new_tokens) == ("ruler", 42, ruler.TOKENS_TO_GENERATE)
    assert ruler_config(max_new_tokens=8).max_new_tokens == 8
    fields = niah.run_fields(config)
    assert (fields["protocol"], fields["seed"], fields["needle"]) == ("ruler", 42, "ruler")
    assert fields["max_new_tokens"] == 128
    # The default protocol keeps its fields, values and so its folder hash.
    default = niah.NiahConfig()
    assert (default.needle, default.max_new_tokens) == ("passkey", 16)
    fields = niah.run_fields(default)
    assert "protocol" not in fields and "seed" not in fields
    assert config_hash({"task": "niah", **fields}) == "12196b48"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(protocol="ruler", needle="city"), "draws its own needle", id="ruler-with-preset"),
        pytest.param(
            dict(protocol="ruler", needle_text="X is 9.", question="X?", answer="9"),
            "draws its own needle",
            id="ruler-with-custom",
        ),
        pytest.param(dict(protocol="ruler", seed=1.5), "seed must be an int", id="float-seed"),
        pytest.param(dict(seed=3), "needs protocol='ruler'", id="seed-without-ruler"),
        pytest.param(dict(needle="ruler"), "--protocol ruler", id="ruler-needle-without-protocol"),
        pytest.param(dict(protocol="RULER"), "protocol must be one of", id="unknown-protocol"),
    ],
)
def test_bad_protocol_options(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        niah.NiahConfig(methods=("sdpa",), **kwargs)


def test_accuracy_is_the_protocols_metric():
    """A reply holding the value inside a longer number: RULER counts it, exact match does not."""
    record = {"id": "L256-d50-sdpa", "exact_match": False, "string_match_all": 1.0, "rouge1_recall": 0.0}
    record.update(density=None, prefill_s=1.0)
    specs = [MethodSpec("sdpa", {})]
    scores = niah.summarize([record], (256,), (0.5,), specs, "ruler")
    assert (scores["protocol"], scores["metric"]) == ("ruler", "string_match_all")
    sdpa = scores["methods"]["sdpa"]
    assert sdpa["accuracy"] == 1.0 and sdpa["grid"] == {"256": {"50": 1}}
    default = niah.summarize([record], (256,), (0.5,), specs)
    assert default["metric"] == "exact_match" and default["methods"]["sdpa"]["accuracy"] == 0.0


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3-ruler")
    model, tok = tiny
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@needs_words
def test_cli_ruler_run_records_the_protocol(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # A short answer keeps the run fast; the default of 128 tokens is checked on the config.
    args = ["--model", model_dir, "--protocol", "ruler", "--haystack", "repeat", "--lengths", "192,256"]
    args += ["--depths", "0.25,0.75", "--methods", "sdpa,dense", "--max-new-tokens", "6"]
    args += ["--out", out, "--quiet"]
    assert main(["eval", "niah", *map(str, args)]) == 0
    assert "| method | density | 192 tok | 256 tok | all |" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    config = saved["config"]
    assert (config["protocol"], config["seed"], config["needle"]) == ("ruler", 42, "ruler")
    assert config["max_new_tokens"] == 6
    assert (saved["scores"]["protocol"], saved["scores"]["metric"]) == ("ruler", "string_match_all")
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for r in records:
        needle = ruler.draw_needle(42, r["length"], r["depth"])
        assert r["protocol"] == "ruler" and r["needle"] == needle.text and r["answer"] == needle.answer
        assert r["string_match_all"] == ruler.string_match_all(r["generated"], [needle.answer])
    for name, m in saved["scores"]["methods"].items():
        mine = [r["string_match_all"] for r in records if r["method"] == name]
        assert m["accuracy"] == pytest.approx(sum(mine) / len(mine))
    by_cell = {(r["length"], r["depth"]): r["generated"] for r in records if r["method"] == "sdpa"}
    dense = {(r["length"], r["depth"]): r["generated"] for r in records if r["method"] == "dense"}
    assert dense == by_cell  # an exact method answers the same prompt as sdpa


@needs_words
def test_sweep_ruler_point_records_the_protocol(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(niah, "load_any", lambda name, device="cpu", dtype=None: tiny)
    monkeypatch.setattr(niah, "max_positions", lambda name: tiny[0].config.max_position_embeddings)
    task = ruler_config(lengths=(192,), depths=(0.5,), max_new_tokens=4)
    config = sweep.SweepConfig(niah=task, methods=("sdpa", "dense"), budgets=())
    result = sweep.run_sweep(config, out=tmp_path / "sweep", progress=False)
    assert result["config"]["protocol"] == "ruler" and result["config"]["needle"] == "ruler"
    records = [json.loads(line) for line in (tmp_path / "sweep" / "samples.jsonl").read_text().splitlines()]
    needle = ruler.draw_needle(42, 192, 0.5)
    for r in records:
        (cell,) = r["depths"]
        assert r["protocol"] == "ruler" and cell["needle"] == needle.text
        score = ruler.string_match_all(cell["generated"], [needle.answer])
        assert r["accuracy"] == cell["string_match_all"] == score


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(("--protocol", "ruler", "--needle", "city"), "draws its own needle", id="ruler-needle"),
        pytest.param(("--seed", "3"), "needs protocol='ruler'", id="seed-without-ruler"),
        pytest.param(("--protocol", "ruler", "--answer-prefix", "X"), "draws its own needle", id="prefix"),
    ],
)
def test_cli_bad_protocol_options_exit_2(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    common = ("--model", model_dir, "--lengths", "256", "--depths", "0.5", "--out", out, "--quiet")
    assert main(["eval", "niah", *map(str, common + args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sparse-llm: error:") and message in err, err
    assert not out.exists()
