"""``sparse-llm eval sweep`` on a tiny random Gemma 3 and an in-process tokenizer (no hub, no files read).

The random model never finds the needle, so the run tests check the bookkeeping (points, records,
resume, density, speedup, plots); the frontier markers are checked on hand-written records with
known accuracies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

import sparse_llm
from sparse_llm.backends.streaming import Streaming
from sparse_llm.cli import main
from sparse_llm.eval import niah, plots, sweep
from sparse_llm.eval.haystack import build_needle_prompt
from sparse_llm.eval.niah import NiahConfig
from sparse_llm.texts import REPEAT_FILLER

LENGTHS, DEPTHS = (192, 256), (0.25, 0.75)
SMALL = {"block_size": 16, "sink_tokens": 16, "local_tokens": 32}  # minimum budget 48 tokens
STREAMING = {"sink_tokens": 16, "local_tokens": 64}


@pytest.fixture
def calls(tiny, monkeypatch):
    """Serve the tiny model to ``run_sweep`` and log each prefill as ``(sparse, prompt length)``."""
    model, tokenizer = tiny
    monkeypatch.setattr(niah, "load_any", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(niah, "max_positions", lambda name: model.config.max_position_embeddings)
    log = []
    real = sweep.prefill_and_generate

    def counted(model, input_ids, max_new_tokens, *, sparse, **kwargs):
        log.append((sparse, input_ids.shape[1]))
        return real(model, input_ids, max_new_tokens, sparse=sparse, **kwargs)

    monkeypatch.setattr(sweep, "prefill_and_generate", counted)
    return log


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model, tokenizer = tiny
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task(**overrides) -> NiahConfig:
    kwargs = dict(
        model="tiny", methods=("sdpa",), lengths=LENGTHS, depths=DEPTHS, haystack="repeat", max_new_tokens=1
    )
    return NiahConfig(**{**kwargs, **overrides})


def sweep_config(**overrides) -> sweep.SweepConfig:
    """The tiny run's sweep; ``block_topk`` and ``streaming`` get small windows when they run."""
    kwargs = {
        "niah": task(),
        "methods": ("sdpa", "dense", "block_topk", "streaming"),
        "budgets": ("1/4", 64, "1/8"),
        **overrides,
    }
    small = {"block_topk": SMALL, "streaming": STREAMING}
    kwargs.setdefault("method_params", {m: small[m] for m in kwargs["methods"] if m in small})
    return sweep.SweepConfig(**kwargs)


def read_records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("512", 512, id="tokens"),
        pytest.param(" 4k ", 4096, id="kilo-tokens"),
        pytest.param(64, 64, id="int"),
        pytest.param("1/8", Fraction(1, 8), id="fraction"),
        pytest.param("0.125", Fraction(1, 8), id="decimal"),
        pytest.param(0.25, Fraction(1, 4), id="float"),
        pytest.param("1/1", Fraction(1), id="whole-length"),
        pytest.param("1", 1, id="one-token"),
    ],
)
def test_parse_budget(text, expected):
    budget = sweep.parse_budget(text)
    assert budget == expected and type(budget) is type(expected)
    assert sweep.parse_budget(sweep.format_budget(budget)) == budget  # the stored form round-trips


@pytest.mark.parametrize("text", ["0", "-1/8", "3/2", "1.5", "abc", "1/0", "", "4kk", True, -5, 0.0])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="bad budget .*fraction of the context length in \\(0, 1\\]"):
        sweep.parse_budget(text)


def test_parse_budgets_list():
    assert sweep.parse_budgets("1/16, 1/8,512") == (Fraction(1, 16), Fraction(1, 8), 512)
    assert sweep.parse_budgets("") == ()


@pytest.mark.parametrize(
    "budget, length, block, tokens",
    [
        pytest.param(Fraction(1, 8), 4096, 64, 512, id="exact"),
        pytest.param(Fraction(1, 3), 1000, 64, 384, id="rounded-up-to-blocks"),
        pytest.param(Fraction(1, 16), 1000, 16, 64, id="other-block-size"),
        pytest.param(Fraction(1, 1000), 1000, 64, 64, id="at-least-one-block"),
        pytest.param(500, 4096, 64, 500, id="tokens-as-given"),
    ],
)
def test_resolve_budget(budget, length, block, tokens):
    assert sweep.resolve_budget(budget, length, block) == tokens


