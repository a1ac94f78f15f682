"""Every bad argument of every command exits 2 with one line on stderr, before anything is loaded; every
``--help`` shows the defaults."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from sparse_llm import cli, models

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


class Reached(BaseException):
    """Raised where a command would start its real work (load a model, spawn a benchmark)."""


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or benchmark run fails the test: bad flags must be caught before."""
    import transformers

    import sparse_llm.bench.kernel
    import sparse_llm.bench.runner
    import sparse_llm.model_shapes

    def reached(*args, **kwargs):
        raise Reached("the command started its work despite a bad argument")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", reached)
    monkeypatch.setattr(models, "ensure_built", reached)
    monkeypatch.setattr(sparse_llm.model_shapes, "build_shape_model", reached)
    monkeypatch.setattr(sparse_llm.bench.runner, "run_bench", reached)
    monkeypatch.setattr(sparse_llm.bench.kernel, "run_kernel_bench", reached)


@pytest.fixture
def paths(tmp_path):
    """A file, a folder without config.json, a folder with one, one whose model has 512 positions, and
    a folder with one lm-eval task."""
    (tmp_path / "file.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text('{"text_config": {"max_position_embeddings": 512}}')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        "task: sparse_llm_cli_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\noutput_type: generate_until\n"
    )
    return tmp_path


def lm_eval_case(*argv, match, id):
    return pytest.param(
        ["eval", "lm-eval", *argv],
        match,
        id=f"lm-eval-{id}",
        marks=pytest.mark.skipif(not HAS_LM_EVAL, reason="needs lm-eval (the eval extra)"),
    )


def case(*argv, match, id):
    return pytest.param(list(argv), match, id=id)


