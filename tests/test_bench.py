"""The bench command runs on a tiny model and writes a valid report (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from sparse_llm.bench.runner import BenchConfig, markdown, run_bench
from sparse_llm.cli import main


def test_bench_cli_writes_a_report_for_every_configuration(tmp_path, capsys):
    tiny_model("gemma3").save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    code = main(
        [
            "bench",
            "--model",
            str(tmp_path / "model"),
            "--methods",
            "sdpa,floor,streaming",
            "--lengths",
            "96,160",
            "--repeats",
            "1",
            "--rounds",
            "2",
            "--quiet",
            "--out",
            str(out),
            "--method-params",
            '{"streaming": {"sink_tokens": 16, "local_tokens": 32, "block_size": 16}}',
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    cells = {(r["length"], r["method"]) for r in report["results"]}
    assert cells == {(n, m) for n in (96, 160) for m in ("sdpa", "floor", "streaming")}
    streaming = next(r for r in report["results"] if r["method"] == "streaming" and r["length"] == 160)
    assert streaming["params"]["local_tokens"] == 32 and 0 < streaming["density"] < 1
    # one timed run per round, pooled over the 2 rounds (the configurations ran in turn)
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in report["results"])
    assert report["versions"]["torch"] and report["machine"]["cpus"] >= 1
    # the sparse layers' time is split into selection and the rest; baselines have no split
    assert streaming["selection_s"] > 0 and streaming["sparse_attention_s"] > 0
    assert all(r["selection_s"] is None for r in report["results"] if r["method"] in ("sdpa", "floor"))
    table = capsys.readouterr().out
    png = out.with_suffix(".png")
    assert table == markdown(report["results"]) + f"\nplot: {png}\n" and "| 160 | streaming |" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_name_the_cpu_isa_and_native_bf16(monkeypatch):
    """Result files name the CPU's vector ISA and whether it has bf16 arithmetic: selection timings
    differ ~2x between CPUs that report the same core count and architecture."""
    import torch

    from sparse_llm.backends import selection
    from sparse_llm.results import device_name, run_metadata

    isa = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    plain = device_name("cpu")
    assert plain.startswith("cpu (") and isa in plain and "native bf16" not in plain
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    assert run_metadata()["machine"]["device"].endswith(", native bf16)")


def test_bench_kernel_reports_every_density_and_pattern(tmp_path, capsys):
    out = tmp_path / "kernel.json"
    args = [
        "bench",
        "kernel",
        "--lengths",
        "256",
        "--densities",
        "0.5,1",
        "--heads",
        "4,2",
        "--head-dim",
        "32",
        "--block-size",
        "32",
        "--repeats",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads(out.read_text())["results"]
    cells = {(r["pattern"], r["impl"]) for r in rows}
    assert cells == {("causal", "ours"), ("causal", "sdpa"), ("window", "ours"), ("random", "ours")}
    sparse = [r for r in rows if r["pattern"] in ("window", "random")]
    assert len(sparse) == 4 and all(0 < r["density"] <= 1 and r["median_ms"] > 0 for r in sparse)
    assert {round(r["density"]) for r in sparse} == {0, 1}  # one near 0.5, one full
    assert out.with_suffix(".png").exists() and "| 256 | random | ours |" in capsys.readouterr().out


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_kernel_bench_masks_hit_the_requested_density(density):
    from sparse_llm.bench.kernel import random_mask, window_mask

    for make in (window_mask, random_mask):
        mask = make(4096, 64, density, "cpu")
        assert abs(mask.density() - density) < 0.03, (make.__name__, mask.density())
        assert mask.to_dense()[0, 0].diagonal().all()  # every query block sees its own block


def test_kernel_bench_times_in_interleaved_rounds_and_takes_the_median_ratio():
    from sparse_llm.bench import kernel

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("dense", "a", "b")}
    rounds = []
    times = kernel.time_interleaved(fns, repeats=3, device="cpu", on_round=rounds.append)
    assert calls == ["dense", "a", "b"] * 4  # one warm-up of each, then 3 rounds of each in turn
    assert rounds == [0, 1, 2]
    assert {key: len(t) for key, t in times.items()} == {"dense": 3, "a": 3, "b": 3}

    # a machine that slows down in round 2 slows both alike: the per-round ratio stays 2, while the
    # ratio of the medians (1.2 / 1.0) would not
    config = kernel.KernelBenchConfig(lengths=(256,))
    mask = kernel.window_mask(256, 64, 0.5, "cpu")
    row = kernel._row(config, 256, "window", mask, "ours", [0.5, 1.0, 1.0], [1.0, 1.2, 2.0])
    assert row["speedup_vs_dense"] == pytest.approx(2.0)
    assert row["fraction_of_ideal"] == pytest.approx(2.0 * mask.density())
    assert row["median_ms"] == pytest.approx(1000.0)
    assert row["times_ms"] == pytest.approx([500.0, 1000.0, 1000.0])


def test_bench_config_rejects_unknown_methods_and_lengths():
    with pytest.raises(ValueError, match="unknown method 'streamin'"):
        BenchConfig(methods=("sdpa", "streamin"))
    with pytest.raises(ValueError, match="lengths must be positive"):
        BenchConfig(lengths=(0,))
    assert main(["bench", "--methods", "nope"]) == 2


def test_run_bench_reports_a_failing_configuration(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):  # caught before any process starts
        BenchConfig(model=str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")  # no model_type: the subprocess fails
    with pytest.raises(RuntimeError, match="failed"):
        run_bench(
            BenchConfig(model=str(tmp_path / "broken"), methods=("sdpa",), lengths=(64,), repeats=1),
            progress=False,
        )


def _prefill_row(method, length, seconds, density=None, selection=None):
    return {
        "method": method,
        "length": length,
        "median_s": seconds,
        "peak_mem_mb": 100.0 + seconds,
        "density": density,
        "prefill_chunk": None,
        "selection_s": selection,
        "sparse_attention_s": None if selection is None else seconds / 10,
    }


@pytest.mark.parametrize("lengths", [(8192,), (8192, 16384)])
def test_prefill_plot_keeps_one_colour_per_method_in_every_panel(tmp_path, monkeypatch, lengths):
    """Bars at a report's one length, lines over several; a method's bar or line and its density
    point share one colour, and the density legend names each method once."""
    from matplotlib.colors import to_hex

    from sparse_llm.bench import plots

    rows = []
    for n in lengths:
        rows += [
            _prefill_row("sdpa", n, 30.0),
            _prefill_row("dense", n, 14.0, 1.0, 0.01),
            _prefill_row("streaming", n, 12.0, 0.25, 0.01),
            _prefill_row("block_topk", n, 13.0, 0.4, 0.05),
        ]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"config": {"model": "m"}, "machine": {"device": "cpu"}, "results": rows}))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig) or path)
    plots.plot_prefill(report)
    left, _, right = figures[0].axes
    if len(lengths) == 1:
        bars = {
            t.get_text(): to_hex(p.get_facecolor())
            for t, p in zip(left.get_yticklabels(), left.patches, strict=True)
        }
        assert list(bars) == ["sdpa", "dense", "streaming", "block_topk"]
    else:
        bars = {line.get_label(): to_hex(line.get_color()) for line in left.get_lines()}
        assert [len(line.get_xdata()) for line in left.get_lines()] == [2] * 4
    points = right.collections[: 2 * len(lengths)]  # streaming and block_topk at each length
    assert {to_hex(c.get_facecolor()[0]) for c in points} == {bars["streaming"], bars["block_topk"]}
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels[:2] == ["streaming", "block_topk"] and labels.count("streaming") == 1
    assert ("16384 tokens" in labels) == (len(lengths) > 1)