# ---------------------------------------------------------------------------------- point list


def ids(points):
    return [p.id for p in points]


def test_points_sweep_budgets_of_methods_with_a_budget_field():
    config = sweep.SweepConfig(
        niah=task(lengths=(1024, 4096)),
        methods=("sdpa", "dense", "block_topk", "dhsa"),
        budgets=("1/8", 1024),
        method_params={"dhsa": {"dense_tail_blocks": 1}},
        grid={"dhsa": {"chunk_size": [32, 64]}},
    )
    points, skipped = config.points((1024, 4096))
    dhsa = "L{}-dhsa[budget={},chunk_size={},dense_tail_blocks=1]"
    expected = []
    for n, eighth in ((1024, 128), (4096, 512)):
        expected += [f"L{n}-sdpa", f"L{n}-dense", f"L{n}-block_topk[budget=1024]"]
        expected += [dhsa.format(n, b, c) for c in (32, 64) for b in (eighth, 1024) if b >= 256]
    assert ids(points) == expected
    # Budgets below a method's sink + local window (block_topk: 64 + 512, dhsa: 128 + 128): skipped.
    assert [s["id"] for s in skipped] == [
        "L1024-block_topk[budget=128]",
        dhsa.format(1024, 128, 32),
        dhsa.format(1024, 128, 64),
        "L4096-block_topk[budget=512]",
    ]
    assert all("must cover sink_tokens + local_tokens" in s["reason"] for s in skipped)
    point = points[-1]
    assert (point.budget, point.budget_spec, point.length) == (1024, "1024", 4096)
    assert points[-2].budget_spec == "1/8" and points[0].budget is None


def test_streaming_spends_the_budget_on_its_window():
    config = sweep.SweepConfig(niah=task(lengths=(4096,)), methods=("streaming",), budgets=("1/8", 1024))
    points, _ = config.points((4096,))
    assert ids(points) == ["L4096-streaming[local_tokens=384]", "L4096-streaming[local_tokens=896]"]


def test_points_budget_in_params_is_not_swept_and_duplicates_run_once():
    config = sweep.SweepConfig(
        niah=task(lengths=(4096,)),
        methods=("block_topk", "dhsa"),
        budgets=("1/8", 512, 1024),
        method_params={"block_topk": {"budget": 2048}},
    )
    points, skipped = config.points((4096,))
    assert ids(points) == ["L4096-block_topk[budget=2048]"] + [
        f"L4096-dhsa[budget={b}]" for b in (512, 1024)
    ]  # 1/8 of 4096 = 512: once
    assert skipped == [] and points[0].budget == 2048


def test_points_with_params_for_budget(monkeypatch):
    """A method without a budget field takes the budget only if it declares how (here: a window)."""

    def params_for_budget(cls, budget, params):
        return {**params, "local_tokens": budget - params.get("sink_tokens", cls.sink_tokens)}

    monkeypatch.setattr(Streaming, "params_for_budget", classmethod(params_for_budget), raising=False)
    config = sweep.SweepConfig(
        niah=task(lengths=(1024,)),
        methods=("streaming",),
        budgets=("1/8", 512, 64),
        method_params={"streaming": {"sink_tokens": 64}},
    )
    points, skipped = config.points((1024,))
    assert [(p.budget, p.params["local_tokens"]) for p in points] == [(128, 64), (512, 448)]
    assert [s["budget"] for s in skipped] == [64]
    assert "local_tokens must be a positive int" in skipped[0]["reason"]