CASES = [
    case("nope", match="invalid choice: 'nope'", id="unknown-command"),
    case(match="required: command", id="no-command"),
    # demo
    case("demo", "--model", "gemma3-27m", match="invalid choice: 'gemma3-27m'", id="demo-unknown-model"),
    case("demo", "--model", "{tmp}/model", match="invalid choice", id="demo-model-path"),
    case("demo", "--methods", "dense,nope", match="unknown method 'nope'", id="demo-unknown-method"),
    case("demo", "--context-tokens", "0", match="positive integer, got 0", id="demo-zero-tokens"),
    case("demo", "--context-tokens", "-5", match="positive integer, got -5", id="demo-negative-tokens"),
    case("demo", "--context-tokens", "4k", match="not an integer", id="demo-tokens-not-int"),
    case(
        "demo",
        "--context-tokens",
        "100000",
        match="lengths [100000] do not fit the model's context: 32768 positions",
        id="demo-tokens-above-context",
    ),
    # bench prefill
    case("bench", "--model", "gemma3-27m", match="Did you mean gemma3-270m", id="bench-misspelt-model"),
    case("bench", "--model", "llama-3.2-1b-shap", match="llama-3.2-1b-shape", id="bench-misspelt-shape"),
    case("bench", "--model", "nope", match="unknown model 'nope'; embedded: ", id="bench-unknown-name"),
    case("bench", "--model", "{tmp}/missing", match="not found", id="bench-missing-path"),
    case("bench", "--model", "./missing", match="not found", id="bench-missing-relative-path"),
    case("bench", "--model", "{tmp}/empty", match="no config.json", id="bench-folder-without-config"),
    case("bench", "--model", "{tmp}/file.txt", match="is a file", id="bench-model-is-a-file"),
    case(
        "bench",
        "--lengths",
        "1k,100k",
        match="lengths [102400] do not fit the model's context: 32768 positions",
        id="bench-length-above-context",
    ),
    case(
        "bench",
        "--model",
        "smollm2-135m",
        "--lengths",
        "16k",
        match="lengths [16384] do not fit the model's context: 8192 positions",
        id="bench-length-above-smollm2-context",
    ),
    case(
        "bench",
        "--model",
        "gemma2-2b-shape",
        "--lengths",
        "16k",
        match="context: 8192 positions",
        id="bench-length-above-shape-context",
    ),
    case(
        "bench",
        "--model",
        "{tmp}/short",
        "--lengths",
        "1k",
        match="context: 512 positions",
        id="bench-length-above-folder-context",
    ),
    case("bench", "prefil", match="invalid choice: 'prefil'", id="bench-unknown-what"),
    case("bench", "--methods", "nope", match="unknown method 'nope'", id="bench-unknown-method"),
    case("bench", "--lengths", "0", match="positive", id="bench-zero-length"),
    case("bench", "--lengths", "abc", match="bad length 'abc'", id="bench-bad-length"),
    case("bench", "--repeats", "0", match="positive integer", id="bench-zero-repeats"),
    case("bench", "--rounds", "-1", match="positive integer", id="bench-negative-rounds"),
    case("bench", "--dtype", "int8", match="invalid choice: 'int8'", id="bench-bad-dtype"),
    case("bench", "--device", "nope", match="unknown device 'nope'", id="bench-bad-device"),
    case("bench", "--method-params", "{bad", match="not valid JSON", id="bench-bad-json"),
    case("bench", "--method-params", "[1]", match="JSON object", id="bench-json-not-object"),
    case(
        "bench",
        "--method-params",
        '{"streaming": {"local_tokens": 0}}',
        match="local_tokens",
        id="bench-bad-method-parameter",
    ),
    case(
        "bench",
        "--method-params",
        '{"streaming": {"nope": 1}}',
        match="unknown parameters ['nope']",
        id="bench-unknown-method-parameter",
    ),
    case(
        "bench",
        "--method-params",
        '{"dhsa": {}}',
        match="methods not run",
        id="bench-params-of-absent-method",
    ),
    # bench kernel
    case("bench", "kernel", "--densities", "0", match="densities", id="kernel-zero-density"),
    case("bench", "kernel", "--densities", "1.5", match="densities", id="kernel-density-above-1"),
    case("bench", "kernel", "--densities", "x", match="bad number list", id="kernel-bad-densities"),
    case("bench", "kernel", "--heads", "4", match="QUERY_HEADS,KV_HEADS", id="kernel-one-head-count"),
    case("bench", "kernel", "--heads", "4,0", match="positive integer", id="kernel-zero-kv-heads"),
    case("bench", "kernel", "--heads", "3,2", match="multiple of kv_heads", id="kernel-heads-not-grouped"),
    case("bench", "kernel", "--head-dim", "0", match="positive integer", id="kernel-zero-head-dim"),
    case("bench", "kernel", "--block-size", "-64", match="positive integer", id="kernel-negative-block"),
    case("bench", "kernel", "--patterns", "nope", match="unknown patterns", id="kernel-unknown-pattern"),
    case("bench", "kernel", "--lengths", "0", match="length", id="kernel-zero-length"),
    # eval
    case("eval", "nope", match="invalid choice: 'nope'", id="eval-unknown-task"),
    case("eval", "niah", "--model", "gemma3-27m", match="Did you mean gemma3-270m", id="niah-misspelt-model"),
    case("eval", "niah", "--model", "/nonexistent/model", match="not found", id="niah-missing-path"),
    case(
        "eval",
        "niah",
        "--model",
        "nope",
        match="unknown model 'nope'; embedded: gemma3-270m, smollm2-135m, or a local folder",
        id="niah-unknown-name",
    ),
    case("eval", "niah", "--model", "llama-3.2-1b-shape", match="shape-only", id="niah-shape-model"),
    case("eval", "niah", "--device", "nope", match="unknown device", id="niah-bad-device"),
    case("eval", "niah", "--dtype", "int8", match="invalid choice", id="niah-bad-dtype"),
    case("eval", "niah", "--methods", "sdpa,nope", match="unknown method 'nope'", id="niah-unknown-method"),
    case(
        "eval",
        "niah",
        "--method-params",
        '{"dense": {"budget": 1}}',
        match="unknown parameters ['budget']",
        id="niah-parameter-of-another-method",
    ),
    case(
        "eval",
        "niah",
        "--method-params",
        "{bad",
        match="argument --method-params: not valid JSON (Expecting property name",
        id="niah-bad-json",
    ),
    case("eval", "niah", "--method-params", "[1]", match="must be a JSON object", id="niah-json-not-object"),
    case("eval", "niah", "--lengths", "0", match="positive", id="niah-zero-length"),
    case("eval", "niah", "--lengths", "abc", match="bad length", id="niah-bad-length"),
    case("eval", "niah", "--max-length", "-1", match="max_length", id="niah-negative-max-length"),
    case("eval", "niah", "--depths", "1.5", match="[0, 1]", id="niah-depth-above-1"),
    case("eval", "niah", "--needle", "nope", match="unknown needle 'nope'", id="niah-unknown-needle"),
    case("eval", "niah", "--haystack", "{tmp}/missing.txt", match="not found", id="niah-missing-haystack"),
    case("eval", "niah", "--max-new-tokens", "0", match="max_new_tokens", id="niah-zero-new-tokens"),
    case("eval", "sweep", "--budgets", "0", match="bad budget '0'", id="sweep-zero-budget"),
    case("eval", "sweep", "--budgets", "abc", match="bad budget", id="sweep-bad-budget"),
    case("eval", "sweep", "--grid", "{bad", match="argument --grid: not valid JSON (", id="sweep-bad-grid"),
    case("eval", "sweep", "--grid", "[1]", match="must be a JSON object", id="sweep-grid-not-object"),
    case("eval", "sweep", "--task", "nope", match="invalid choice", id="sweep-unknown-task"),
    case("eval", "sweep", "--methods", "nope", match="unknown method", id="sweep-unknown-method"),
    case("eval", "mqar", "--settings", "0x0", match="seq_len", id="mqar-zero-setting"),
    case("eval", "mqar", "--settings", "abc", match="TxN", id="mqar-bad-setting"),
    case("eval", "mqar", "--budgets", "0", match="budgets", id="mqar-zero-budget"),
    case("eval", "mqar", "--num-examples", "0", match="num_examples", id="mqar-zero-examples"),
    case("eval", "mqar", "--block-size", "0", match="block_size", id="mqar-zero-block-size"),
    case("eval", "mqar", "--model", "/nonexistent/model", match="not found", id="mqar-missing-model"),
    case(
        "eval", "mqar", "--checkpoint", "{tmp}/missing", match="no tiny model", id="mqar-missing-checkpoint"
    ),
    case("eval", "mqar", "--train-tiny", "--batch-size", "0", match="batch_size", id="mqar-zero-batch"),
    case("eval", "mqar", "--train-tiny", "--lr", "-1", match="lr", id="mqar-negative-lr"),
    case("eval", "mqar", "--train-tiny", "--train-minutes", "0", match="max_minutes", id="mqar-zero-minutes"),
    case("eval", "mqar", "--train-tiny", "--train-threads", "0", match="num_threads", id="mqar-zero-threads"),
    case(
        "eval", "longbench", "--tasks", "nope", match="unknown LongBench task 'nope'", id="longbench-bad-task"
    ),
    case("eval", "longbench", "--limit", "0", match="limit", id="longbench-zero-limit"),
    case("eval", "longbench", "--max-length", "0", match="max_length", id="longbench-zero-max-length"),
    case(
        "eval", "longbench", "--max-new-tokens", "-1", match="max_new_tokens", id="longbench-negative-tokens"
    ),
    case("eval", "longbench", "--data-dir", "{tmp}/missing", match="not found", id="longbench-missing-data"),
    case("eval", "longbench", "--model", "gemma3-27m", match="Did you mean", id="longbench-misspelt-model"),
    # lm-eval: lm-eval's own command line, with the sparse-llm model type
    lm_eval_case(
        "--model_args", "pretrained=gemma3-27m", "--tasks", "t", match="Did you mean", id="misspelt"
    ),
    lm_eval_case("--model_args", "pretrained={tmp}/missing", "--tasks", "t", match="not found", id="missing"),
    lm_eval_case(
        "--model_args", "pretrained=nope", "--tasks", "t", match="unknown model 'nope'", id="unknown-name"
    ),
    lm_eval_case(
        "--model_args",
        "pretrained={tmp}/model,method=nope",
        "--tasks",
        "sparse_llm_cli_task",
        "--include_path",
        "{tmp}/tasks",
        match="unknown method 'nope'",
        id="unknown-method",
    ),
    lm_eval_case(
        "--model_args",
        "pretrained={tmp}/model,method=streaming,local_tokens=0",
        "--tasks",
        "sparse_llm_cli_task",
        "--include_path",
        "{tmp}/tasks",
        match="local_tokens",
        id="bad-method-parameter",
    ),
    lm_eval_case(
        "--model_args",
        "pretrained={tmp}/model,method=dhsa,budgett=512",
        "--tasks",
        "sparse_llm_cli_task",
        "--include_path",
        "{tmp}/tasks",
        match="method 'dhsa' got unknown parameters ['budgett']; it accepts",
        id="misspelt-method-parameter",
    ),
    lm_eval_case(
        "--model_args",
        "pretrained={tmp}/model",
        "--tasks",
        "nope_task",
        "--include_path",
        "{tmp}/tasks",
        match="Tasks not found: nope_task",
        id="unknown-task",
    ),
    lm_eval_case("--tasks", "t", "--limit", "abc", match="invalid float value", id="bad-limit"),
    lm_eval_case(
        "--tasks",
        "t",
        "--longbench-data",
        "{tmp}/missing",
        match="not found; download https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip, "
        "unzip it and pass --longbench-data <unzipped>/data",
        id="missing-longbench",
    ),
]


