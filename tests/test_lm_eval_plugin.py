"""The lm-eval model type ``sparse-llm`` on small local tasks, offline, with a tiny random Llama on disk.

Two task YAMLs over generated JSONL (a multiple-choice task, so ``_model_call``, and a generation task,
so ``_model_generate``) are evaluated with the ``sdpa`` baseline, ``dense`` and a sparse ``streaming``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (the eval extra)")

from conftest import CONFIGS  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_tokenizer import train_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import sparse_llm.eval  # noqa: E402
from sparse_llm import cli, models  # noqa: E402
from sparse_llm.eval import lm_eval_plugin as plugin  # noqa: E402

WORDS = "river stone lamp garden silver paper window orange quiet forest bridge candle".split()
STREAMING = "method=streaming,sink_tokens=16,local_tokens=32,block_size=16"
MC, GEN = "sparse_llm_tiny_mc", "sparse_llm_tiny_gen"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from threads, and on a loaded 2-core machine OpenMP's spinning
    # threads make each op ~20x slower; restored afterwards for the other tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _docs(n: int = 4) -> list[dict]:
    rng = random.Random(0)
    docs = []
    for i in range(n):
        key = rng.choice(WORDS)
        context = " ".join(rng.choice(WORDS) for _ in range(120)) + f". The key is {key}."
        docs.append({"context": context, "question": "What is the key?", "choices": WORDS[:4],
                     "label": i % 4, "answer": key})  # fmt: skip
    return docs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(
        [" ".join(WORDS), "The key is. What is the key? Question: Answer:"], vocab_size=300
    )
    config = CONFIGS["llama"]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'doc_to_text: "{{context}}\\nQuestion: {{question}}\\nAnswer:"\nmetadata:\n  version: 1.0\n'
    )
    (folder / "mc.yaml").write_text(
        f"task: {MC}\n{common}output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "gen.yaml").write_text(
        f"task: {GEN}\n{common}output_type: generate_until\n"
        'doc_to_target: " {{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def _evaluate(tiny_dir, task_dir, method_args: str):
    lm = get_model("sparse-llm").create_from_arg_string(
        f"pretrained={tiny_dir},{method_args}", {"batch_size": 1, "device": "cpu"}
    )
    seen = []
    hook = lm.model.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation)
    )
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[MC, GEN], task_manager=tasks, log_samples=True)
    hook.remove()
    return lm, results, seen


def _loglikelihoods(results) -> list[float]:
    return [resp[0][0] for doc in results["samples"][MC] for resp in doc["resps"]]


def _generations(results) -> list[str]:
    return [doc["resps"][0][0] for doc in results["samples"][GEN]]


def test_plugin_runs_local_tasks_through_the_sparse_method(tiny_dir, task_dir):
    runs = {name: _evaluate(tiny_dir, task_dir, args) for name, args in
            [("sdpa", "method=sdpa"), ("dense", "method=dense"), ("streaming", STREAMING)]}  # fmt: skip
    for lm, results, _ in runs.values():
        assert 0.0 <= results["results"][MC]["acc,none"] <= 1.0
        assert 0.0 <= results["results"][GEN]["exact_match,none"] <= 1.0
        assert len(results["samples"][MC]) == 4 and len(results["samples"][GEN]) == 4
        assert lm.model.config._attn_implementation == "sdpa"  # restored after every call

    # The baseline never patches; the methods patch every forward (log-likelihoods and generation).
    assert set(runs["sdpa"][2]) == {"sdpa"} and runs["sdpa"][0].densities == []
    for name in ("dense", "streaming"):
        lm, _, seen = runs[name]
        assert seen and all(impl.startswith(f"sparse_llm_{name}_") for impl in seen)
    # 16 log-likelihood forwards (4 docs x 4 choices; lm-eval may group them) and 4 generations measured.
    assert set(runs["dense"][0].densities) == {1.0} and len(runs["dense"][0].densities) >= 5
    assert max(runs["streaming"][0].densities) < 0.8  # sink 16 + window 32 of ~140 tokens

    # dense is exact: the baseline's log-likelihoods and generations; streaming changes the numbers.
    base, dense, stream = (_loglikelihoods(runs[n][1]) for n in ("sdpa", "dense", "streaming"))
    assert len(base) == 16 and dense == pytest.approx(base, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(stream, base, strict=True)) > 1e-3
    assert _generations(runs["dense"][1]) == _generations(runs["sdpa"][1])


def test_cli_resolves_embedded_name_and_writes_results(tiny_dir, task_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sparse_llm.eval, "_TASKS", {"lm-eval": sparse_llm.eval._TASKS["lm-eval"]})
    monkeypatch.setattr(models, "_MODELS", {**models._MODELS, "tiny-embedded": models._MODELS["gemma3-270m"]})
    monkeypatch.setattr(models, "model_path", lambda name, cache_dir=None: tiny_dir)
    monkeypatch.setattr(models, "_is_built", lambda path: True)
    out = tmp_path / "lm-eval.json"
    code = cli.main([
        "eval", "lm-eval", "--tasks", MC, "--model-args", f"pretrained=tiny-embedded,{STREAMING}",
        "--include-path", str(task_dir), "--only-include-path", "--limit", "2", "--device", "cpu",
        "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["model_args"]["pretrained"] == str(tiny_dir)
    assert record["config"]["model_args"]["local_tokens"] == 32
    assert set(record["lm_eval"]["results"][MC]) >= {"acc,none", "acc_stderr,none"}
    assert record["lm_eval"]["n-samples"][MC]["effective"] == 2 and "samples" not in record["lm_eval"]
    assert 0 < record["density"] < 0.8
    assert record["versions"]["sparse_llm"] and record["machine"]["device"].startswith("cpu")
    assert MC in capsys.readouterr().out  # the table
    with pytest.raises(FileExistsError):
        plugin.run_lm_eval(plugin.LmEvalConfig(tasks=(MC,), include_path=str(task_dir)), out)


def test_longbench_local_jsonl_through_lm_eval(tiny_dir, tmp_path):
    from test_eval_longbench import write_fixture

    data = write_fixture(tmp_path / "data", ["trec", "passage_retrieval_en"], n=2)
    write_fixture(data, ["trec"], longbench_e=True)
    config = plugin.LmEvalConfig(
        tasks=("longbench_local", "longbench_local_trec_e"), model_args={"pretrained": str(tiny_dir)},
        longbench_data=str(data), include_defaults=False, limit=2, gen_kwargs="max_gen_toks=4",
        log_samples=True,
    )  # fmt: skip
    record = plugin.run_lm_eval(config)
    results = record["lm_eval"]["results"]
    assert set(results) == {"longbench_local", "longbench_local_trec", "longbench_local_passage_retrieval_en",
                            "longbench_local_trec_e"}  # fmt: skip
    assert 0.0 <= results["longbench_local_trec"]["classification_score,none"] <= 1.0
    assert 0.0 <= results["longbench_local_passage_retrieval_en"]["retrieval_score,none"] <= 1.0
    assert 0.0 <= results["longbench_local"]["score,none"] <= 1.0
    # The stock lm-eval prompt, filled from the official fields (input -> question).
    doc = record["lm_eval"]["samples"]["longbench_local_trec"][0]
    prompt = doc["arguments"][0][0]
    assert prompt.startswith("Please determine the type of the question below.")
    assert prompt.endswith(doc["doc"]["input"]) and doc["doc"]["context"] in prompt
    assert record["density"] == 1.0  # method=dense by default


@pytest.mark.parametrize(
    "model_args, error, match",
    [
        pytest.param("method=nope", ValueError, "nope", id="unknown-method"),
        pytest.param(
            "method=dense,local_tokens=64", ValueError, "not parameters of method 'dense'", id="stray"
        ),
        pytest.param("method=streaming,local_tokens=0", ValueError, "local_tokens", id="bad-value"),
    ],
)
def test_bad_method_arguments_fail_before_loading(model_args, error, match):
    with pytest.raises(error, match=match):
        get_model("sparse-llm").create_from_arg_string(f"pretrained=/nonexistent,{model_args}", {})


def test_config_checks():
    with pytest.raises(ValueError, match="no lm-eval task"):
        plugin.LmEvalConfig(tasks=())
    with pytest.raises(FileNotFoundError, match="include path"):
        plugin.LmEvalConfig(tasks=("x",), include_path="/nonexistent")
    with pytest.raises(ValueError, match="include_path"):
        plugin.LmEvalConfig(tasks=("x",), include_defaults=False)


def test_importing_sparse_llm_does_not_import_lm_eval():
    code = "import sys, sparse_llm, sparse_llm.eval.longbench; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


_RANK_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from sparse_llm.eval import lm_eval_plugin as plugin

tiny, tasks, task, out, folder = sys.argv[1:6]
calls = []
model_call = plugin.SparseLLM._model_call
plugin.SparseLLM._model_call = lambda self, *a, **k: calls.append(1) or model_call(self, *a, **k)
config = plugin.LmEvalConfig(
    tasks=(task,), model_args=f"pretrained={tiny},{sys.argv[6]}", include_path=tasks,
    include_defaults=False, device="cpu", log_samples=True,
)
record = plugin.run_lm_eval(config, out)
rank = int(os.environ["RANK"])
with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
    json.dump({"calls": len(calls), "returned": record is not None}, f)
"""


