"""The lm-eval model type ``sparse-llm`` on small local tasks, offline, with a tiny random Llama on disk.

Two task YAMLs over generated JSONL (a multiple-choice task, so ``_model_call``, and a generation task,
so ``_model_generate``) are evaluated with the ``sdpa`` baseline, ``dense`` and a sparse ``streaming``,
from Python and through ``sparse-llm eval lm-eval``, which is lm-eval's own command line.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (the eval extra)")

from conftest import CONFIGS  # noqa: E402
from lm_eval.__main__ import cli_evaluate  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import sanitize_model_name  # noqa: E402
from tiny_tokenizer import train_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from sparse_llm import cli, models  # noqa: E402
from sparse_llm.eval import lm_eval_plugin as plugin  # noqa: E402

WORDS = "river stone lamp garden silver paper window orange quiet forest bridge candle".split()
STREAMING = "method=streaming,sink_tokens=16,local_tokens=32,block_size=16"
MC, GEN = "sparse_llm_tiny_mc", "sparse_llm_tiny_gen"
# A chat template whose role markers show up in the logged prompts (--apply_chat_template).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def local_tasks_only_and_quiet(monkeypatch) -> None:
    """lm-eval's command line as the tests run it: its TaskManager skips indexing lm-eval's own ~15k
    tasks (seconds per run; the tests use only local task folders, and the command line has no flag
    for it), and it leaves logging alone (lm-eval binds its handler to the sys.stderr of its first
    run, which pytest closes after that test). The class itself is patched: lm-eval modules bind the
    name at import."""
    init = TaskManager.__init__
    monkeypatch.setattr(
        TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False})
    )
    monkeypatch.setattr("lm_eval.__main__.setup_logging", lambda *args, **kwargs: None)


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
        docs.append(
            {
                "context": context,
                "question": "What is the key?",
                "choices": WORDS[:4],
                "label": i % 4,
                "answer": key,
            }
        )
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
    tokenizer.chat_template = CHAT_TEMPLATE
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


@pytest.fixture
def local_tasks_only(monkeypatch):
    local_tasks_only_and_quiet(monkeypatch)


@pytest.fixture
def tiny_embedded(tiny_dir, monkeypatch):
    """An embedded model name, ``tiny-embedded``, whose built checkpoint is ``tiny_dir``."""
    monkeypatch.setattr(models, "_MODELS", {**models._MODELS, "tiny-embedded": models._MODELS["gemma3-270m"]})
    monkeypatch.setattr(models, "model_path", lambda name, cache_dir=None: tiny_dir)
    monkeypatch.setattr(models, "_is_built", lambda path: True)
    return "tiny-embedded"


def _one(pattern: str) -> Path:
    found = glob.glob(pattern)
    assert len(found) == 1, (pattern, found)
    return Path(found[0])


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
    runs = {
        name: _evaluate(tiny_dir, task_dir, args)
        for name, args in [("sdpa", "method=sdpa"), ("dense", "method=dense"), ("streaming", STREAMING)]
    }
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


def test_cli_is_lm_evals_command_line(tiny_dir, tiny_embedded, task_dir, tmp_path, local_tasks_only, capsys):
    """lm-eval's flags reach lm-eval and its own files come out; an embedded name becomes its checkpoint."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = cli.main(
        [
            "eval",
            "lm-eval",
            "--model",
            "sparse-llm",
            "--model_args",
            f"pretrained={tiny_embedded},{STREAMING}",
            "--tasks",
            f"{MC},{GEN}",
            "--include_path",
            str(task_dir),
            "--limit",
            "2",
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--log_samples",
            "--use_cache",
            str(cache),
            "--seed",
            "7",
            "--apply_chat_template",
        ]
    )
    assert code == 0
    folder = out / sanitize_model_name(str(tiny_dir))  # lm-eval's layout: <output_path>/<model>/
    results = json.loads(_one(f"{folder}/results_*.json").read_text())
    config = results["config"]
    assert config["model"] == "sparse-llm" and config["model_args"]["pretrained"] == str(tiny_dir)
    assert config["model_args"]["local_tokens"] == 32 and config["limit"] == 2
    assert [config[k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == [7] * 4
    assert config["use_cache"] == str(cache) and Path(f"{cache}_rank0.db").is_file()
    assert results["chat_template"] == CHAT_TEMPLATE
    assert {results["n-samples"][t]["effective"] for t in (MC, GEN)} == {2}
    info = config["sparse_llm"]
    assert info["method"] == "streaming" and info["params"]["local_tokens"] == 32
    assert 0 < info["density"] < 0.8 and info["forwards"] >= 2
    for task in (MC, GEN):
        lines = _one(f"{folder}/samples_{task}_*.jsonl").read_text().splitlines()
        assert len(lines) == 2
        prompt = json.loads(lines[0])["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")  # the chat template
    assert MC in capsys.readouterr().out  # lm-eval's table


def test_cli_output_matches_stock_lm_eval_with_the_hf_model(
    tiny_dir, task_dir, tmp_path, local_tasks_only, monkeypatch
):
    """Same files and keys as lm-eval's own command line with its ``hf`` model, and with the ``sdpa``
    baseline (the unpatched model) the same log-likelihoods; ``--model sparse-llm`` is the default."""
    common = [
        "--tasks",
        MC,
        "--include_path",
        str(task_dir),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--log_samples",
    ]
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    assert (
        cli.main(
            [
                "eval",
                "lm-eval",
                "--model_args",
                f"pretrained={tiny_dir},method=sdpa",
                "--output_path",
                str(ours),
                *common,
            ]
        )
        == 0
    )
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lm-eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_dir}",
            "--output_path",
            str(stock),
            *common,
        ],
    )
    cli_evaluate()

    def files(root):  # without the timestamps
        return sorted(str(p.relative_to(root)).split("_20")[0] for p in root.rglob("*") if p.is_file())

    model = sanitize_model_name(str(tiny_dir))
    assert files(ours) == files(stock) == [f"{model}/results", f"{model}/samples_{MC}"]
    mine, theirs = (json.loads(next(root.rglob("results_*.json")).read_text()) for root in (ours, stock))
    assert set(mine) == set(theirs) and set(mine["config"]) == set(theirs["config"]) | {"sparse_llm"}
    assert mine["config"]["model"] == "sparse-llm" and theirs["config"]["model"] == "hf"
    assert mine["results"][MC]["acc,none"] == theirs["results"][MC]["acc,none"]

    def loglikelihoods(root):
        lines = next(root.rglob("samples_*.jsonl")).read_text().splitlines()
        return [float(resp[0][0]) for doc in map(json.loads, lines) for resp in doc["resps"]]  # saved as text

    assert len(loglikelihoods(ours)) == 8 and loglikelihoods(ours) == loglikelihoods(stock)