@pytest.mark.parametrize("argv, match", CASES)
def test_bad_argument_exits_2_with_one_line(argv, match, paths, no_work, capsys, monkeypatch):
    if HAS_LM_EVAL:  # the cases need only local tasks
        from test_lm_eval_plugin import local_tasks_only_and_quiet

        local_tasks_only_and_quiet(monkeypatch)
    try:
        code = cli.main([token.replace("{tmp}", str(paths)) for token in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and err, err
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 1, err
    assert err[-1].startswith(("sparse-llm", "lm-eval")) and match in err[-1], err


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hugging Face hub that knows no model and a cache that holds ``cached/model`` (4096 positions);
    set ``hub.reachable = False`` to take the network away."""
    import huggingface_hub

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    cache = {("cached/model", "config.json"): str(tmp_path / "config.json")}
    state = argparse.Namespace(reachable=True)

    def repo_exists(self, repo_id, **kwargs):
        if not state.reachable:
            raise ConnectionError("Name or service not known")
        return False

    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: cache.get((repo, name))
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", repo_exists)
    return state


@pytest.mark.parametrize(
    "reachable, argv, match",
    [
        pytest.param(
            True, ["--model", "nope/nope"], "nope/nope not found on the Hugging Face hub", id="unknown"
        ),
        pytest.param(False, ["--model", "nope/nope"], "the hub cannot be reached", id="offline"),
        pytest.param(False, ["--model", "cached/model", "--lengths", "8k"], "4096 positions", id="cached"),
    ],
)
def test_bench_checks_a_hub_model_before_it_starts(reachable, argv, match, hub, no_work, capsys):
    hub.reachable = reachable
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and match in err[0], err


def test_bench_cuda_without_cuda_is_a_bad_flag(no_work, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "sees no cuda" in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser, name: str = "sparse-llm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _all_parsers():
    """Every parser, each evaluation's own flags included (they are added only when it is chosen)."""
    from sparse_llm.eval import list_tasks

    seen = {}
    for task in [*list_tasks(), None]:
        if task == cli.LM_EVAL:
            continue  # lm-eval's own command line and help
        argv = ["eval", task, "--help"] if task else ["--help"]
        for name, parser in _parsers(cli.build_parser(argv)):
            if parser._actions[1:] or name not in seen:
                seen[name] = parser
    return seen


@pytest.mark.parametrize("name", sorted(_all_parsers()))
def test_help_shows_every_default(name):
    parser = _all_parsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        default = cli._shown_default(action)
        if default is not None:
            rendered = parser._get_formatter()._format_action(action)
            assert "default" in rendered, (name, action.option_strings, rendered)
    assert "usage: " + name in " ".join(text.split())


@pytest.mark.parametrize("name", sorted(_all_parsers()))
def test_every_flag_says_what_it_does(name):
    parser = _all_parsers()[name]
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            assert action.help or cli._shown_default(action), (name, action.option_strings)


def test_help_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: sdpa,floor,dense,streaming,block_topk)" in text and "(default: 4,1)" in text
    assert "(default: 3)" in text and "(default: cpu)" in text


def test_error_messages_are_one_line_even_when_the_error_is_not(capsys, monkeypatch):
    def fails(args):
        raise OSError("first line\n  second line\n")

    monkeypatch.setattr(cli, "_cmd_methods", fails)
    assert cli.main(["methods"]) == 2
    assert capsys.readouterr().err == "sparse-llm: error: first line second line\n"


def test_good_flags_pass_the_checks_and_reach_the_work(no_work):
    params = {"streaming": {"local_tokens": 64}}
    with pytest.raises(Reached):
        cli.main(["bench", "--methods", "sdpa,streaming", "--method-params", json.dumps(params)])


def _usage_lines():
    """``(command, documented --methods)`` of each usage line in docs/cli.md that shows the default."""
    found = re.findall(
        r"^sparse-llm (demo|bench|eval \w+) .*?\[--methods ([\w,]+)\]", CLI_MD.read_text(), re.M
    )
    assert len(found) >= 6, found
    return found


@pytest.mark.parametrize("command, documented", _usage_lines(), ids=[c for c, _ in _usage_lines()])
def test_cli_md_shows_the_default_methods_of_each_command(command, documented):
    argv = [*command.split(), "--help"]
    name = "sparse-llm " + command
    parser = dict(_parsers(cli.build_parser(argv)))[name]
    default = next(a.default for a in parser._actions if a.dest == "methods")
    assert documented == ",".join(default), name


def test_cli_md_shows_the_demo_table_as_the_demo_prints_it():
    from sparse_llm.demo import DemoRow, format_table

    header = format_table([DemoRow("sdpa", None, 1.0, 0.0, "", False)]).splitlines()[:2]
    text = CLI_MD.read_text()
    documented = next(line for line in text.splitlines() if line.startswith("method      density"))
    ruler = text.splitlines()[text.splitlines().index(documented) + 1]
    assert documented.split() == header[0].split() and set(ruler) == set(header[1])
