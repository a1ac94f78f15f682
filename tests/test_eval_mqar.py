"""MQAR: the generator's properties, the tiny-model and LLM runners (tiny models, no files read), the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS
from tiny_tokenizer import train_tokenizer
from transformers import AutoModelForCausalLM

import sparse_llm.models
from sparse_llm import cli
from sparse_llm.eval import mqar
from sparse_llm.eval.mqar import MQARConfig, method_cells, run_mqar
from sparse_llm.eval.mqar_data import FILLER, INTRO, build_llm_prompts, gap_probabilities, make_mqar
from sparse_llm.eval.mqar_train import TinyTrainConfig, train_tiny

SETTINGS = [
    pytest.param(64, 4, id="T64-N4"),
    pytest.param(128, 8, id="T128-N8"),
    pytest.param(256, 16, id="T256-N16"),
    pytest.param(66, 16, id="T66-N16-tight"),
    pytest.param(1024, 64, id="T1024-N64"),
]


def _query_positions(labels: torch.Tensor) -> list[list[int]]:
    return [(row != -100).nonzero().flatten().tolist() for row in labels]


@pytest.mark.parametrize("t, n", SETTINGS)
def test_make_mqar_layout_ranges_and_labels(t, n):
    v = 512
    inputs, labels = make_mqar(64, t, n, vocab_size=v, seed=3)
    assert inputs.shape == labels.shape == (64, t) and inputs.dtype == labels.dtype == torch.long
    keys, values = inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2]
    assert keys.min() >= 1 and keys.max() < v // 2
    assert values.min() >= v // 2 and values.max() < v
    assert inputs.min() >= 0 and inputs.max() < v
    for b, positions in enumerate(_query_positions(labels)):
        assert len(set(keys[b].tolist())) == n and len(set(values[b].tolist())) == n
        assert len(positions) == n
        queried = inputs[b, positions].tolist()
        assert sorted(queried) == sorted(keys[b].tolist())  # every key queried exactly once
        pair = dict(zip(keys[b].tolist(), values[b].tolist(), strict=True))
        assert labels[b, positions].tolist() == [pair[k] for k in queried]
        assert all(p >= 2 * n and (p - 2 * n) % 2 == 0 for p in positions)  # after the pairs, even slots


def test_make_mqar_noise_fills_only_the_free_positions():
    quiet, quiet_labels = make_mqar(32, 128, 8, vocab_size=256, seed=1, noise=False)
    noisy, noisy_labels = make_mqar(32, 128, 8, vocab_size=256, seed=1, noise=True)
    assert torch.equal(quiet_labels, noisy_labels)
    structural = torch.zeros_like(quiet, dtype=torch.bool)
    structural[:, :16] = True
    structural |= quiet_labels != -100
    assert torch.equal(quiet[structural], noisy[structural])
    assert (quiet[~structural] == 0).all()
    free = noisy[~structural]
    assert free.float().std() > 30 and (free > 0).float().mean() > 0.9  # uniform over [0, 256)


def test_make_mqar_is_reproducible_by_seed():
    a = make_mqar(16, 256, 16, seed=7)
    b = make_mqar(16, 256, 16, seed=7)
    c = make_mqar(16, 256, 16, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_query_gaps_follow_the_power_law():
    t, n = 64, 4
    space = (t - 2 * n) // 2
    inputs, labels = make_mqar(20000, t, n, vocab_size=64, power_a=0.01, seed=0, noise=False)
    # The gap of the first key is the first draw, so its law is exactly gap_probabilities.
    first = (inputs[:, 2 * n :] == inputs[:, :1]).float().argmax(1) // 2  # noise=False: one match
    observed = torch.bincount(first, minlength=space).double() / len(first)
    expected = gap_probabilities(space, 0.01)
    assert (observed - expected).abs().sum() / 2 < 0.02  # total variation
    assert expected[0] > 10 * expected[-1]  # short gaps strongly favoured
    # All queries: short gaps dominate under a=0.01, but not under the uniform law (a=1).
    gaps = torch.tensor([p for row in _query_positions(labels) for p in row]) - 2 * n
    _, uniform_labels = make_mqar(20000, t, n, vocab_size=64, power_a=1.0, seed=0)
    uniform = torch.tensor([p for row in _query_positions(uniform_labels) for p in row]) - 2 * n
    assert gaps.float().mean() < 0.75 * uniform.float().mean()
    assert abs(uniform.float().mean().item() / 2 - (space - 1) / 2) < 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(seq_len=60, num_pairs=16), "T >= 4N", id="too-many-pairs"),
        pytest.param(dict(num_pairs=16, vocab_size=32), "key tokens", id="vocab-too-small"),
        pytest.param(dict(num_pairs=0), "num_pairs", id="no-pairs"),
        pytest.param(dict(power_a=0.0), "power_a", id="power-a-zero"),
        pytest.param(dict(num_examples=True), "num_examples", id="bool-count"),
    ],
)
def test_make_mqar_rejects_bad_arguments(kwargs, match):
    args = dict(num_examples=2, seq_len=256, num_pairs=4) | kwargs
    with pytest.raises(ValueError, match=match):
        make_mqar(**args)


def test_method_cells_sweep_budgets_and_share_parameters():
    shared = {"block_size": 16, "sink_tokens": 16, "local_tokens": 16}
    cells = method_cells(("sdpa", "dense", "streaming", "block_topk"), {}, (64, 128), shared)
    got = [(spec.name, budget, spec.params) for spec, budget in cells]
    assert got == [
        ("sdpa", None, {}),
        ("dense", None, {"block_size": 16}),
        ("streaming", 64, {"block_size": 16, "sink_tokens": 16, "local_tokens": 48}),
        ("streaming", 128, {"block_size": 16, "sink_tokens": 16, "local_tokens": 112}),
        ("block_topk", 64, {"block_size": 16, "sink_tokens": 16, "local_tokens": 16, "budget": 64}),
        ("block_topk", 128, {"block_size": 16, "sink_tokens": 16, "local_tokens": 16, "budget": 128}),
    ]
    # A method's own parameters win over the shared ones and the sweep.
    ((spec, budget),) = method_cells(("block_topk",), {"block_topk": {"budget": 96}}, (64,), shared)
    assert budget is None and spec.params["budget"] == 96
    with pytest.raises(ValueError, match="block_topk"):
        method_cells(("blok_topk",), {}, (64,), shared)
    with pytest.raises(ValueError, match="sink_tokens"):
        method_cells(("block_topk",), {}, (16,), shared)


# ------------------------------------------------------------------------------ tiny trained model


def _tiny_train(**overrides) -> TinyTrainConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        stages=((20, ((32, 4),)),),
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        log_every=5,
        eval_every=10,
        eval_setting=(32, 4),
        eval_examples=16,
        max_position_embeddings=128,
    )
    return TinyTrainConfig(**(base | overrides))


def test_training_decreases_the_loss():
    model, history = train_tiny(_tiny_train())
    assert history["steps"] == 20 and [step for step, _ in history["loss"]] == [5, 10, 15, 20]
    assert [step for step, _, _ in history["accuracy"]] == [10, 20]
    assert all(0 <= acc <= 1 for _, _, acc in history["accuracy"]) and history["cpu_s"] > 0
    # Chance level is ln(32) over the 32 values once the model has learnt which tokens are values.
    assert history["first_loss"] > history["last_loss"] + 0.3
    assert not model.training


def _tiny_config(**overrides) -> MQARConfig:
    base = dict(
        mode="tiny",
        train=_tiny_train(stages=((6, ((64, 4),)),)),
        methods=("sdpa", "dense", "streaming", "block_topk"),
        budgets=(32, 48),
        settings=((64, 4),),
        num_examples=20,
    )
    return MQARConfig(**(base | overrides))


def test_tiny_run_writes_one_row_per_method_and_budget_and_reuses_its_model(tmp_path, monkeypatch):
    result = run_mqar(_tiny_config(), out=tmp_path / "run")
    rows = result["scores"]["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("sdpa", None),
        ("dense", None),
        ("streaming", 32),
        ("streaming", 48),
        ("block_topk", 32),
        ("block_topk", 48),
    ]
    for r in rows:
        assert r["queries"] == 20 * 4 and 0 <= r["accuracy"] <= 1 and (r["T"], r["N"]) == (64, 4)
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # dense is exact: the sdpa answers
    assert rows[1]["density"] == pytest.approx(1.0) and rows[2]["density"] < 1.0
    assert result["scores"]["train"]["steps"] == 6
    folder = tmp_path / "run"
    stored = json.loads((folder / "results.json").read_text())
    assert stored["scores"]["rows"] == rows and stored["config"]["task"] == "mqar"
    assert len((folder / "samples.jsonl").read_text().splitlines()) == 6 * 20
    assert (folder / "mqar.png").stat().st_size > 1000
    assert (folder / "model" / "config.json").is_file()

    # A later evaluation loads the saved model: same sequences, same scores, no training.
    monkeypatch.setattr("sparse_llm.eval.mqar_train.train_tiny", _fail)
    again = run_mqar(_tiny_config(checkpoint=str(folder / "model")), out=tmp_path / "again")
    assert [r["accuracy"] for r in again["scores"]["rows"]] == [r["accuracy"] for r in rows]

    # Resuming the first folder recomputes nothing.
    monkeypatch.setattr("sparse_llm.eval.mqar_train.mqar_accuracy", _fail)
    resumed = run_mqar(_tiny_config(), out=folder, resume=True)
    assert resumed["scores"]["rows"] == rows


def _fail(*args, **kwargs):
    raise AssertionError("should not be called")


# ----------------------------------------------------------------------------------- LLM mode


@pytest.fixture
def tiny_llm(monkeypatch):
    numbers = " ".join(f"{i}: {i + 50}\n" for i in range(100))
    tokenizer = train_tokenizer([INTRO, FILLER * 3, numbers])
    config = CONFIGS["llama"]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    loads = []

    def load_any(name, device="cpu", dtype=torch.float32):
        loads.append(name)
        return model, tokenizer

    monkeypatch.setattr(sparse_llm.models, "load_any", load_any)
    monkeypatch.setattr(sparse_llm.models, "max_positions", lambda name: model.config.max_position_embeddings)
    return tokenizer, loads


def test_llm_prompts_are_t_tokens_and_end_with_the_query(tiny_llm):
    tokenizer, _ = tiny_llm
    prompts = build_llm_prompts(tokenizer, 96, 4, num_examples=3, vocab_size=64, seed=1)
    assert len(prompts) == 12 and [(p.example, p.query) for p in prompts[:5]] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
    ]
    for p in prompts:
        assert p.input_ids.shape == (1, 96)
        text = tokenizer.decode(p.input_ids[0], skip_special_tokens=True)
        assert text.startswith(INTRO) and text.endswith(f"\n{p.key}:")
        assert f"{p.key}: {p.value}\n" in text and 1 <= p.key < 32 <= p.value < 64
    assert len({p.key for p in prompts[:4]}) == 4
    with pytest.raises(ValueError, match="does not fit"):
        build_llm_prompts(tokenizer, 16, 4, num_examples=1, vocab_size=64)


def _llm_config(**overrides) -> MQARConfig:
    base = dict(
        model="tiny",
        methods=("sdpa", "dense"),
        settings=((96, 4),),
        num_examples=2,
        vocab_size=64,
        max_new_tokens=3,
    )
    return MQARConfig(**(base | overrides))


def test_llm_run_records_every_query_and_resumes(tiny_llm, tmp_path, monkeypatch):
    folder = tmp_path / "llm"
    result = run_mqar(_llm_config(), out=folder)
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 4
    by_method = {m: [r for r in records if r["method"] == m] for m in ("sdpa", "dense")}
    assert [r["answer"] for r in by_method["sdpa"]] == [r["answer"] for r in by_method["dense"]]
    rows = result["scores"]["rows"]
    assert [(r["method"], r["queries"]) for r in rows] == [("sdpa", 8), ("dense", 8)]
    assert rows[0]["correct"] == sum(r["correct"] for r in by_method["sdpa"])

    # Interrupted after 10 records: the rerun answers only the 6 missing queries.
    lines = (folder / "samples.jsonl").read_text().splitlines()
    (folder / "samples.jsonl").write_text("\n".join(lines[:10]) + "\n")
    calls = []
    real = mqar.greedy_generate
    monkeypatch.setattr(mqar, "greedy_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_mqar(_llm_config(), out=folder, resume=True)
    assert len(calls) == 6 and resumed["scores"]["rows"] == rows
    run_mqar(_llm_config(), out=folder, resume=True)
    assert len(calls) == 6


@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param(dict(settings=((2048, 4),)), "context", id="T-above-context"),
        pytest.param(dict(settings=((16, 4),)), "does not fit", id="prompt-too-long"),
    ],
)
def test_llm_run_rejects_settings_before_writing(tiny_llm, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_mqar(_llm_config(**overrides), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llm_run_checks_the_context_before_loading_the_model(tiny_llm, tmp_path):
    _, loads = tiny_llm
    with pytest.raises(ValueError, match=r"lengths \[2048\] do not fit the model's context"):
        run_mqar(_llm_config(settings=((2048, 4),)), out=tmp_path / "out")
    assert loads == []


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--methods", "dense,nope"], "unknown method", id="unknown-method"),
        pytest.param(["--settings", "64x32"], "does not fit", id="T-N-does-not-fit"),
        pytest.param(["--settings", "64-4"], "TxN", id="bad-setting-syntax"),
        pytest.param(["--train-tiny", "--settings", "4096x16"], "context", id="T-above-tiny-context"),
        pytest.param(["--checkpoint", "missing-folder"], "no tiny model", id="missing-checkpoint"),
        pytest.param(["--train-tiny", "--budgets", "16"], "sink_tokens", id="budget-below-window"),
    ],
)
def test_cli_exits_2_on_bad_input_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        code = cli.main(["eval", "mqar", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_train_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "eval",
        "mqar",
        "--train-tiny",
        "--out",
        str(out),
        "--quiet",
        "--settings",
        "32x4",
        "--train-stages",
        "2:16x2/1:32x4",
        "--batch-size",
        "4",
        "--num-examples",
        "4",
        "--vocab-size",
        "64",
        "--methods",
        "dense,streaming",
        "--budgets",
        "32",
    ]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "| dense | - |" in table and "| streaming | 32 |" in table
    result = json.loads((out / "results.json").read_text())
    assert len(result["scores"]["rows"]) == 2 and result["scores"]["train"]["steps"] == 3
    assert result["config"]["train"]["vocab_size"] == 64
    assert result["config"]["train"]["stages"] == [[2, [[16, 2]]], [1, [[32, 4]]]]
