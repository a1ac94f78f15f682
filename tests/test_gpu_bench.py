"""``scripts/gpu_bench.sh``: its step timeouts fit the GPU session, and ``--dry-run`` runs every step
at tiny sizes on CPU, writing the JSON lines a GPU run would (the plumbing, not the numbers)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"


def test_step_timeouts_fit_480_seconds():
    limits = [int(n) for n in re.findall(r"^step (\d+) ", SCRIPT.read_text(), flags=re.M)]
    assert len(limits) == 6 and sum(limits) <= 480


def test_dry_run_writes_every_steps_rows(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "exit" in r or "error" in r], rows
    steps = {r["step"] for r in rows}
    assert steps == {"device", "tests", "kernel_d64", "kernel_d128", "kernel_d256", "prefill"}
    (device,) = [r for r in rows if r["step"] == "device"]
    assert device["dry_run"] and device["versions"]["torch"]
    (tests,) = [r for r in rows if r["step"] == "tests"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"]  # no GPU: collected, all skipped
    for d in (64, 128, 256):
        kernel = [r for r in rows if r["step"] == f"kernel_d{d}"]
        impls = {(r["pattern"], r["impl"]) for r in kernel}
        assert impls == {("causal", "ours"), ("causal", "sdpa")} | {
            (p, i) for p in ("window", "random") for i in ("ours", "flex")
        }
        assert all(r["median_ms"] > 0 for r in kernel)
    prefill = [r for r in rows if r["step"] == "prefill"]
    assert [r["method"] for r in prefill] == ["sdpa", "streaming"]
    assert all(r["median_s"] > 0 and r["peak_mem_mb"] > 0 for r in prefill)
