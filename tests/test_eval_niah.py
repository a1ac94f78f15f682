"""``sparse-llm eval niah`` on a tiny random Gemma 3 and an in-process tokenizer (no hub, no files read).

The random model never finds the needle, so what is checked is the bookkeeping: one record per
cell with consistent scores, exact methods answering like sdpa, resume without recomputation, the
heatmap drawn from the files (on a hand-written folder with known cells), and clean input errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparse_llm.cli import main
from sparse_llm.eval import niah, plots
from sparse_llm.eval.haystack import NEEDLES, score_answer

LENGTHS, DEPTHS = (192, 256), (0.25, 0.75)
STREAMING = {"sink_tokens": 64, "local_tokens": 64}


@pytest.fixture
def prefills(tiny, monkeypatch):
    """Serve the tiny model to ``run_niah`` and count its prefills (forwards of >= 100 tokens)."""
    model, tokenizer = tiny
    monkeypatch.setattr(niah, "load_any", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(niah, "max_positions", lambda name: model.config.max_position_embeddings)
    lengths = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] >= 100:
            lengths.append(ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield lengths
    handle.remove()


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    """The tiny model and tokenizer saved as a Hugging Face folder, for ``--model PATH``."""
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model, tokenizer = tiny
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def grid_config(**overrides) -> niah.NiahConfig:
    kwargs = dict(
        model="tiny",
        methods=("sdpa", "streaming"),
        method_params={"streaming": STREAMING},
        lengths=LENGTHS,
        depths=DEPTHS,
        haystack="repeat",
        max_new_tokens=4,
    )
    kwargs.update(overrides)
    return niah.NiahConfig(**kwargs)


def read_records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def without_timing(records):
    return sorted(({k: v for k, v in r.items() if k != "prefill_s"} for r in records), key=lambda r: r["id"])


def test_grid_writes_one_record_per_cell_and_a_heatmap(prefills, tmp_path):
    out = tmp_path / "run"
    result = niah.run_niah(grid_config(), out=out, progress=False)
    records = read_records(out)
    ids = [r["id"] for r in records]
    # Loop order lengths -> depths -> methods, and one prefill per cell.
    assert ids == [f"L{n}-d{d}-{m}" for n in LENGTHS for d in (25, 75) for m in ("sdpa", "streaming")]
    assert prefills == [n for n in LENGTHS for _ in range(4)]
    for r in records:
        assert r["exact_match"] is score_answer(r["generated"], NEEDLES["passkey"].answer)
        assert r["rouge1_recall"] == niah.rouge1_recall("71432", r["generated"])
        assert abs(r["needle_depth"] - r["depth"]) < 0.2 and r["prefill_s"] > 0
        if r["method"] == "sdpa":
            assert r["density"] is None and r["label"] == "sdpa" and r["params"] == {}
        else:
            assert 0 < r["density"] < 1 and r["params"] == STREAMING
    saved = json.loads((out / "results.json").read_text())
    assert saved["scores"] == result["scores"] and saved["config"]["lengths"] == list(LENGTHS)
    assert {"versions", "git", "machine", "date"} <= set(saved)
    scores = saved["scores"]
    assert scores["cells"] == scores["cells_total"] == 8
    for name, m in scores["methods"].items():
        mine = [r for r in records if r["method"] == name]
        assert m["accuracy"] == pytest.approx(np.mean([r["exact_match"] for r in mine]))
        assert set(m["accuracy_by_length"]) == {"192", "256"}
        exact = {r["id"]: int(r["exact_match"]) for r in mine}
        assert m["grid"] == {str(n): {d: exact[f"L{n}-d{d}-{name}"] for d in ("25", "75")} for n in LENGTHS}
    assert (out / "niah.png").stat().st_size > 0 and result["plot"] == str(out / "niah.png")
    table = niah.markdown_table(scores).splitlines()
    assert table[0] == "| method | density | 192 tok | 256 tok | all |"
    assert table[2].startswith("| sdpa | - |") and table[3].startswith(
        "| streaming[local_tokens=64,sink_tokens=64] | 0."
    )


def test_resume_runs_only_unfinished_cells(prefills, tmp_path):
    out = tmp_path / "run"
    config = grid_config(methods=("sdpa", "dense"), method_params={})
    niah.run_niah(config, out=out, progress=False)
    full = read_records(out)
    # Exact attention: the dense method answers exactly like the unpatched model.
    for r in full[1::2]:
        assert r["generated"] == next(
            s["generated"] for s in full if s["id"] == r["id"].replace("dense", "sdpa")
        )
    # Interrupted during the last cell: its record half-written, results.json not written yet.
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    (out / "results.json").unlink()
    with pytest.raises(FileExistsError, match="resume"):
        niah.run_niah(config, out=out, progress=False)
    prefills.clear()
    niah.run_niah(config, out=out, resume=True, progress=False)
    assert prefills == [LENGTHS[-1]]  # only the missing cell ran again
    assert without_timing(read_records(out)) == without_timing(full)
    assert read_records(out)[:-1] == full[:-1]  # finished cells kept as they were, timings included
    prefills.clear()
    niah.run_niah(config, out=out, resume=True, progress=False)
    assert prefills == []
    with pytest.raises(ValueError, match="configuration differs"):
        niah.run_niah(
            grid_config(methods=("sdpa", "dense"), method_params={}, depths=(0.5,)), out=out, resume=True
        )


@pytest.mark.parametrize(
    "reference, generated, expected",
    [
        pytest.param("71432", "The pass key is 71432. Remember it.", 1.0, id="number-found"),
        pytest.param("71432", "714320", 0.0, id="longer-number"),
        pytest.param("71432", "", 0.0, id="empty-reply"),
        pytest.param("Banana", "it is BANANA!", 1.0, id="case-and-punctuation"),
        pytest.param("blue sky", "the sky", 0.5, id="half-the-words"),
        pytest.param("the the cat", "the cat sat", 2 / 3, id="counts-clipped"),
        pytest.param("the cat", "the the the", 0.5, id="repeats-not-rewarded"),
    ],
)
def test_rouge1_recall(reference, generated, expected):
    assert niah.rouge1_recall(reference, generated) == pytest.approx(expected)


def test_rouge1_recall_needs_a_reference():
    with pytest.raises(ValueError, match="no word tokens"):
        niah.rouge1_recall(" ?! ", "anything")


def test_default_lengths_follow_the_model_context():
    config = niah.NiahConfig(methods=("sdpa",))
    assert config.grid_lengths(32768) == (1024, 2048, 4096, 8192)
    assert config.grid_lengths(None) == (1024, 2048, 4096, 8192)
    assert config.grid_lengths(4096) == (1024, 2048, 4080)  # room for 16 answer tokens
    assert niah.NiahConfig(methods=("sdpa",), max_length=2048).grid_lengths(32768) == (1024, 2048)
    assert config.depths == tuple(i / 10 for i in range(11))
    with pytest.raises(ValueError, match="context"):
        niah.NiahConfig(methods=("sdpa",), lengths=(4096,)).grid_lengths(4096)


def write_folder(folder, cells, methods=("sdpa", "dhsa"), lengths=(1024, 2048), depths=(0.0, 0.5, 1.0)):
    """A hand-written niah results folder: ``cells`` maps (method, length, depth) -> exact match."""
    folder.mkdir()
    config = {
        "task": "niah",
        "model": "m",
        "needle": "passkey",
        "haystack": "repeat",
        "methods": list(methods),
        "lengths": list(lengths),
        "depths": list(depths),
    }
    (folder / "config.json").write_text(json.dumps(config))
    lines = [
        json.dumps(
            {
                "id": f"L{n}-d{d}-{m}",
                "method": m,
                "label": f"{m}!",
                "length": n,
                "depth": d,
                "exact_match": ok,
                "rouge1_recall": float(ok),
            }
        )
        for (m, n, d), ok in cells.items()
    ]
    (folder / "samples.jsonl").write_text("\n".join(lines) + '\n{"id": "torn')


def colour_pixels(png) -> dict[str, int]:
    import matplotlib.image

    rgb = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    wanted = {"green": plots._RETRIEVED, "red": plots._MISSED, "grey": plots._NOT_RUN}
    return {
        name: int((np.abs(rgb - [int(h[i : i + 2], 16) for i in (1, 3, 5)]).sum(-1) <= 6).sum())
        for name, h in wanted.items()
    }


def test_heatmap_from_a_hand_written_folder(tmp_path):
    cells = {("sdpa", n, d): True for n in (1024, 2048) for d in (0.0, 0.5, 1.0)}
    cells["sdpa", 2048, 1.0] = False
    cells["dhsa", 1024, 0.5] = False
    cells["dhsa", 2048, 0.0] = True
    write_folder(tmp_path / "run", cells)
    grid = plots.niah_grid(tmp_path / "run")
    assert list(grid["methods"]) == ["sdpa", "dhsa"] and grid["methods"]["dhsa"]["label"] == "dhsa!"
    np.testing.assert_array_equal(grid["methods"]["sdpa"]["exact"], [[1, 1], [1, 1], [1, 0]])
    nan = np.nan
    np.testing.assert_array_equal(grid["methods"]["dhsa"]["exact"], [[nan, 1], [0, nan], [nan, nan]])
    png = plots.plot_niah(tmp_path / "run")
    assert png == tmp_path / "run" / "niah.png"
    pixels = colour_pixels(png)
    assert all(pixels[c] > 500 for c in ("green", "red", "grey")), pixels
    # Green cells outnumber red ones 6:2: the areas follow.
    assert 2 < pixels["green"] / pixels["red"] < 4.5, pixels

    write_folder(
        tmp_path / "all",
        {("sdpa", n, d): True for n in (1024, 2048) for d in (0.0, 0.5, 1.0)},
        methods=("sdpa",),
    )
    pixels = colour_pixels(plots.plot_niah(tmp_path / "all"))
    # (a few grey-ish pixels come from anti-aliased edges, not from cells)
    assert pixels["green"] > 500 and pixels["red"] == 0 and pixels["grey"] < 0.01 * pixels["green"], pixels


def test_grid_scores_ruler_records_by_string_match_all(tmp_path):
    write_folder(tmp_path / "run", {("sdpa", 1024, 0.0): False, ("sdpa", 1024, 0.5): True}, methods=("sdpa",))
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()[:2]
    records = [json.loads(line) for line in lines]
    records[0]["string_match_all"], records[1]["string_match_all"] = (
        1.0,
        0.0,
    )  # the value inside a longer word
    (tmp_path / "run" / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    exact = plots.niah_grid(tmp_path / "run")["methods"]["sdpa"]["exact"]
    assert exact[0, 0] == 1.0 and exact[1, 0] == 0.0


def test_heatmap_needs_a_niah_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        plots.plot_niah(tmp_path)


def cli(*args):
    return main(["eval", "niah", "--quiet", *map(str, args)])


def test_cli_runs_and_replots(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--model", model_dir, "--haystack", "repeat", "--methods", "sdpa,dense", "--out", out)
    assert cli(*common, "--lengths", "192", "--depths", "0.5", "--max-new-tokens", "3") == 0
    stdout = capsys.readouterr().out
    assert "| method | density | 192 tok | all |" in stdout and "| dense | 1.000 |" in stdout
    assert len(read_records(out)) == 2
    (out / "niah.png").unlink()
    assert cli("--plot-only", "--out", out) == 0
    assert (out / "niah.png").is_file() and "| sdpa |" in capsys.readouterr().out
    # A second run into the same folder without --resume is refused, and changes nothing.
    before = (out / "samples.jsonl").read_text()
    assert cli(*common, "--lengths", "192", "--depths", "0.5", "--max-new-tokens", "3") == 2
    assert "--resume" in capsys.readouterr().err and (out / "samples.jsonl").read_text() == before


@pytest.mark.parametrize("runner", ["niah", "sweep"])
def test_lengths_beyond_the_context_fail_before_the_model_loads(tiny, monkeypatch, tmp_path, runner):
    from sparse_llm.eval import sweep

    def load_any(name, device="cpu", dtype=None):
        raise AssertionError("the model was loaded before the lengths were checked")

    monkeypatch.setattr(niah, "load_any", load_any)
    monkeypatch.setattr(niah, "max_positions", lambda name: tiny[0].config.max_position_embeddings)
    lengths = (256, 4096)
    task = niah.NiahConfig(model="tiny", methods=("sdpa",), lengths=lengths, depths=(0.5,), haystack="repeat")
    with pytest.raises(ValueError, match=r"lengths \[4096\] do not fit the model's context"):
        if runner == "niah":
            niah.run_niah(task, out=tmp_path / "run", progress=False)
        else:
            sweep.run_sweep(sweep.SweepConfig(niah=task, methods=("sdpa",), budgets=()), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(("--methods", "sdpa,dhsaa"), "Did you mean dhsa", id="unknown-method"),
        pytest.param(("--method-params", '{"dense": {"budget": 1}}'), "unknown parameters", id="bad-param"),
        pytest.param(("--lengths", "256,2048"), "do not fit the model's context", id="length-above-context"),
        pytest.param(("--lengths", "16"), "too short", id="length-below-frame"),
        pytest.param(("--haystack", "MISSING"), "haystack file not found", id="missing-haystack"),
        pytest.param(("--haystack", "EMPTY"), "empty", id="empty-haystack"),
        pytest.param(("--depths", "50"), "fractions in", id="depth-in-percent"),
        pytest.param(("--needle", "pasky"), "unknown needle", id="unknown-needle"),
        pytest.param(("--needle-text", "The code is 9."), "all of needle_text", id="half-custom-needle"),
        pytest.param(
            ("--needle-text", "X is 9.", "--question", "X?", "--answer", "8"),
            "does not occur",
            id="custom-needle-without-answer",
        ),
        pytest.param(("--plot-only",), "needs --out", id="plot-only-without-out"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text(" \n")
    subs = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt"}
    args = tuple(subs.get(a, a) for a in args)
    defaults = {"--methods": "sdpa,dense", "--lengths": "256", "--haystack": "repeat"}
    extra = [x for k, v in defaults.items() if k not in args for x in (k, v)]
    out = tmp_path / "run"
    if "--plot-only" in args:
        assert cli(*args) == 2
    else:
        assert cli("--model", model_dir, "--depths", "0.5", "--out", out, *extra, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
    assert err.startswith("sparse-llm: error:") and message in err, err
    assert not out.exists()
