"""``sparse-llm bench``: prefill latency and peak memory per (method, length), each in a fresh process.

A fresh subprocess per configuration keeps one run's allocations out of the next one's memory peak
(CPU peaks are resident-set sizes, which only a new process resets). With ``rounds`` > 1 the whole
list of configurations runs that many times in turn and each configuration's times are pooled, so
a machine whose speed drifts over the minutes of a run (shared or throttled machines do) shifts
every method alike instead of whichever ran during the slow spell.
Results are one JSON report with the machine and versions, and a markdown table with speedups over
``sdpa`` and the Amdahl bound ``sdpa / floor``.

``prefill_chunks`` adds chunked prefill (:func:`sparse_llm.prefill`) as a third axis beside methods
and lengths: each entry is tokens per forward through the KV cache, 0 for the whole prompt in one
forward, and every (length, method, chunk) is its own configuration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sparse_llm.backends import get_method
from sparse_llm.bench.prefill import FLOOR, HF_BASELINES, bench_prefill
from sparse_llm.models import check_fits_context, load_any, max_positions
from sparse_llm.names import DTYPES
from sparse_llm.results import atomic_write_json, run_metadata


@dataclass
class BenchConfig:
    model: str = "gemma3-270m"
    methods: tuple[str, ...] = ("sdpa", "floor", "dense", "streaming", "block_topk")
    lengths: tuple[int, ...] = (1024, 4096, 8192)
    repeats: int = 3
    rounds: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    method_params: dict[str, dict] = field(default_factory=dict)
    prefill_chunks: tuple[int, ...] = (0,)  # tokens per forward; 0 = the whole prompt at once

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.repeats < 1 or self.rounds < 1 or any(n < 1 for n in self.lengths):
            raise ValueError("repeats, rounds and lengths must be positive")
        bad = [n for n in self.prefill_chunks if isinstance(n, bool) or not isinstance(n, int) or n < 0]
        if bad or not self.prefill_chunks:
            raise ValueError(
                "prefill chunks must be ints >= 0 (tokens per forward, 0 = the whole prompt), "
                f"got {self.prefill_chunks!r}"
            )
        self.prefill_chunks = tuple(dict.fromkeys(self.prefill_chunks))
        # Before any process starts: an unknown model or a length past its context fails here, not
        # in each subprocess (the model's config is read, its weights are not).
        check_fits_context(self.lengths, max_positions(self.model))
        for method in self.methods:
            if method not in (*HF_BASELINES, FLOOR):
                get_method(method, **self.params(method))  # unknown names fail here

    def params(self, method: str) -> dict:
        """The method's own bench defaults (its ``bench_params``) updated by ``method_params``."""
        return {**get_method(method).bench_params, **self.method_params.get(method, {})}


def prompt_ids(tokenizer, vocab_size: int, length: int) -> torch.Tensor:
    """``[1, length]`` ids of real text (the offline essays, repeated as needed), or seeded random ids."""
    if tokenizer is None:
        return torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    from sparse_llm.texts import load_haystack_text

    ids = tokenizer(load_haystack_text(), return_tensors="pt").input_ids
    return ids.repeat(1, -(-length // ids.shape[1]))[:, :length]


def _child(config: BenchConfig, method: str, length: int, chunk: int, split: bool) -> dict:
    model, tokenizer = load_any(config.model, config.device, DTYPES[config.dtype])
    ids = prompt_ids(tokenizer, model.config.vocab_size, length).to(config.device)
    params = {} if method in (*HF_BASELINES, FLOOR) else config.params(method)
    return bench_prefill(
        model, ids, method, params, repeats=config.repeats, split=split, prefill_chunk=chunk or None
    ).to_dict()


def _pool(first: dict, later: dict) -> None:
    """Add a later round's times to the first round's record (whose split is kept); peak = the max."""
    first["times_s"] += later["times_s"]
    first["median_s"] = statistics.median(first["times_s"])
    first["peak_mem_mb"] = max(first["peak_mem_mb"], later["peak_mem_mb"])


def run_bench(
    config: BenchConfig, out: str | os.PathLike | None = None, progress: bool | None = None
) -> dict:
    """Run every (length, method) in a fresh subprocess, ``rounds`` times in turn (see the module
    docstring); write the report to ``out`` (JSON) if given."""
    cells = [
        (length, method, chunk)
        for length in config.lengths
        for chunk in config.prefill_chunks
        for method in config.methods
    ]
    runs = [(r, *cell) for r in range(config.rounds) for cell in cells]
    show = sys.stderr.isatty() if progress is None else progress
    results: dict[tuple[int, str, int], dict] = {}
    for r, length, method, chunk in tqdm(runs, desc="bench", unit="config", disable=not show):
        cmd = [
            sys.executable,
            "-m",
            "sparse_llm.bench.runner",
            json.dumps(asdict(config)),
            method,
            str(length),
            str(chunk),
            str(int(r == 0)),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            what = f"{method} at {length} tokens" + (f" in chunks of {chunk}" if chunk else "")
            raise RuntimeError(f"bench of {what} failed:\n{proc.stderr[-3000:]}")
        record = json.loads(line[len("RESULT ") :])
        if r == 0:
            results[length, method, chunk] = record
        else:
            _pool(results[length, method, chunk], record)
    results = list(results.values())
    report = {"config": asdict(config), **run_metadata(config.device), "results": results}
    if out is not None:
        atomic_write_json(out, report)  # an interrupted run never leaves half a report
    return report


def markdown(results: list[dict]) -> str:
    """A table with the speedup over ``sdpa`` and the peak memory relative to it, per length.

    The reference is ``sdpa`` on the whole prompt (one forward) at that length when the report has
    it, else ``sdpa`` with the same prefill chunk. The chunk column is "-" for a whole prompt."""
    by = {(r["length"], r["method"], r.get("prefill_chunk")): r for r in results}
    lines = [
        "| length | method | chunk | density | prefill s (median) | speedup vs sdpa | peak act. MiB "
        "| mem vs sdpa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (length, method, chunk), r in by.items():
        sdpa = by.get((length, "sdpa", None)) or by.get((length, "sdpa", chunk))
        speed = f"{sdpa['median_s'] / r['median_s']:.2f}x" if sdpa else "-"
        mem = f"{r['peak_mem_mb'] / sdpa['peak_mem_mb']:.2f}" if sdpa and sdpa["peak_mem_mb"] > 0 else "-"
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        label = "floor (attention = 0)" if method == FLOOR else method
        cells = (
            length,
            label,
            chunk or "-",
            density,
            f"{r['median_s']:.2f}",
            speed,
            f"{r['peak_mem_mb']:.0f}",
            mem,
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the per-configuration subprocess of run_bench
    _config = BenchConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()}
    )
    _result = _child(_config, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), split=sys.argv[5] == "1")
    print("RESULT " + json.dumps(_result), flush=True)
