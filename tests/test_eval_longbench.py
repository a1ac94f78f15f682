"""LongBench runner: official prompts/metrics dispatch, middle truncation, pred/ layout, scores, resume.

The data are small JSONL files in the official format written by :func:`write_fixture` (synthetic
text, not LongBench data); the model is a tiny random Llama with a tokenizer trained in-process.
"""

from __future__ import annotations

import json
import random
import zipfile

import pytest
import torch

pytest.importorskip("lm_eval.tasks.longbench.metrics", reason="needs lm-eval[longbench] (the eval extra)")

from conftest import CONFIGS  # noqa: E402
from tiny_tokenizer import train_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import sparse_llm.eval  # noqa: E402
from sparse_llm import cli  # noqa: E402
from sparse_llm.eval import longbench as lb  # noqa: E402
from sparse_llm.eval import longbench_data as lbd  # noqa: E402

WORDS = "river stone lamp garden silver paper window orange quiet forest bridge candle".split()
CLASSES = ["Location", "Human", "Number", "Entity"]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _example(task: str, rng: random.Random, n_words: int, length: int) -> dict:
    context, question, answers, classes = _text(rng, n_words), "", [], None
    if task == "narrativeqa":
        question, answers = "What does the fox carry?", ["a silver lamp"]
    elif task == "gov_report":
        answers = ["the stone bridge crosses the quiet river"]
    elif task == "trec":
        context = "\n".join(
            f"Question: {_text(rng, 5)}\nType: {rng.choice(CLASSES)}" for _ in range(n_words // 8)
        )
        question, answers, classes = "Question: Where is the bridge?\nType:", ["Location"], CLASSES
    elif task == "passage_retrieval_en":
        context = "\n\n".join(f"Paragraph {i}: {_text(rng, n_words // 4)}" for i in range(1, 5))
        question, answers = _text(rng, 6), ["Paragraph 3"]
    elif task == "lcc":
        context = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(n_words // 8))
        answers = ["    return x + 1"]
    return {"input": question, "context": context, "answers": answers, "length": length,
            "all_classes": classes, "dataset": task, "_id": f"{task}-{rng.random():.6f}"}  # fmt: skip


def write_fixture(folder, tasks, n: int = 2, longbench_e: bool = False, n_words: int = 60):
    """``<folder>/<task>[_e].jsonl``, ``n`` synthetic examples each (LongBench-E: one per length bucket)."""
    folder.mkdir(parents=True, exist_ok=True)
    lengths = [1000, 5000, 9000] if longbench_e else [n_words] * n
    for task in tasks:
        rng = random.Random(task)
        rows = [_example(task, rng, n_words, length) for length in lengths]
        name = f"{task}_e" if longbench_e else task
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from threads, and on a loaded 2-core machine OpenMP's spinning
    # threads make each op ~20x slower; restored afterwards for the other tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FIXTURE_TASKS = ("narrativeqa", "gov_report", "trec", "passage_retrieval_en", "lcc")


@pytest.fixture(scope="module")
def tiny():
    corpus = [
        " ".join(WORDS),
        *(lbd.task_spec(t).prompt for t in FIXTURE_TASKS),
        "def return x + 1 Paragraph",
    ]
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    config = CONFIGS["llama"]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model, tokenizer


# -- units: truncation, prompts, metrics ---------------------------------------------------------


@pytest.mark.parametrize(
    "length, max_length, expected",
    [
        pytest.param(10, 16, list(range(10)), id="fits"),
        pytest.param(16, 16, list(range(16)), id="exactly"),
        pytest.param(100, 10, [0, 1, 2, 3, 4, 95, 96, 97, 98, 99], id="cut"),
        pytest.param(100, 11, [0, 1, 2, 3, 4, 95, 96, 97, 98, 99], id="odd-max"),  # pred.py: 2 * (11 // 2)
    ],
)
def test_middle_truncate_keeps_first_and_last_halves(length, max_length, expected):
    assert lbd.middle_truncate(list(range(length)), max_length) == expected


def test_prompt_of_long_example_keeps_instruction_and_question(tiny):
    _, tokenizer = tiny
    spec = lbd.task_spec("narrativeqa")
    example = {"context": _text(random.Random(0), 400), "input": "What does the fox carry?"}
    prompt = lbd.render_prompt(spec, example)
    assert prompt.startswith("You are given a story") and prompt.endswith(
        "Question: What does the fox carry?\n\nAnswer:"
    )
    full = lbd.build_prompt_ids(tokenizer, "narrativeqa", prompt, 10_000)
    assert full[1] is False
    ids, truncated = lbd.build_prompt_ids(tokenizer, "narrativeqa", prompt, 64)
    assert truncated and len(ids) <= 64 + 4 < len(full[0])  # + BOS and re-tokenization at the seam
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("You are given a story") and text.endswith("What does the fox carry?\n\nAnswer:")


def test_chat_template_is_applied_except_for_fewshot_and_code_tasks():
    tok = train_tokenizer([" ".join(WORDS)], vocab_size=300)
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    user = tok.convert_tokens_to_ids("<|user|>")
    for task in ("narrativeqa", "gov_report", "passage_retrieval_en"):
        ids, _ = lbd.build_prompt_ids(tok, task, "some prompt", 100)
        assert ids[0] == user and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>"), task
    for task in sorted(lbd.NO_CHAT):
        ids, _ = lbd.build_prompt_ids(tok, task, "some prompt", 100)
        assert user not in ids and ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id, task


def test_prompts_and_lengths_come_from_lm_eval_yamls():
    assert len(lbd.TASKS) == 21 and len(lbd.E_TASKS) == 13 and set(lbd.METRICS) == set(lbd.TASKS)
    expected = {"narrativeqa": 128, "hotpotqa": 32, "gov_report": 512, "trec": 64, "lcc": 64}
    assert {t: lbd.task_spec(t).max_gen for t in expected} == expected
    for task in lbd.TASKS:
        spec = lbd.task_spec(task)
        assert "{{context}}" in spec.prompt, task
    for task in lbd.E_TASKS:
        assert lbd.task_spec(task, longbench_e=True) == lbd.TaskSpec(
            f"{task}_e", lbd.task_spec(task).prompt, lbd.task_spec(task).max_gen
        )


def test_metric_table_matches_lm_eval_process_results():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for task in lbd.TASKS:
        path = lbd._lm_eval_dir() / "tasks" / "longbench" / f"{task}.yaml"
        hook = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)["process_results"]
        assert hook == f"metrics.get_{lbd.METRICS[task].removesuffix('_score')}_with_score", task


@pytest.mark.parametrize(
    "task, pred, answers, classes, expected",
    [
        pytest.param("narrativeqa", "The silver lamp.", ["a silver lamp"], None, 1.0, id="qa-f1-exact"),
        pytest.param("narrativeqa", "silver river", ["silver lamp"], None, 0.5, id="qa-f1-half"),
        pytest.param("hotpotqa", "Paris", ["London", "Paris"], None, 1.0, id="max-over-truths"),
        pytest.param("triviaqa", "Paris\nLondon is big", ["Paris"], None, 1.0, id="first-line-cut"),
        pytest.param("qasper", "Paris\nLondon", ["Paris"], None, 2 / 3, id="no-cut-outside-four"),
        pytest.param(
            "gov_report",
            "the stone bridge crosses the river",
            ["the stone bridge crosses the river"],
            None,
            1.0,
            id="rouge-exact",
        ),  # fmt: skip
        pytest.param("gov_report", "", ["a summary"], None, 0.0, id="rouge-empty"),
        pytest.param("trec", "\nLocation\nHuman", ["Location"], CLASSES, 1.0, id="classification-first-line"),
        pytest.param(
            "trec", "Human or Location", ["Location"], CLASSES, 0.5, id="classification-two-classes"
        ),
        pytest.param("passage_retrieval_en", "Paragraph 3", ["Paragraph 3"], None, 1.0, id="retrieval"),
        pytest.param(
            "passage_retrieval_en", "Paragraph 3 or 4", ["Paragraph 3"], None, 0.5, id="retrieval-half"
        ),
        pytest.param("passage_count", "7", ["7"], None, 1.0, id="count"),
        pytest.param("lcc", "# comment\n    return x + 1", ["    return x + 1"], None, 1.0, id="code-sim"),
        pytest.param("repobench-p", "zzzz", ["    return x + 1"], None, 0.0, id="code-sim-miss"),
        pytest.param("multifieldqa_zh", "北京", ["北京"], None, 1.0, id="qa-f1-zh"),
        pytest.param("passage_retrieval_zh", "段落2", ["段落2"], None, 1.0, id="retrieval-zh"),
    ],
)
def test_score_dispatches_the_official_metric(task, pred, answers, classes, expected):
    assert lbd.score_prediction(task, pred, answers, classes) == pytest.approx(expected, abs=1e-6)


def test_score_table_averages_x100_and_splits_longbench_e_by_length():
    records = [
        {"method": "dense", "task": "trec", "score": 1.0, "length": 100},
        {"method": "dense", "task": "trec", "score": 0.0, "length": 5000},
        {"method": "dense", "task": "trec", "score": 0.5, "length": 9000},
        {"method": "dense", "task": "lcc", "score": 0.25, "length": 8000},
    ]
    assert lb.score_table(records, longbench_e=False) == {"dense": {"trec": 50.0, "lcc": 25.0, "avg": 37.5}}
    e = lb.score_table(records, longbench_e=True)["dense"]
    assert e["trec"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert e["lcc"] == {"0-4k": None, "4-8k": None, "8k+": 25.0}
    assert e["avg"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 37.5}
    table = lb.markdown(lb.score_table(records, True), True).splitlines()
    assert (
        table[0] == "| method | length | trec | lcc | avg |"
        and table[2] == "| dense | 0-4k | 100.00 | - | 100.00 |"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"tasks": ("narrativqa",)}, "Did you mean narrativeqa", id="typo"),
        pytest.param({"tasks": ("musique",), "longbench_e": True}, "LongBench-E has no", id="not-in-e"),
        pytest.param({"methods": ("nope",)}, "nope", id="method"),
        pytest.param({"limit": 0}, "limit", id="limit"),
        pytest.param({"max_length": 1}, "max_length", id="max-length"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lb.LongBenchConfig(**kwargs)


def test_config_defaults_to_all_tasks():
    assert (
        lb.LongBenchConfig().tasks == lbd.TASKS and lb.LongBenchConfig(longbench_e=True).tasks == lbd.E_TASKS
    )


# -- data --------------------------------------------------------------------------------------------


def test_missing_data_dir_exits_2_with_how_to_get_it(tmp_path, capsys, monkeypatch):
    # Only this evaluation in the CLI, so the test does not depend on the other evaluations' modules.
    monkeypatch.setattr(sparse_llm.eval, "_TASKS", {"longbench": sparse_llm.eval._TASKS["longbench"]})
    code = cli.main(["eval", "longbench", "--data-dir", str(tmp_path / "nowhere"), "--tasks", "trec",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "trec.jsonl" in err and "data.zip" in err and "--data-dir" in err
    assert not (tmp_path / "out").exists()  # failed before creating results or loading a model


def test_hub_download_unpacks_once_and_offline_failure_says_how(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    data = write_fixture(tmp_path / "src" / "data", ["trec"])
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(data / "trec.jsonl", "data/trec.jsonl")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or str(archive))
    folder = lbd.download_data(tmp_path / "cache")
    assert lbd.load_examples("trec", folder) == lbd.load_examples("trec", data)
    assert lbd.download_data(tmp_path / "cache") == folder and len(calls) == 1

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="data.zip"):
        lbd.download_data(tmp_path / "other")


def test_load_examples_limit_and_field_check(tmp_path):
    data = write_fixture(tmp_path, ["lcc"], n=3)
    assert [e["_id"] for e in lbd.load_examples("lcc", data, limit=2)] == [
        e["_id"] for e in lbd.load_examples("lcc", data)[:2]
    ]
    (tmp_path / "trec.jsonl").write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"trec.jsonl:1: missing LongBench fields \['answers', 'length'\]"):
        lbd.load_examples("trec", tmp_path)


# -- end to end ---------------------------------------------------------------------------------------


def _count_generate(model, monkeypatch):
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_run_writes_pred_layout_scores_and_resumes(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    data = write_fixture(tmp_path / "data", FIXTURE_TASKS, n=2, n_words=200)
    config = lb.LongBenchConfig(
        model="tiny-llama", tasks=FIXTURE_TASKS, methods=("sdpa", "streaming"), data_dir=str(data),
        method_params={"streaming": {"sink_tokens": 16, "local_tokens": 32, "block_size": 16}},
        max_length=160, max_new_tokens=4,
    )  # fmt: skip
    out = tmp_path / "run"
    calls = _count_generate(model, monkeypatch)
    scores = lb.run_longbench(config, out, model=model, tokenizer=tokenizer)
    assert calls == [4] * 20  # one generation per example and method
    assert model.config._attn_implementation == "sdpa"  # the sparse method was removed after each sample

    labels = ["sdpa", "streaming[block_size=16,local_tokens=32,sink_tokens=16]"]
    for label in labels:
        folder = out / "pred" / lb._folder_name("tiny-llama", label)
        for task in FIXTURE_TASKS:
            lines = [json.loads(x) for x in (folder / f"{task}.jsonl").read_text().splitlines()]
            expected = lbd.load_examples(task, data)
            assert [sorted(x) for x in lines] == [["all_classes", "answers", "length", "pred"]] * 2
            assert [x["answers"] for x in lines] == [e["answers"] for e in expected]
            assert [x["all_classes"] for x in lines] == [e["all_classes"] for e in expected]
        assert json.loads((folder / "result.json").read_text()) == scores["longbench"][label]

    results = json.loads((out / "results.json").read_text())
    assert (
        results["scores"] == scores
        and results["versions"]["sparse_llm"]
        and results["config"]["max_length"] == 160
    )
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(r["truncated"] for r in records)  # 200-word contexts > 160 tokens
    assert all(r["prompt_tokens"] <= 164 for r in records)
    # Each stored score is the official metric of the stored prediction; the table is their mean x100.
    for r in records:
        assert r["score"] == lbd.score_prediction(r["task"], r["pred"], r["answers"], r["all_classes"])
    for label in labels:
        for task in FIXTURE_TASKS:
            mine = [r["score"] for r in records if r["method"] == label and r["task"] == task]
            assert scores["longbench"][label][task] == pytest.approx(round(100 * sum(mine) / 2, 2))
    # The sparse method really ran sparse (window of 48 of ~160 tokens), the baseline has no density.
    assert all(r["density"] is None for r in records if r["method"] == "sdpa")
    assert 0 < scores["density"][labels[1]] < 0.9
    table = (out / "scores.md").read_text().splitlines()
    assert table[0].startswith("| method | narrativeqa | gov_report") and len(table) == 4

    # Resume: drop the last three samples and the results, rerun: only those three are generated again.
    pred_before = {p.name: p.read_text() for p in (out / "pred").rglob("*.jsonl")}
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])  # and a torn last line
    (out / "results.json").unlink()
    calls.clear()
    assert lb.run_longbench(config, out, resume=True, model=model, tokenizer=tokenizer) == scores
    assert len(calls) == 3
    assert {p.name: p.read_text() for p in (out / "pred").rglob("*.jsonl")} == pred_before
    with pytest.raises(FileExistsError):
        lb.run_longbench(config, out, model=model, tokenizer=tokenizer)


def test_dense_answers_equal_the_sdpa_baseline(tiny, tmp_path):
    model, tokenizer = tiny
    data = write_fixture(tmp_path / "data", ["passage_retrieval_en", "trec"], n=2)
    config = lb.LongBenchConfig(
        model="tiny",
        tasks=("passage_retrieval_en", "trec"),
        methods=("sdpa", "dense"),
        data_dir=str(data),
        max_new_tokens=8,
    )
    lb.run_longbench(config, tmp_path / "run", model=model, tokenizer=tokenizer)
    records = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    preds = {m: [r["pred"] for r in records if r["method"] == m] for m in ("sdpa", "dense")}
    assert len(preds["sdpa"]) == 4 and preds["dense"] == preds["sdpa"]
    assert all(not r["truncated"] for r in records)  # default max_length: 1024 - 512 tokens


def test_longbench_e_writes_pred_e_and_length_buckets(tiny, tmp_path):
    model, tokenizer = tiny
    data = write_fixture(tmp_path / "data", ["trec", "passage_retrieval_en"], longbench_e=True)
    config = lb.LongBenchConfig(
        model="tiny", tasks=("trec", "passage_retrieval_en"), longbench_e=True, methods=("dense",),
        data_dir=str(data), max_length=128, max_new_tokens=4,
    )  # fmt: skip
    scores = lb.run_longbench(config, tmp_path / "run", model=model, tokenizer=tokenizer)
    row = scores["longbench_e"]["dense"]
    assert set(row) == {"trec", "passage_retrieval_en", "avg"}
    assert all(set(v) == set(lbd.BUCKETS) and None not in v.values() for v in row.values())
    records = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for task in ("trec", "passage_retrieval_en"):
        by_length = {r["length"]: r["score"] for r in records if r["task"] == task}
        assert row[task] == {
            "0-4k": 100 * by_length[1000],
            "4-8k": 100 * by_length[5000],
            "8k+": 100 * by_length[9000],
        }
        assert (
            len((tmp_path / "run" / "pred_e" / "tiny-dense" / f"{task}.jsonl").read_text().splitlines()) == 3
        )
    assert not (tmp_path / "run" / "pred").exists()


def test_official_answer_lengths_and_exact_answers_score_100(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    data = write_fixture(tmp_path / "data", FIXTURE_TASKS, n=2)
    right = {"narrativeqa": "A silver lamp.", "gov_report": "the stone bridge crosses the quiet river",
             "trec": " Location\nQuestion: why?", "passage_retrieval_en": "Paragraph 3",
             "lcc": "    return x + 1"}  # fmt: skip
    seen = []

    def answer(model, tokenizer, ids, task, max_gen):
        seen.append((task, max_gen))
        return right[task], None

    monkeypatch.setattr(lb, "generate_answer", answer)
    config = lb.LongBenchConfig(model="tiny", tasks=FIXTURE_TASKS, methods=("sdpa",), data_dir=str(data))
    scores = lb.run_longbench(config, tmp_path / "run", model=model, tokenizer=tokenizer)
    official = {"narrativeqa": 128, "gov_report": 512, "trec": 64, "passage_retrieval_en": 32, "lcc": 64}
    assert sorted(seen) == sorted((t, n) for t, n in official.items() for _ in range(2))
    assert scores["longbench"]["sdpa"] == {**dict.fromkeys(FIXTURE_TASKS, 100.0), "avg": 100.0}


def test_samsum_stops_at_a_newline_after_at_least_one_token(tiny, monkeypatch):
    model, tokenizer = tiny
    seen = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: seen.append(k) or original(*a, **k))
    ids = tokenizer("river stone lamp")["input_ids"][:-1]
    lb.generate_answer(model, tokenizer, ids, "samsum", 2)
    lb.generate_answer(model, tokenizer, ids, "gov_report", 2)
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert seen[0]["eos_token_id"] == [tokenizer.eos_token_id, newline] and seen[0]["min_new_tokens"] == 1
    assert "eos_token_id" not in seen[1] and "min_new_tokens" not in seen[1]
