"""LongBench runner: official prompts/metrics dispatch, middle truncation, pred/ layout, scores, resume.

The data are small JSONL files in the official format written by :func:`write_fixture` (synthetic
text, not LongBench data); the model is a tiny random Llama with a tokenizer trained in-process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import zipfile
from pathlib import Path

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
from sparse_llm.eval.haystack import encode  # noqa: E402

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
    return {
        "input": question,
        "context": context,
        "answers": answers,
        "length": length,
        "all_classes": classes,
        "dataset": task,
        "_id": f"{task}-{rng.random():.6f}",
    }


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
    # A tiny model gains nothing from threads, and where cores are shared OpenMP's spinning threads
    # dominate each tiny op; restored afterwards for the other tests.
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


def pred_py_prompt(tokenizer, prompt: str, max_length: int) -> str:
    """THUDM ``pred.py``'s truncation (``get_pred``), as written there but for ``return_tensors``."""
    tokenized_prompt = tokenizer(prompt, truncation=False).input_ids
    if len(tokenized_prompt) > max_length:
        half = int(max_length / 2)
        prompt = tokenizer.decode(tokenized_prompt[:half], skip_special_tokens=True) + tokenizer.decode(
            tokenized_prompt[-half:], skip_special_tokens=True
        )
    return prompt


@pytest.mark.parametrize("max_length", [40, 41])
@pytest.mark.parametrize("appends_eos", [True, False], ids=["bos+eos", "bos"])
def test_truncation_counts_tokens_as_pred_py(max_length, appends_eos):
    from tokenizers import processors

    tok = train_tokenizer([" ".join(WORDS)], vocab_size=400)
    if not appends_eos:  # most LM tokenizers add a BOS only
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
        )
    prompt = "Read this. " + _text(random.Random(1), 60) + " Question: which lamp?"
    text = tok(prompt, add_special_tokens=False)["input_ids"]
    specials = [tok.bos_token_id, *text] + ([tok.eos_token_id] if appends_eos else [])
    assert tok(prompt)["input_ids"] == specials and len(specials) > max_length
    # pred.py counts the special tokens: the BOS takes one of the head's max_length // 2 places (and an
    # appended EOS one of the tail's), and both are dropped from the decoded text.
    half = max_length // 2
    head, tail = text[: half - 1], text[-(half - int(appends_eos)) :]
    expected = tok.decode(head) + tok.decode(tail)
    assert pred_py_prompt(tok, prompt, max_length) == expected
    ids, truncated = lbd.build_prompt_ids(tok, "lcc", prompt, max_length)
    assert truncated and ids == encode(tok, expected, specials=True) == [tok.bos_token_id, *head, *tail]
    assert len(ids) == 2 * half - int(appends_eos)
    # Chat tasks: the same cut, then the template (which carries its own specials) around the text.
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    ids, truncated = lbd.build_prompt_ids(tok, "narrativeqa", prompt, max_length)
    user, end, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|end|>", "<|assistant|>"])
    assert truncated and ids == [user, *head, *tail, end, assistant]
    # A prompt of exactly max_length tokens, its specials included, is not cut.
    fits = tok.decode(text[: max_length - (len(specials) - len(text))])
    assert lbd.build_prompt_ids(tok, "lcc", fits, max_length)[1] is False
    assert lbd.build_prompt_ids(tok, "lcc", fits + " river", max_length)[1] is True


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


# sha256 of the files shipped in sparse_llm/eval/data/longbench/: THUDM/LongBench's config/ files at
# commit 2e00731f (see NOTICE there). A change to them must be deliberate and change this test too.
SHIPPED_SHA256 = {
    "dataset2prompt.json": "56d22ad4f382169c2b8a11ff4c982a4a1bea096c8152b0f0b85b64686b157c30",
    "dataset2maxlen.json": "72966b3c0933e214591637fb085798c5e687ebff4ddaab5d99bbc31120532022",
    "LICENSE": "bf7f05f274d65931bdf14f060b6855f1c359b8424eb74fd3091d25de89d700c3",
}
OFFICIAL_MAXLEN = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
SHIPPED = Path(lbd.__file__).parent / "data" / "longbench"