def test_longbench_local_jsonl_through_the_cli(tiny_dir, tmp_path, local_tasks_only):
    from test_eval_longbench import write_fixture

    data = write_fixture(tmp_path / "data", ["trec", "passage_retrieval_en"], n=2)
    write_fixture(data, ["trec"], longbench_e=True)
    out = tmp_path / "out"
    # our hyphenated spellings of lm-eval's flags work too
    code = cli.main(
        [
            "eval",
            "lm-eval",
            "--model-args",
            f"pretrained={tiny_dir}",
            "--longbench-data",
            str(data),
            "--tasks",
            "longbench_local,longbench_local_trec_e",
            "--limit",
            "2",
            "--gen-kwargs",
            "max_gen_toks=4",
            "--log-samples",
            "--output-path",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    folder = out / sanitize_model_name(str(tiny_dir))
    record = json.loads(_one(f"{folder}/results_*.json").read_text())
    results = record["results"]
    assert set(results) == {
        "longbench_local",
        "longbench_local_trec",
        "longbench_local_passage_retrieval_en",
        "longbench_local_trec_e",
    }
    assert 0.0 <= results["longbench_local_trec"]["classification_score,none"] <= 1.0
    assert 0.0 <= results["longbench_local_passage_retrieval_en"]["retrieval_score,none"] <= 1.0
    assert 0.0 <= results["longbench_local"]["score,none"] <= 1.0
    # The stock lm-eval prompt, filled from the official fields (input -> question).
    doc = json.loads(_one(f"{folder}/samples_longbench_local_trec_2*.jsonl").read_text().splitlines()[0])
    prompt = doc["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("Please determine the type of the question below.")
    assert prompt.endswith(doc["doc"]["input"]) and doc["doc"]["context"] in prompt
    assert record["config"]["sparse_llm"]["density"] == 1.0  # method=dense by default


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param(["--tasks", "t"], ["--tasks", "t", "--model", "sparse-llm"], id="default-model"),
        pytest.param(
            ["run", "--tasks", "t", "--model", "hf"], ["run", "--tasks", "t", "--model", "hf"], id="hf"
        ),
        pytest.param(["--tasks=t", "-M", "hf"], ["--tasks=t", "-M", "hf"], id="short-model"),
        pytest.param(
            ["--config", "c.yaml", "--tasks", "t"], ["--config", "c.yaml", "--tasks", "t"], id="config"
        ),
        pytest.param(["ls", "tasks"], ["ls", "tasks"], id="ls"),
        pytest.param(["--help"], ["--help"], id="help"),
        pytest.param(
            ["--model-args", "pretrained=tiny-embedded,method=dhsa", "--log-samples", "--tasks", "t"],
            [
                "--model_args",
                "pretrained=TINY,method=dhsa",
                "--log_samples",
                "--tasks",
                "t",
                "--model",
                "sparse-llm",
            ],
            id="hyphens-and-embedded-name",
        ),
        pytest.param(
            ["-a", "method=dense", "pretrained=tiny-embedded", "--tasks", "t", "-M", "sparse-llm"],
            ["-a", "method=dense", "pretrained=TINY", "--tasks", "t", "-M", "sparse-llm"],
            id="space-separated-model-args",
        ),
        pytest.param(
            ['--model_args={"pretrained": "tiny-embedded"}', "--tasks", "t", "--model", "sparse-llm"],
            ['--model_args={"pretrained": "TINY"}', "--tasks", "t", "--model", "sparse-llm"],
            id="json-model-args",
        ),
    ],
)
def test_stock_argv(argv, expected, tiny_dir, tiny_embedded):
    assert plugin.stock_argv(argv) == [token.replace("TINY", str(tiny_dir)) for token in expected]


@pytest.mark.parametrize(
    "model_args, error, match",
    [
        pytest.param("method=nope", ValueError, "nope", id="unknown-method"),
        pytest.param(
            "method=dense,local_tokens=64",
            ValueError,
            r"method 'dense' got unknown parameters \['local_tokens'\]; it accepts",
            id="stray",
        ),
        pytest.param(
            "method=dhsa,budgett=512",
            ValueError,
            r"method 'dhsa' got unknown parameters \['budgett'\]; it accepts",
            id="misspelt",
        ),
        pytest.param(
            "method=sdpa,budget=512", ValueError, "sdpa baseline takes no parameters", id="baseline"
        ),
        pytest.param("method=streaming,local_tokens=0", ValueError, "local_tokens", id="bad-value"),
    ],
)
def test_bad_method_arguments_fail_before_loading(model_args, error, match):
    with pytest.raises(error, match=match):
        get_model("sparse-llm").create_from_arg_string(f"pretrained=/nonexistent,{model_args}", {})


def test_model_args_split_between_the_method_and_hflm():
    model_args = {"budget": 512, "batch_size": 2, "dtype": "float32", "device_map": "auto", "budgett": 1}
    params, rest = plugin.split_method_args("dhsa", model_args)
    assert params == {"budget": 512, "budgett": 1}  # the method's check rejects budgett
    assert rest == {"batch_size": 2, "dtype": "float32", "device_map": "auto"}


def test_importing_sparse_llm_does_not_import_lm_eval():
    code = "import sys, sparse_llm, sparse_llm.eval.longbench; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


_RANK_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from lm_eval.tasks import TaskManager
from sparse_llm import cli
from sparse_llm.eval import lm_eval_plugin as plugin

init = TaskManager.__init__  # as in the test module: local task folders only
TaskManager.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False})
calls = []
model_call = plugin.SparseLLM._model_call
plugin.SparseLLM._model_call = lambda self, *a, **k: calls.append(1) or model_call(self, *a, **k)
folder, argv = sys.argv[1], sys.argv[2:]
code = cli.main(argv)
with open(os.path.join(folder, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"calls": len(calls), "code": code}, f)
"""


def test_data_parallel_on_cpu_with_two_processes(tiny_dir, task_dir, tmp_path):
    """`torchrun` with 2 CPU processes (as `accelerate launch --cpu --num_processes 2`) running
    `sparse-llm eval lm-eval`: each process evaluates half of the requests, rank 0 gathers and writes,
    and the scores equal a single process's."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [
        "eval",
        "lm-eval",
        "--model_args",
        f"pretrained={tiny_dir},{STREAMING}",
        "--tasks",
        MC,
        "--include_path",
        str(task_dir),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # what `accelerate launch --cpu` sets
    done = subprocess.run(
        [*launcher, str(script), str(tmp_path), *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0]

    lm = get_model("sparse-llm").create_from_arg_string(
        f"pretrained={tiny_dir},{STREAMING}", {"batch_size": 1, "device": "cpu"}
    )
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    single = lm_eval.simple_evaluate(model=lm, tasks=[MC], task_manager=tasks, log_samples=True)
    single_calls = len(lm.densities)  # one density per _model_call
    # split, not repeated (lm-eval may pad the shorter rank with one dummy request)
    assert all(0 < r["calls"] < single_calls for r in ranks), (ranks, single_calls)
    assert single_calls <= sum(r["calls"] for r in ranks) <= single_calls + 1

    folder = out / sanitize_model_name(str(tiny_dir))  # written once, by rank 0
    record = json.loads(_one(f"{folder}/results_*.json").read_text())
    assert record["n-samples"][MC]["effective"] == 4
    assert record["results"][MC]["acc,none"] == single["results"][MC]["acc,none"]
    by_doc = {}
    for line in _one(f"{folder}/samples_{MC}_*.jsonl").read_text().splitlines():
        doc = json.loads(line)
        by_doc[doc["doc_id"]] = [float(resp[0][0]) for resp in doc["resps"]]  # saved as text
    assert sorted(by_doc) == sorted(doc["doc_id"] for doc in single["samples"][MC])
    for doc in single["samples"][MC]:
        assert by_doc[doc["doc_id"]] == pytest.approx([resp[0][0] for resp in doc["resps"]], abs=1e-4)