def test_points_grid_is_a_cartesian_product():
    config = sweep.SweepConfig(
        niah=task(lengths=(2048,)),
        methods=("streaming",),
        budgets=("1/4",),
        grid={"streaming": {"sink_tokens": [32, 64], "local_tokens": [128, 256, 512]}},
    )
    points, _ = config.points((2048,))
    assert [(p.params["sink_tokens"], p.params["local_tokens"]) for p in points] == [
        (s, w) for s in (32, 64) for w in (128, 256, 512)
    ]
    assert all(p.budget is None for p in points)


@pytest.mark.parametrize(
    "overrides, message",
    [
        pytest.param({"methods": ("sdpa", "dhsaa")}, "Did you mean dhsa", id="unknown-method"),
        pytest.param({"grid": {"dhsa": {"chunk_size": [32]}}}, "methods not run", id="grid-for-other-method"),
        pytest.param({"grid": {"dense": {"bugdet": [1]}}}, "unknown parameters", id="grid-unknown-param"),
        pytest.param({"grid": {"dense": {"block_size": []}}}, "non-empty lists", id="grid-empty-list"),
        pytest.param({"grid": {"dense": {"block_size": 32}}}, "non-empty lists", id="grid-not-a-list"),
        pytest.param({"grid": {"sdpa": {"x": [1]}}}, "sdpa baseline takes no parameters", id="grid-sdpa"),
        pytest.param(
            {"method_params": {"block_topk": {"block_size": 33}}},
            "no setting of block_topk",
            id="bad-fixed-param",
        ),
        pytest.param({"budgets": ("1/8", "2/1")}, "bad budget", id="bad-budget"),
        pytest.param(
            {"method_params": {"dense": {"block_size": 32}}, "grid": {"dense": {"block_size": [16]}}},
            "not in both",
            id="param-twice",
        ),
        pytest.param({"methods": ()}, "no method given", id="no-methods"),
    ],
)
def test_config_errors(overrides, message):
    kwargs = {"niah": task(lengths=(1024,)), "methods": ("sdpa", "dense", "block_topk"), **overrides}
    with pytest.raises(ValueError, match=message):
        sweep.SweepConfig(**kwargs)


# ---------------------------------------------------------------------------------------- runs


