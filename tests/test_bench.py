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
            "sdpa,floor,dense,streaming",
            "--lengths",
            "96,160",
            "--repeats",
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
    assert cells == {(n, m) for n in (96, 160) for m in ("sdpa", "floor", "dense", "streaming")}
    streaming = next(r for r in report["results"] if r["method"] == "streaming" and r["length"] == 160)
    assert streaming["params"]["local_tokens"] == 32 and 0 < streaming["density"] < 1
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in report["results"])
    assert report["versions"]["torch"] and report["machine"]["cpus"] >= 1
    table = capsys.readouterr().out
    assert table == markdown(report["results"]) + "\n" and "| 160 | streaming |" in table


def test_bench_config_rejects_unknown_methods_and_lengths():
    with pytest.raises(ValueError, match="unknown method 'streamin'"):
        BenchConfig(methods=("sdpa", "streamin"))
    with pytest.raises(ValueError, match="lengths must be positive"):
        BenchConfig(lengths=(0,))
    assert main(["bench", "--methods", "nope"]) == 2


def test_run_bench_reports_a_failing_configuration(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        run_bench(
            BenchConfig(model=str(tmp_path / "missing"), methods=("sdpa",), lengths=(64,), repeats=1),
            progress=False,
        )