def _official(name: str) -> dict:
    return json.loads((SHIPPED / name).read_text(encoding="utf-8"))


def test_shipped_config_files_are_thudms_unchanged():
    for name, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
        assert lbd.sha256_of(lbd.config_file(name)) == digest
    assert (
        "MIT License" in (SHIPPED / "LICENSE").read_text() and "2e00731f" in (SHIPPED / "NOTICE").read_text()
    )
    assert (
        list(_official("dataset2prompt.json")) == list(lbd.TASKS)
        and _official("dataset2maxlen.json") == OFFICIAL_MAXLEN
    )


def test_prompts_and_lengths_are_the_official_ones():
    assert len(lbd.TASKS) == 21 and len(lbd.E_TASKS) == 13 and set(lbd.METRICS) == set(lbd.TASKS)
    prompts = _official("dataset2prompt.json")
    for task in lbd.TASKS:
        assert lbd.task_spec(task) == lbd.TaskSpec(task, prompts[task], OFFICIAL_MAXLEN[task]), task
    for task in lbd.E_TASKS:  # pred.py --e: the same prompt and length
        assert lbd.task_spec(task, longbench_e=True) == lbd.TaskSpec(
            f"{task}_e", prompts[task], OFFICIAL_MAXLEN[task]
        )
    with pytest.raises(ValueError, match="musique"):
        lbd.task_spec("musique", longbench_e=True)


def test_rendered_prompt_is_the_official_template_filled_with_the_record():
    prompts = _official("dataset2prompt.json")
    for task in lbd.TASKS:
        record = {  # the fields of an official JSONL line; a context with braces is not a template
            "input": f"Q {task}?",
            "context": "C {x} {{y}} " + task,
            "answers": ["a"],
            "length": 9,
            "dataset": task,
            "language": "en",
            "all_classes": None,
            "_id": "0",
        }
        rendered = lbd.render_prompt(lbd.task_spec(task), record)
        assert rendered == prompts[task].format(**record), task
        filled = prompts[task].replace("{context}", record["context"]).replace("{input}", record["input"])
        assert rendered == filled, task  # the templates have no other fields
    # Where lm-eval's YAML templates (0.4.9.2 to 0.4.13 at least) differ from THUDM's: a lost newline or
    # trailing space.
    record = {"context": "C", "input": "Q"}
    for task in ("triviaqa", "samsum"):
        assert lbd.render_prompt(lbd.task_spec(task), record).endswith("examples.\n\nC\n\nQ")
    assert lbd.render_prompt(lbd.task_spec("passage_count"), record).endswith("The final answer is: ")
    assert lbd.render_prompt(lbd.task_spec("passage_retrieval_en"), record).endswith("The answer is: ")
    assert lbd.render_prompt(lbd.task_spec("lcc"), record).endswith("\nCNext line of code:\n")
    assert lbd.render_prompt(lbd.task_spec("repobench-p"), record).endswith("\nCQNext line of code:\n")
    assert "asconcisely" in lbd.task_spec("narrativeqa").prompt  # sic, in THUDM's file at its main branch


def test_metric_table_matches_lm_eval_process_results():
    import lm_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for task in lbd.TASKS:
        path = Path(lm_eval.__file__).parent / "tasks" / "longbench" / f"{task}.yaml"
        hook = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)["process_results"]
        name = lbd.METRICS[task].removesuffix("_score")
        assert hook in (f"metrics.get_{name}_score", f"metrics.get_{name}_with_score"), task  # < / >= 0.4.9.2


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
        ),
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
        # THUDM's code_sim takes the first line after leading newlines even if blank (lm-eval 0.4.13
        # skips it and would give 1.0): fuzz.ratio(" ", "    return x + 1") = round(100 * 2 / 17) = 12.
        pytest.param(
            "lcc", " \n    return x + 1", ["    return x + 1"], None, 0.12, id="code-sim-blank-line"
        ),
        pytest.param("lcc", "\n\n    return x + 1", ["    return x + 1"], None, 1.0, id="code-sim-newlines"),
        pytest.param("multifieldqa_zh", "北京", ["北京"], None, 1.0, id="qa-f1-zh"),
        pytest.param("passage_retrieval_zh", "段落2", ["段落2"], None, 1.0, id="retrieval-zh"),
    ],
)
def test_score_dispatches_the_official_metric(task, pred, answers, classes, expected):
    assert lbd.score_prediction(task, pred, answers, classes) == pytest.approx(expected, abs=1e-6)