def test_run_writes_one_record_per_point_results_and_plots(calls, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sparse_llm.eval.sweep"):
        result = sweep.run_sweep(sweep_config(), out=out, progress=False)
    records = read_records(out)
    block = "block_topk[block_size=16,budget={},local_tokens=32,sink_tokens=16]"
    streaming = "streaming[local_tokens=64,sink_tokens=16]"
    # 1/4 of 192 = 48, of 256 = 64 (= the int budget: one point); 1/8 = 24 -> 32 tokens < 48: skipped.
    expected = []
    for n, quarter in ((192, 48), (256, 64)):
        budgets = (quarter, 64) if quarter != 64 else (64,)
        expected += [
            f"L{n}-sdpa",
            f"L{n}-dense",
            *(f"L{n}-" + block.format(b) for b in budgets),
            f"L{n}-{streaming}",
        ]
    assert [r["id"] for r in records] == expected
    assert len(calls) == len(expected) * len(DEPTHS)  # one prefill per point and depth
    skipped = [f"L{n}-" + block.format(32) for n in LENGTHS]
    assert [s["id"] for s in result["scores"]["skipped"]] == skipped
    assert all(f"skipping {i}" in caplog.text for i in skipped) and "must cover" in caplog.text

    for r in records:
        assert [d["depth"] for d in r["depths"]] == list(DEPTHS)
        assert r["accuracy"] == pytest.approx(sum(d["exact_match"] for d in r["depths"]) / len(DEPTHS))
        assert r["prefill_s"] == pytest.approx(sum(d["prefill_s"] for d in r["depths"]) / len(DEPTHS))
        window = r["local_tokens"]
        for d in r["depths"]:
            assert d["needle_position"] == d["needle_span"][0] < d["needle_span"][1] <= r["length"]
            assert d["outside_local"] is (window is None or d["needle_span"][1] <= r["length"] - window)
        far = [d["exact_match"] for d in r["depths"] if d["outside_local"]]
        assert r["far_depths"] == len(far)
        assert r["accuracy_far"] == (pytest.approx(sum(far) / len(far)) if far else None)
        if r["method"] == "sdpa":
            assert r["density"] is None and r["budget"] is None and window is None
        elif r["method"] == "dense":
            assert r["density"] == 1.0 and window is None
        else:
            assert 0 < r["density"] < 1 and window == r["params"]["local_tokens"]
            assert r["budget"] == r["params"].get("budget")
    # Needles end at tokens 85, 147 (of 192) and 104, 195 (of 256): all outside block_topk's 32-token
    # window, the later ones inside streaming's 64 tokens, so its far accuracy counts one depth.
    assert [(r["far_depths"], r["local_tokens"]) for r in records if r["method"] != "block_topk"] == [
        *[(2, None), (2, None), (1, 64)] * 2
    ]
    assert all(r["far_depths"] == 2 for r in records if r["method"] == "block_topk")

    saved = json.loads((out / "results.json").read_text())
    scores = saved["scores"]
    assert scores == result["scores"] and scores["points"] == scores["points_total"] == len(expected)
    assert saved["config"]["budgets"] == ["1/4", "64", "1/8"] and saved["config"]["task"] == "sweep"
    rows = {r["id"]: r for r in scores["rows"]}
    for n in LENGTHS:
        info = scores["by_length"][str(n)]
        sdpa = rows[f"L{n}-sdpa"]
        assert info["sdpa_prefill_s"] == sdpa["prefill_s"] and info["reference"]["id"] == sdpa["id"]
        for r in (r for r in rows.values() if r["length"] == n):
            assert r["speedup"] == pytest.approx(sdpa["prefill_s"] / r["prefill_s"])
        # The random model answers nothing at all: every method matches sdpa at its sparsest setting.
        assert info["matches_reference"]["block_topk"]["density"] == min(
            r["density"] for r in rows.values() if r["length"] == n and r["method"] == "block_topk"
        )
        assert set(info["matches_reference"]) == {"dense", "block_topk", "streaming"}
    assert result["plots"] == [str(out / f"sweep-L{n}.png") for n in LENGTHS]
    assert all((out / f"sweep-L{n}.png").stat().st_size > 0 for n in LENGTHS)


def test_resume_skips_finished_points(calls, tmp_path):
    out = tmp_path / "run"
    config = sweep_config(niah=task(lengths=(256,)), methods=("sdpa", "block_topk"), budgets=(64, 128))
    sweep.run_sweep(config, out=out, progress=False)
    full = read_records(out)
    assert len(full) == 3 and len(calls) == 3 * len(DEPTHS)
    # Interrupted during the last point: its record half-written, results.json not written yet.
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:-1]) + lines[-1][:30])
    (out / "results.json").unlink()
    with pytest.raises(FileExistsError, match="resume"):
        sweep.run_sweep(config, out=out, progress=False)
    calls.clear()
    result = sweep.run_sweep(config, out=out, resume=True, progress=False)
    assert calls == [(True, 256)] * len(DEPTHS)  # only the last point ran again
    assert read_records(out)[:-1] == full[:-1] and read_records(out)[-1]["id"] == full[-1]["id"]
    assert result["scores"]["points"] == 3
    calls.clear()
    sweep.run_sweep(config, out=out, resume=True, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="configuration differs in \\['budgets'\\]"):
        sweep.run_sweep(replace(config, budgets=(64,)), out=out, resume=True)


def test_density_is_what_attention_stats_reports(tiny, calls, tmp_path):
    model, tokenizer = tiny
    config = sweep_config(methods=("block_topk",), budgets=(64,), niah=task(lengths=(256,)))
    sweep.run_sweep(config, out=tmp_path / "run", progress=False)
    (record,) = read_records(tmp_path / "run")
    expected = []
    for depth in DEPTHS:
        p = build_needle_prompt(
            tokenizer, context_tokens=256, depth=depth, needle="passkey", haystack=REPEAT_FILLER
        )
        with sparse_llm.sparse_attention(model, "block_topk", **SMALL, budget=64), torch.inference_mode():
            model(p.input_ids, use_cache=True, logits_to_keep=1)
            expected.append(sparse_llm.attention_stats(model)["density"])
    assert [d["density"] for d in record["depths"]] == expected
    assert record["density"] == pytest.approx(sum(expected) / len(expected)) and 0 < record["density"] < 1


