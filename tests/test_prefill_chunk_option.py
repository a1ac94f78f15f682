"""The prefill-chunk option of ``sparse-llm bench``, ``eval niah`` and ``eval sweep`` on tiny random
models: prompts go through the KV cache in chunks, and densities cover the whole prompt (no timing
is asserted)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import random_ids, tiny_model

from sparse_llm.bench.prefill import bench_prefill
from sparse_llm.bench.runner import BenchConfig, markdown
from sparse_llm.cli import main
from sparse_llm.eval import niah, sweep

STREAMING = {"sink_tokens": 16, "local_tokens": 32, "block_size": 16}


@contextlib.contextmanager
def forward_lengths(model):
    """The query length of every forward of ``model`` inside the block."""
    lengths = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


def test_bench_prefill_in_chunks_runs_chunks_and_reports_the_whole_prompt_density():
    model = tiny_model("llama")
    ids = random_ids(1, 160, seed=3)
    whole = bench_prefill(model, ids, "streaming", STREAMING, repeats=1, warmup_tokens=16)
    with forward_lengths(model) as lengths:
        chunked = bench_prefill(
            model, ids, "streaming", STREAMING, repeats=2, warmup_tokens=16, prefill_chunk=48
        )
    # warm-up, then 2 timed prefills and the split run, each of 4 chunks
    assert lengths == [16] + [48, 48, 48, 16] * 3
    assert chunked.prefill_chunk == 48 and whole.prefill_chunk is None and whole.chunk_densities is None
    assert (
        len(chunked.chunk_densities) == 4 and chunked.chunk_densities[0] == 1.0
    )  # 48 keys: all in the window
    # chunks on the block grid select the whole prompt's blocks
    assert chunked.density == pytest.approx(whole.density) and 0 < whole.density < 1
    assert chunked.selection_s > 0 and len(chunked.times_s) == 2
    baseline = bench_prefill(model, ids, "sdpa", repeats=1, warmup_tokens=16, prefill_chunk=64)
    assert baseline.density is None and baseline.chunk_densities is None


def test_bench_cli_runs_each_prefill_chunk_beside_the_whole_prompt(tmp_path, capsys):
    tiny_model("gemma3").save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    args = ["bench", "--model", str(tmp_path / "model"), "--methods", "sdpa,streaming", "--lengths", "160"]
    args += ["--prefill-chunk", "0,48", "--repeats", "1", "--quiet", "--out", str(out)]
    args += ["--method-params", json.dumps({"streaming": STREAMING})]
    assert main(args) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["method"], r["prefill_chunk"]) for r in results} == {
        (m, c) for m in ("sdpa", "streaming") for c in (None, 48)
    }
    table = capsys.readouterr().out
    assert "| 160 | streaming | 48 |" in table and "| 160 | streaming | - |" in table
    # memory and speed are relative to the whole-prompt sdpa, so sdpa's own chunked row shows its ratio
    sdpa = {r["prefill_chunk"]: r for r in results if r["method"] == "sdpa"}
    ratio = sdpa[48]["peak_mem_mb"] / sdpa[None]["peak_mem_mb"] if sdpa[None]["peak_mem_mb"] > 0 else None
    row = next(line for line in markdown(results).splitlines() if line.startswith("| 160 | sdpa | 48 |"))
    assert row.endswith(f"| {ratio:.2f} |" if ratio is not None else "| - |")


def test_bench_prefill_chunk_must_be_a_non_negative_int(capsys):
    with pytest.raises(ValueError, match="prefill chunks must be ints >= 0"):
        BenchConfig(prefill_chunks=(-1,))
    assert BenchConfig(prefill_chunks=(0, 512, 0)).prefill_chunks == (0, 512)
    assert main(["bench", "--prefill-chunk=-1", "--methods", "sdpa"]) == 2
    assert "prefill chunks must be ints >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--prefill-chunk", "x"])
    assert exit_.value.code == 2 and "--prefill-chunk" in capsys.readouterr().err


def needle_task(**overrides) -> niah.NiahConfig:
    kwargs = dict(
        model="tiny",
        methods=("sdpa", "streaming"),
        method_params={"streaming": {"sink_tokens": 64, "local_tokens": 64}},
        lengths=(256,),
        depths=(0.5,),
        haystack="repeat",
        max_new_tokens=2,
    )
    return niah.NiahConfig(**{**kwargs, **overrides})


def test_niah_prefills_in_chunks_with_the_whole_prompt_density(tiny, monkeypatch, tmp_path):
    model, tokenizer = tiny
    monkeypatch.setattr(niah, "load_any", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(niah, "max_positions", lambda name: model.config.max_position_embeddings)
    whole = niah.run_niah(needle_task(), out=tmp_path / "whole", progress=False)
    with forward_lengths(model) as lengths:
        chunked = niah.run_niah(needle_task(prefill_chunk=64), out=tmp_path / "chunked", progress=False)
    # after the warm-up forward: per method 4 chunks of the prompt, then one decode step
    assert lengths[1:] == [64, 64, 64, 64, 1] * 2
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["prefill_chunk"] == 64
    assert "prefill_chunk" not in json.loads((tmp_path / "whole" / "config.json").read_text())
    density = {r["scores"]["methods"]["streaming"]["density"] for r in (whole, chunked)}
    assert len(density) == 1 and 0 < density.pop() < 1  # chunks of whole blocks: the same selection
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        needle_task(prefill_chunk=0)


def test_sweep_prefills_every_point_in_chunks(tiny, monkeypatch, tmp_path, capsys):
    model, tokenizer = tiny
    monkeypatch.setattr(niah, "load_any", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(niah, "max_positions", lambda name: model.config.max_position_embeddings)
    config = sweep.SweepConfig(
        niah=needle_task(methods=("sdpa",), method_params={}, prefill_chunk=100, max_new_tokens=1),
        methods=("sdpa", "streaming"),
        method_params={"streaming": {"sink_tokens": 64, "local_tokens": 64}},
        budgets=(),
    )
    with forward_lengths(model) as lengths:
        result = sweep.run_sweep(config, out=tmp_path / "run", progress=False)
    assert lengths[1:] == [100, 100, 56] * 2  # per point: the prompt in chunks (one answer token: no decode)
    assert result["config"]["prefill_chunk"] == 100
    # The CLI option reaches the config.
    parser_args = ["eval", "sweep", "--prefill-chunk", "0", "--lengths", "256"]
    assert main(parser_args) == 2 and "prefill_chunk must be a positive int" in capsys.readouterr().err


def test_prefill_chunk_changes_nothing_for_a_whole_prompt(tiny):
    model, _ = tiny
    ids = random_ids(1, 120, seed=5)
    with torch.no_grad():
        expected = model(ids, logits_to_keep=1).logits
    from sparse_llm import prefill

    assert torch.equal(prefill(model, ids).logits, expected)
    assert torch.equal(prefill(model, ids, 500).logits, expected)