def test_metric_versions_are_those_of_the_packages_the_scorer_imports(monkeypatch):
    from fuzzywuzzy import fuzz

    metrics = lbd.metric_functions()
    real = importlib.metadata.version
    assert metrics.jieba.__name__ == "jieba" and metrics.Rouge.__module__.startswith("rouge.")
    assert metrics.fuzz is fuzz and lbd.code_sim_score.__module__ == lbd.__name__
    versions = lbd.metric_versions()
    expected = {name: real(name) for name in ("lm_eval", "jieba", "rouge", "fuzzywuzzy")}
    assert {k: v for k, v in versions.items() if k != "Levenshtein"} == expected
    # fuzzywuzzy matches with python-Levenshtein when it is installed, else with difflib (other ratios).
    assert (versions["Levenshtein"] == "not installed") == (fuzz.SequenceMatcher.__module__ == "difflib")

    def version(name):
        if name in ("Levenshtein", "python-Levenshtein", "jieba"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert lbd.metric_versions() == {**expected, "jieba": "not installed", "Levenshtein": "not installed"}
    monkeypatch.setattr(
        importlib.metadata, "version", lambda n: "0.12.2" if n == "python-Levenshtein" else version(n)
    )
    assert lbd.metric_versions()["Levenshtein"] == "0.12.2"  # the old distribution of the same module


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
    code = cli.main(
        [
            "eval",
            "longbench",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--tasks",
            "trec",
            "--out",
            str(tmp_path / "out"),
        ]
    )
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
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "snapshots" / revision  # huggingface_hub's cache layout
    snapshot.mkdir(parents=True)
    archive = archive.rename(snapshot / "data.zip")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or str(archive))
    folder = lbd.download_data(tmp_path / "cache")
    assert lbd.load_examples("trec", folder) == lbd.load_examples("trec", data)
    assert lbd.download_data(tmp_path / "cache") == folder and len(calls) == 1
    sha = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert lbd.data_provenance(folder, ["trec"])["data"] == {
        "dir": str(folder),
        "source": {
            "repo": "THUDM/LongBench",
            "file": "data.zip",
            "revision": revision,
            "sha256": sha(archive),
        },
        "sha256": {"trec.jsonl": sha(data / "trec.jsonl")},
    }
    assert lbd.data_provenance(data, ["trec"])["data"]["source"] is None  # a folder of the user's

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
        model="tiny-llama",
        tasks=FIXTURE_TASKS,
        methods=("sdpa", "streaming"),
        data_dir=str(data),
        method_params={"streaming": {"sink_tokens": 16, "local_tokens": 32, "block_size": 16}},
        max_length=160,
        max_new_tokens=4,
    )
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
    # What the scores depend on: the metric packages' versions and the prompt, length and data files.
    assert {k: results["versions"][k] for k in lbd.METRIC_DISTRIBUTIONS} == lbd.metric_versions()
    assert results["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")
    prompt_files = ("dataset2prompt.json", "dataset2maxlen.json")
    assert results["longbench"] == {
        "config": {"source": lbd.CONFIG_SOURCE, "sha256": {n: SHIPPED_SHA256[n] for n in prompt_files}},
        "data": {
            "dir": str(data),
            "source": None,
            "sha256": {
                f"{t}.jsonl": hashlib.sha256((data / f"{t}.jsonl").read_bytes()).hexdigest()
                for t in FIXTURE_TASKS
            },
        },
    }
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
        model="tiny",
        tasks=("trec", "passage_retrieval_en"),
        longbench_e=True,
        methods=("dense",),
        data_dir=str(data),
        max_length=128,
        max_new_tokens=4,
    )
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
    right = {
        "narrativeqa": "A silver lamp.",
        "gov_report": "the stone bridge crosses the quiet river",
        "trec": " Location\nQuestion: why?",
        "passage_retrieval_en": "Paragraph 3",
        "lcc": "    return x + 1",
    }
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