# --------------------------------------------------------------------------- frontier and plots


def hand_rows():
    """``(method, budget, density, prefill_s, accuracy)`` at 1024 tokens (dense: the reference at 2048)."""
    return {
        1024: [
            ("sdpa", None, None, 1.0, 0.8),
            ("dense", None, 1.0, 1.25, 0.8),
            ("block_topk", 128, 0.2, 0.25, 0.4),
            ("block_topk", 256, 0.4, 0.4, 0.8),
            ("block_topk", 512, 0.7, 0.8, 1.0),
            ("streaming", None, 0.3, 0.2, 0.6),
        ],
        2048: [("dense", None, 1.0, 2.0, 0.5), ("block_topk", 256, 0.2, 0.5, 0.25)],
    }


def hand_folder(folder):
    points, records = [], []
    for n, rows in hand_rows().items():
        for method, budget, density, seconds, accuracy in rows:
            point = sweep.Point(method, {} if budget is None else {"budget": budget}, n, budget)
            points.append(point)
            record = {"id": point.id, "method": method, "label": point.spec.label, "length": n}
            record |= {"params": point.params, "budget": budget, "density": density, "prefill_s": seconds}
            records.append({**record, "accuracy": accuracy, "accuracy_far": accuracy})
    scores = sweep.summarize(records, points, [])
    folder.mkdir()
    config = {
        "task": "sweep",
        "model": "m",
        "needle": "passkey",
        "haystack": "repeat",
        "depths": [0.5],
        "methods": ["sdpa", "dense", "block_topk", "streaming"],
    }
    (folder / "results.json").write_text(json.dumps({"config": config, "scores": scores}))
    return scores


def test_frontier_markers_and_pareto_sets(tmp_path):
    scores = hand_folder(tmp_path / "run")
    info = scores["by_length"]["1024"]
    assert info["reference"] == {"id": "L1024-sdpa", "method": "sdpa", "accuracy": 0.8}
    match = info["matches_reference"]
    assert match["block_topk"]["id"] == "L1024-block_topk[budget=256]"
    assert match["block_topk"]["density"] == 0.4
    assert match["dense"]["density"] == 1.0 and match["streaming"] is None
    assert info["pareto_density"] == [
        "L1024-block_topk[budget=128]",
        "L1024-streaming",
        "L1024-block_topk[budget=256]",
        "L1024-block_topk[budget=512]",
    ]
    rows = {r["id"]: r for r in scores["rows"]}
    assert rows["L1024-streaming"]["speedup"] == 5.0 and rows["L1024-dense"]["speedup"] == 0.8
    assert info["pareto_speedup"] == [
        "L1024-streaming",
        "L1024-block_topk[budget=256]",
        "L1024-block_topk[budget=512]",
    ]
    # Without sdpa: the full-density point is the reference, and there is no speedup.
    info = scores["by_length"]["2048"]
    assert info["reference"]["id"] == "L2048-dense" and info["sdpa_prefill_s"] is None
    assert info["matches_reference"] == {"block_topk": None}  # the reference is not matched to itself
    assert info["pareto_speedup"] == [] and rows["L2048-dense"]["speedup"] is None
    table = sweep.markdown_table(scores)
    assert "1024 tokens: block_topk matches sdpa (0.80) from density 0.400" in table
    assert "1024 tokens: streaming matches sdpa (0.80) never" in table


def test_pareto_plot_from_results_file(tmp_path):
    hand_folder(tmp_path / "run")
    pngs = plots.plot_sweep(tmp_path / "run")
    assert pngs == [tmp_path / "run" / "sweep-L1024.png", tmp_path / "run" / "sweep-L2048.png"]
    import matplotlib.image

    image = matplotlib.image.imread(pngs[0])
    assert image.shape[1] > 1000 and image[..., :3].std() > 0.05  # drawn, not blank
    with pytest.raises(FileNotFoundError, match="results.json"):
        plots.plot_sweep(tmp_path)