def test_data_parallel_on_cpu_with_two_processes(tiny_dir, task_dir, tmp_path):
    """`torchrun` with 2 CPU processes (as `accelerate launch --cpu --num_processes 2`): each process
    evaluates half of the requests, rank 0 gathers and writes, and the scores equal a single process's."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "dp.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(script), str(tiny_dir), str(task_dir), MC, str(out), str(tmp_path), STREAMING]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # what `accelerate launch --cpu` sets
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["returned"] for r in ranks] == [True, False]  # only rank 0 returns and writes

    lm = get_model("sparse-llm").create_from_arg_string(
        f"pretrained={tiny_dir},{STREAMING}", {"batch_size": 1, "device": "cpu"}
    )
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    single = lm_eval.simple_evaluate(model=lm, tasks=[MC], task_manager=tasks, log_samples=True)
    single_calls = len(lm.densities)  # one density per _model_call
    # split, not repeated (lm-eval may pad the shorter rank with one dummy request)
    assert all(0 < r["calls"] < single_calls for r in ranks), (ranks, single_calls)
    assert single_calls <= sum(r["calls"] for r in ranks) <= single_calls + 1

    record = json.loads(out.read_text())
    assert record["lm_eval"]["n-samples"][MC]["effective"] == 4
    assert record["lm_eval"]["results"][MC]["acc,none"] == single["results"][MC]["acc,none"]
    by_doc = {d["doc_id"]: d["resps"] for d in record["lm_eval"]["samples"][MC]}
    for doc in single["samples"][MC]:
        got = [resp[0][0] for resp in by_doc[doc["doc_id"]]]
        assert got == pytest.approx([resp[0][0] for resp in doc["resps"]], abs=1e-4)
