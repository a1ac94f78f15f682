"""``sparse-llm eval mqar``: multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

An MQAR sequence lists ``N`` key-value pairs, then queries every key again later; recall is scored
at each query. The data (Zoology's ``multiquery_ar`` layout and its text form) come from
:mod:`sparse_llm.eval.mqar_data`; this module holds the config, the runners, the plot and the CLI.
Two modes score methods:

* ``mode="llm"`` (default): a pretrained LM reads the pairs as text and is asked for one value per
  prompt (:func:`~sparse_llm.eval.mqar_data.build_llm_prompts`); greedy answers, one record per
  query and method.
* ``mode="tiny"`` (``--train-tiny``): a 2-layer Llama trained on MQAR on the spot, or loaded from
  ``--checkpoint`` (:mod:`sparse_llm.eval.mqar_train`); every method is plugged in at inference and
  scored at every query of ``num_examples`` sequences per ``(T, N)``; one record per sequence.

Methods with a ``budget`` parameter are swept over ``budgets`` (methods with only a local window
get ``local_tokens = budget - sink_tokens``, so they attend the same number of tokens); the shared
``block_size``/``sink_tokens``/``local_tokens`` go to every method that takes them, unless
``method_params`` says otherwise. ``results.json`` holds one row per (method, budget, T, N) and
``mqar.png`` plots them (:func:`sparse_llm.eval.plots.plot_mqar`).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm

import sparse_llm
from sparse_llm.eval.common import (
    BASELINE,
    DTYPES,
    MethodSpec,
    add_common_arguments,
    applied,
    comma_list,
    default_out,
    greedy_generate,
    show_progress,
)
from sparse_llm.eval.mqar_data import EVAL_SEED, _check_int, build_llm_prompts, first_number, make_mqar
from sparse_llm.eval.mqar_train import TinyTrainConfig
from sparse_llm.eval.plots import plot_mqar
from sparse_llm.results import RESULTS_FILE, ResultsStore, atomic_write_json

logger = logging.getLogger(__name__)

MODES = ("llm", "tiny")
LLM_SETTINGS = ((64, 4), (128, 8), (256, 16))
TINY_SETTINGS = ((256, 16), (512, 32))
SHARED_PARAMS = ("block_size", "sink_tokens", "local_tokens")
MODEL_DIR = "model"
TRAIN_FILE = "train.json"


# -------------------------------------------------------------------------------------- config


@dataclass
class MQARConfig:
    """An MQAR run.

    Args:
        mode: ``"llm"`` (a pretrained LM on text prompts) or ``"tiny"`` (a tiny trained model).
        model: embedded model name or HF path (llm mode; default ``gemma3-270m``).
        checkpoint: a tiny model saved by an earlier run (``<out>/model``); tiny mode trains one if None.
        train: the tiny model and its training (tiny mode without a checkpoint).
        device, dtype: where and in which precision the model runs (training is always float32).
        methods: registered methods; ``"sdpa"`` is the unpatched model.
        method_params: per-method parameters; they override the shared ones and the budget sweep.
        budgets: tokens per query block for the methods with a ``budget`` (or only a local window).
        block_size, sink_tokens, local_tokens: given to every method that has the parameter.
        settings: ``(T, N)`` pairs; default (64,4),(128,8),(256,16) for llm, (256,16),(512,32) tiny.
        num_examples: sequences per setting (default 8 for llm, i.e. 8N prompts, 256 for tiny).
        vocab_size: llm mode: the number range of keys and values (the tiny model's is ``train``'s).
        power_a: Zoology's gap law (tiny mode; llm prompts put every query at the end).
        seed: seed of the evaluation sequences.
        max_new_tokens: greedy tokens per llm answer.
    """

    mode: str = "llm"
    model: str | None = None
    checkpoint: str | None = None
    train: TinyTrainConfig = field(default_factory=TinyTrainConfig)
    device: str = "cpu"
    dtype: str = "float32"
    methods: tuple[str, ...] = ("sdpa", "dense", "streaming", "block_topk", "dma", "routing", "dhsa")
    method_params: dict[str, dict] = field(default_factory=dict)
    budgets: tuple[int, ...] = (64, 128, 256)
    block_size: int = 16
    sink_tokens: int = 16
    local_tokens: int = 16
    settings: tuple[tuple[int, int], ...] | None = None
    num_examples: int | None = None
    vocab_size: int = 8192
    power_a: float = 0.01
    seed: int = 0
    max_new_tokens: int = 6

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.train, dict):
            self.train = TinyTrainConfig(**self.train)
        if self.mode == "llm":
            self.model = self.model or "gemma3-270m"
            if self.checkpoint is not None:
                raise ValueError("checkpoint is a tiny-model option (--train-tiny); use --model for an LLM")
        elif self.model is not None:
            raise ValueError("tiny mode trains or loads its own model: give checkpoint, not model")
        self.settings = tuple(
            (t, n) for t, n in (self.settings or (LLM_SETTINGS if self.mode == "llm" else TINY_SETTINGS))
        )
        if self.num_examples is None:
            self.num_examples = 8 if self.mode == "llm" else 256
        for name in ("num_examples", "max_new_tokens", "vocab_size", "seed"):
            _check_int(name, getattr(self, name), 0 if name == "seed" else 1)
        self.methods, self.budgets = tuple(self.methods), tuple(self.budgets)
        for b in self.budgets:
            _check_int("budgets", b, 1)
        vocab = self.train.vocab_size if self.mode == "tiny" else self.vocab_size
        for t, n in self.settings:  # (T, N) and the vocabulary (a checkpoint's: when it is loaded)
            make_mqar(1, t, n, vocab if self.checkpoint is None else 2 * n + 2, self.power_a)
        self.cells()  # unknown methods and bad parameters fail here

    def cells(self) -> list[tuple[MethodSpec, int | None]]:
        """The compared configurations: ``(spec, budget)``; budget None for unswept methods."""
        return method_cells(
            self.methods, self.method_params, self.budgets, {k: getattr(self, k) for k in SHARED_PARAMS}
        )


def method_cells(methods, method_params: dict, budgets, shared: dict) -> list[tuple[MethodSpec, int | None]]:
    """Expand methods into specs: shared parameters where a method has them, the budget sweep, overrides.

    Raises ``ValueError`` for unknown methods, parameters for methods not run, or bad parameters
    (e.g. a budget below ``sink_tokens + local_tokens``).
    """
    names = list(dict.fromkeys(methods))
    if not names:
        raise ValueError("no method given; use e.g. --methods sdpa,dense,dhsa")
    unknown = set(method_params or {}) - set(names)
    if unknown:
        raise ValueError(f"method parameters given for methods not run: {sorted(unknown)}; methods: {names}")
    cells = []
    for name in names:
        user = dict((method_params or {}).get(name, {}))
        if name == BASELINE:
            if user:
                raise ValueError("the sdpa baseline takes no parameters")
            cells.append((MethodSpec(name), None))
            continue
        has = {f.name for f in fields(sparse_llm.get_method(name))}  # unknown names fail here
        if set(user) - has:
            raise ValueError(
                f"method {name!r} got unknown parameters {sorted(set(user) - has)}; it accepts {sorted(has)}"
            )
        base = {k: v for k, v in shared.items() if k in has and k not in user} | user
        if budgets and "budget" in has and "budget" not in user:
            sweep = [(b, {**base, "budget": b}) for b in budgets]
        elif budgets and "budget" not in has and "local_tokens" in has and "local_tokens" not in user:
            sink = base.get("sink_tokens", 0)
            if min(budgets) <= sink:
                raise ValueError(
                    f"budgets {budgets} must exceed sink_tokens={sink} for {name}'s local window"
                )
            sweep = [(b, {**base, "local_tokens": b - sink}) for b in budgets]
        else:
            sweep = [(None, base)]
        for budget, params in sweep:
            try:
                sparse_llm.get_method(name, **params)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} with {params}: {err}") from None
            cells.append((MethodSpec(name, params), budget))
    return cells


# ---------------------------------------------------------------------------------------- runs


def _row(spec: MethodSpec, budget, t: int, n: int, records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    total = sum(r["queries"] for r in records)
    densities = [r["density"] for r in records if r.get("density") is not None]
    return {
        "method": spec.name,
        "label": spec.label,
        "params": spec.params,
        "budget": budget,
        "T": t,
        "N": n,
        "accuracy": correct / total if total else None,
        "correct": correct,
        "queries": total,
        "density": sum(densities) / len(densities) if densities else None,
    }


def _sample_id(spec: MethodSpec, t: int, n: int, suffix) -> str:
    return f"{spec.label}|T{t}-N{n}|{suffix}"


def _record(spec: MethodSpec, budget, t: int, n: int, suffix, **values) -> dict:
    """A sample record: id, method, budget, setting, then ``values``."""
    head = {"method": spec.name, "label": spec.label, "budget": budget, "T": t, "N": n}
    return {"id": _sample_id(spec, t, n, suffix), **head, **values}


def _run_llm(config: MQARConfig, store_args: dict, progress: bool) -> tuple[ResultsStore, list[dict], None]:
    from sparse_llm.models import check_fits_context, load_any, max_positions

    lengths = [t for t, _ in config.settings]  # checked before minutes of loading
    check_fits_context(lengths, max_positions(config.model), answer_tokens=config.max_new_tokens)
    model, tokenizer = load_any(config.model, device=config.device, dtype=DTYPES[config.dtype])
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer: llm mode needs one")
    prompts = {
        s: build_llm_prompts(tokenizer, *s, config.num_examples, config.vocab_size, EVAL_SEED + config.seed)
        for s in config.settings
    }
    store = ResultsStore(**store_args)
    cells = config.cells()
    bar = tqdm(total=len(cells) * sum(map(len, prompts.values())), desc="mqar", disable=not progress)
    for spec, budget in cells:
        with applied(model, spec):
            for (t, n), items in prompts.items():
                for p in items:
                    bar.update()
                    sid = _sample_id(spec, t, n, f"{p.example}-{p.query}")
                    if store.done(sid):
                        continue
                    ids = greedy_generate(
                        model,
                        p.input_ids.to(config.device),
                        config.max_new_tokens,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                    text = tokenizer.decode(ids[0], skip_special_tokens=True)
                    correct = int(first_number(text) == str(p.value))
                    store.add(
                        _record(
                            spec,
                            budget,
                            t,
                            n,
                            f"{p.example}-{p.query}",
                            example=p.example,
                            query=p.query,
                            key=p.key,
                            value=p.value,
                            answer=text,
                            correct=correct,
                            queries=1,
                        )
                    )
    bar.close()
    return store, cells, None


def _run_tiny(config: MQARConfig, store_args: dict, out: Path, progress: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_llm.eval.mqar_train import mqar_accuracy, train_tiny

    saved = Path(config.checkpoint) if config.checkpoint else out / MODEL_DIR
    if config.checkpoint and not (saved / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny model in {saved} (expected a save_pretrained folder: <out>/{MODEL_DIR})"
        )
    reuse = (saved / "config.json").is_file() and (config.checkpoint or store_args["resume"])
    if not reuse and saved.exists():
        raise FileExistsError(
            f"{saved} already holds a model; pass --resume to reuse it or choose another --out"
        )
    model_config = AutoConfig.from_pretrained(saved) if reuse else None
    limit = model_config.max_position_embeddings if reuse else config.train.max_position_embeddings
    vocab = model_config.vocab_size if reuse else config.train.vocab_size
    too_long = [t for t, _ in config.settings if t > limit]
    if too_long:
        raise ValueError(f"T={too_long} exceed the tiny model's context of {limit} positions")
    for t, n in config.settings:
        make_mqar(1, t, n, vocab, config.power_a)
    store = ResultsStore(**store_args)
    history = None
    if reuse:
        model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="sdpa").eval()
    else:
        model, history = train_tiny(config.train, progress=progress)
        tmp = out / f".{MODEL_DIR}.tmp"
        model.save_pretrained(tmp)
        tmp.replace(saved)  # complete or absent, never half-written
        atomic_write_json(out / TRAIN_FILE, history)
    model.to(config.device)
    if history is None and (out / TRAIN_FILE).is_file():
        history = json.loads((out / TRAIN_FILE).read_text())
    cells = config.cells()
    bar = tqdm(
        total=len(cells) * len(config.settings) * config.num_examples, desc="mqar", disable=not progress
    )
    batch = 64
    chunks = [range(i, min(i + batch, config.num_examples)) for i in range(0, config.num_examples, batch)]
    for i, (t, n) in enumerate(config.settings):
        inputs, labels = make_mqar(
            config.num_examples, t, n, vocab, config.power_a, seed=EVAL_SEED + 1024 * config.seed + i
        )
        for spec, budget in cells:
            todo = [rows for rows in chunks if not all(store.done(_sample_id(spec, t, n, e)) for e in rows)]
            bar.update(config.num_examples - sum(map(len, todo)))
            if not todo:
                continue
            with applied(model, spec):
                for rows in todo:
                    x, y = inputs[rows.start : rows.stop], labels[rows.start : rows.stop]
                    correct = mqar_accuracy(model, x.to(config.device), y.to(config.device))
                    density = sparse_llm.attention_stats(model)["density"] if spec.name != BASELINE else None
                    for e, ok in zip(rows, correct.sum(1).tolist(), strict=True):
                        store.add(
                            _record(spec, budget, t, n, e, example=e, correct=ok, queries=n, density=density)
                        )
                    bar.update(len(rows))
    bar.close()
    return store, cells, history


def run_mqar(
    config: MQARConfig, out: str | Path | None = None, resume: bool = False, progress: bool = False
) -> dict:
    """Run MQAR for ``config``; returns the ``results.json`` content (plus ``"out"``, the folder).

    ``scores["rows"]``: one row per (method, budget, T, N) with ``accuracy`` (correct queries /
    queries), ``density`` (mean over batches, None for ``sdpa``) and the method's parameters; tiny
    mode adds ``scores["train"]``, the training history. Bad arguments raise ``ValueError`` (or
    ``FileNotFoundError`` for a missing checkpoint) before anything is written.
    """
    run_config = {"task": "mqar", **asdict(config)}
    if config.mode == "llm" or config.checkpoint:
        run_config.pop("train")  # not used
    out = Path(out or default_out("mqar", run_config))
    store_args = {"folder": out, "config": run_config, "resume": resume}
    if config.mode == "llm":
        store, cells, history = _run_llm(config, store_args, progress)
    else:
        store, cells, history = _run_tiny(config, store_args, out, progress)
    records = store.records()
    rows = []
    for t, n in config.settings:
        for spec, budget in cells:
            prefix = _sample_id(spec, t, n, "")
            rows.append(_row(spec, budget, t, n, [r for r in records if r["id"].startswith(prefix)]))
    scores = {"rows": rows} | ({"train": history} if history else {})
    store.write_results(scores, device=config.device)
    plot_mqar(out)
    return json.loads((out / RESULTS_FILE).read_text()) | {"out": str(out)}


# ---------------------------------------------------------------------------------- table


def markdown(rows: list[dict]) -> str:
    """A markdown table: accuracy per method and budget (rows) and (T, N) (columns)."""
    settings = list(dict.fromkeys((r["T"], r["N"]) for r in rows))
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    cell = {(r["method"], r["budget"], r["T"], r["N"]): r for r in rows}
    lines = [
        "| method | budget | " + " | ".join(f"T={t} N={n}" for t, n in settings) + " |",
        "|---|---:|" + "---:|" * len(settings),
    ]
    for method, budget in keys:
        values = []
        for t, n in settings:
            r = cell.get((method, budget, t, n))
            acc = "-" if r is None or r["accuracy"] is None else f"{r['accuracy']:.3f}"
            dens = "" if r is None or r["density"] is None else f" (d={r['density']:.2f})"
            values.append(acc + dens)
        lines.append(f"| {method} | {budget if budget is not None else '-'} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI


def _settings(text: str) -> tuple[tuple[int, int], ...]:
    """``"64x4,128x8"`` -> ``((64, 4), (128, 8))``."""
    out = []
    for part in comma_list(text):
        try:
            t, n = part.lower().split("x")
            out.append((int(t), int(n)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad setting {part!r}: use TxN, e.g. 256x16") from None
    return tuple(out)


def _stages(text: str) -> tuple:
    """``"3000:16x2,32x4/300:256x16"`` -> ``((3000, ((16, 2), (32, 4))), (300, ((256, 16),)))``."""
    out = []
    for part in text.split("/"):
        steps, _, settings = part.partition(":")
        try:
            out.append((int(steps), _settings(settings)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad stage {part!r}: use STEPS:TxN,TxN/...") from None
    return tuple(out)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad integer list {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, default_methods=",".join(MQARConfig.methods))
    parser.set_defaults(model=None)
    parser.add_argument("--train-tiny", action="store_true", help="train a tiny 2-layer Llama on MQAR (CPU)")
    parser.add_argument(
        "--checkpoint", default=None, help="reuse a tiny model saved by --train-tiny (<out>/model)"
    )
    parser.add_argument(
        "--settings",
        type=_settings,
        default=None,
        help="(T, N) pairs as TxN, e.g. 64x4,128x8,256x16 (default depends on the mode)",
    )
    parser.add_argument("--num-examples", type=int, default=None, help="sequences per setting")
    parser.add_argument("--budgets", type=_ints, default=MQARConfig.budgets, help="token budgets to sweep")
    for name in SHARED_PARAMS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(MQARConfig, name),
            help="given to every method that takes it",
        )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="llm: key/value number range (8192); tiny: the model's vocabulary",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=MQARConfig.max_new_tokens)
    defaults = TinyTrainConfig()
    parser.add_argument(
        "--train-stages",
        type=_stages,
        default=defaults.stages,
        help="curriculum STEPS:TxN,TxN/STEPS:...; default "
        + "/".join(f"{k}:{','.join(f'{t}x{n}' for t, n in st)}" for k, st in defaults.stages),
    )
    parser.add_argument("--train-minutes", type=float, default=None, help="stop training after this long")
    parser.add_argument("--train-threads", type=int, default=defaults.num_threads, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)


def config_from_args(args) -> MQARConfig:
    tiny = args.train_tiny or args.checkpoint is not None
    train = dict(
        stages=args.train_stages,
        max_minutes=args.train_minutes,
        num_threads=args.train_threads,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    if tiny and args.vocab_size is not None:
        train["vocab_size"] = args.vocab_size
    return MQARConfig(
        mode="tiny" if tiny else "llm",
        model=args.model,
        checkpoint=args.checkpoint,
        train=TinyTrainConfig(**train),
        device=args.device,
        dtype=args.dtype,
        methods=args.methods,
        method_params=args.method_params,
        budgets=args.budgets,
        block_size=args.block_size,
        sink_tokens=args.sink_tokens,
        local_tokens=args.local_tokens,
        settings=args.settings,
        num_examples=args.num_examples,
        vocab_size=8192 if tiny or args.vocab_size is None else args.vocab_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )


def run_from_args(args) -> int:
    result = run_mqar(config_from_args(args), out=args.out, resume=args.resume, progress=show_progress(args))
    print(markdown(result["scores"]["rows"]))
    print(f"results: {Path(result['out']) / RESULTS_FILE}")
    return 0