# ----------------------------------------------------------------------------------------- CLI


def cli(*args):
    return main(["eval", "sweep", "--quiet", *map(str, args)])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "sweep", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ("--budgets", "--grid", "--methods", "--lengths", "--depths", "--haystack", "--resume", "--task")
    assert all(flag in text for flag in flags)
    assert "sweep-L<length>.png" in text


def test_cli_runs_resumes_and_replots(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = (
        "--model",
        model_dir,
        "--haystack",
        "repeat",
        "--methods",
        "sdpa,block_topk",
        "--budgets",
        "1/4,64",
        "--method-params",
        json.dumps({"block_topk": SMALL}),
        "--lengths",
        "192",
        "--depths",
        "0.5",
        "--max-new-tokens",
        "2",
        "--out",
        out,
    )
    assert cli(*args) == 0
    stdout = capsys.readouterr().out
    assert "| length | method | budget |" in stdout and "| 192 | sdpa | - | - |" in stdout
    assert len(read_records(out)) == 3 and (out / "sweep-L192.png").is_file()
    assert cli(*args) == 2 and "--resume" in capsys.readouterr().err
    assert cli(*args, "--resume") == 0 and len(read_records(out)) == 3
    (out / "sweep-L192.png").unlink()
    assert cli("--plot-only", "--out", out) == 0 and (out / "sweep-L192.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(("--budgets", "1/0"), "bad budget '1/0'", id="zero-denominator"),
        pytest.param(("--budgets", "1/8,2.5"), "bad budget '2.5'", id="above-one"),
        pytest.param(("--budgets", "-64"), "bad budget '-64'", id="negative"),
        pytest.param(("--grid", "{dhsa"), "argument --grid: not valid JSON", id="grid-json"),
        pytest.param(("--grid", '{"dhsa": {"chunk_size": [32]}}'), "methods not run", id="grid-method"),
        pytest.param(("--plot-only",), "needs --out", id="plot-only-without-out"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    common = ("--model", model_dir, "--methods", "sdpa,dense", "--lengths", "192", "--out", out)
    common = () if "--plot-only" in args else common
    try:
        code = cli(*common, *args)
    except SystemExit as exit_:  # a flag argparse itself rejects
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparse-llm") and message in err[0], err
    assert not out.exists()


def test_cli_unknown_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("--task", "mqar")
    assert exit_.value.code == 2 and "invalid choice: 'mqar'" in capsys.readouterr().err


def test_far_field_counts_in_the_attended_density():
    """A point with a far field is placed, matched and tabled by what it computed: exact density plus
    its far field's, so a cheap-looking exact part cannot hide the far keys it reads."""
    points, records = [], []
    for method, params, density, far, accuracy in [
        ("sdpa", {}, None, None, 1.0),
        ("block_topk", {"budget": 256}, 0.25, 0.2, 1.0),
        ("block_topk", {"budget": 384}, 0.4, None, 1.0),
    ]:
        point = sweep.Point(method, params, 1024, params.get("budget"))
        points.append(point)
        record = {"id": point.id, "method": method, "label": point.spec.label, "length": 1024}
        record |= {"params": point.params, "budget": point.budget, "density": density, "far_density": far}
        records.append({**record, "prefill_s": 1.0, "accuracy": accuracy, "accuracy_far": accuracy})
    scores = sweep.summarize(records, points, [])
    rows = {r["id"]: r for r in scores["rows"]}
    assert rows["L1024-block_topk[budget=256]"]["attended"] == pytest.approx(0.45)
    assert rows["L1024-block_topk[budget=384]"]["attended"] == pytest.approx(0.4)
    info = scores["by_length"]["1024"]
    assert info["matches_reference"]["block_topk"]["id"] == "L1024-block_topk[budget=384]"
    assert info["pareto_density"] == ["L1024-block_topk[budget=384]"]
    table = sweep.markdown_table(scores)
    assert "| 0.250 + 0.200 |" in table and "from density 0.400" in table
