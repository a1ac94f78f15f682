"""LongBench and LongBench-E (Bai et al., ACL 2024) with the official protocol, methods side by side.

The protocol is THUDM/LongBench's ``pred.py`` and ``eval.py``; its data side (task list, prompt
templates, middle truncation, chat wrapping, metrics, data files) is in
:mod:`sparse_llm.eval.longbench_data`. Here: greedy decoding (for samsum a newline also stops
generation, after at least one token), the score table, the output files, the runner and the CLI.

A run folder holds ``config.json``, ``samples.jsonl`` (one record per example and method; a rerun with
``resume`` skips those), ``results.json`` (besides the scores and the usual metadata, the versions of
lm-eval and the metric libraries under ``versions``, and the sha256 of the prompt, length and data
files, with the hub revision of downloaded data, under ``longbench``), ``scores.md`` (the score
table), and the predictions in LongBench's layout: ``pred/<model>-<method>/<task>.jsonl``
(``pred_e/`` for LongBench-E) with ``pred``, ``answers``, ``all_classes`` and ``length`` per line,
plus ``result.json`` per folder, so the official ``eval.py`` can rescore them.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import sparse_llm
from sparse_llm.eval import common
from sparse_llm.eval.longbench_data import (
    BUCKETS,
    E_TASKS,
    TASKS,
    build_prompt_ids,
    data_provenance,
    download_data,
    length_bucket,
    load_examples,
    metric_functions,
    metric_versions,
    render_prompt,
    score_prediction,
    task_spec,
)
from sparse_llm.models import load_any
from sparse_llm.names import unknown_name
from sparse_llm.results import ResultsStore, atomic_write_json, atomic_write_text

# Default max_length: the model's context, capped at 32K (LongBench prompts are mostly shorter; the
# official runs use 31500 for 32K models), minus room for the longest answer (gov_report & co, 512).
MAX_LENGTH_CAP = 32768
ANSWER_ROOM = 512


def _check_tasks(tasks, longbench_e: bool) -> tuple[str, ...]:
    valid = E_TASKS if longbench_e else TASKS
    for task in tasks:
        if task not in valid:
            hint = "LongBench-E has no such dataset." if task in TASKS else None
            raise unknown_name("LongBench-E task" if longbench_e else "LongBench task", task, valid, hint)
    return tuple(dict.fromkeys(tasks))


@dataclass
class LongBenchConfig:
    """One LongBench run.

    ``tasks`` defaults to all 21 (all 13 with ``longbench_e``); ``limit`` is per task; ``max_length``
    (prompt tokens kept by the middle cut) defaults to ``min(max_position_embeddings, 32768) - 512``.
    ``max_new_tokens`` caps every task's official answer length: for quick checks only, since the
    scores are then not comparable with published ones.
    """

    model: str = "gemma3-270m"
    tasks: tuple[str, ...] | None = None
    longbench_e: bool = False
    methods: tuple[str, ...] = ("sdpa", "dense")
    method_params: dict = field(default_factory=dict)
    data_dir: str | None = None
    max_length: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        tasks = (self.tasks,) if isinstance(self.tasks, str) else self.tasks
        self.tasks = _check_tasks(tasks or (E_TASKS if self.longbench_e else TASKS), self.longbench_e)
        for name in ("max_length", "limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.dtype not in common.DTYPES:
            raise ValueError(f"dtype must be one of {sorted(common.DTYPES)}, got {self.dtype!r}")
        self.methods = tuple(self.methods)
        common.method_specs(self.methods, self.method_params)  # validates names and parameters


def default_max_length(model) -> int:
    config = model.config.get_text_config()
    context = getattr(config, "max_position_embeddings", None)
    if not context:
        raise ValueError("the model config has no max_position_embeddings: pass max_length (--max-length)")
    return max(2, min(int(context), MAX_LENGTH_CAP) - ANSWER_ROOM)


class PrefillDensity:
    """A logits processor that reads :func:`sparse_llm.attention_stats` once, right after the prefill:
    its ``density`` and ``far_density``."""

    def __init__(self, model):
        self.model, self.density, self.far_density = model, None, None

    def __call__(self, input_ids, scores):
        if self.density is None:
            stats = sparse_llm.attention_stats(self.model)
            self.density, self.far_density = stats["density"], stats["far_density"]
        return scores


@torch.inference_mode()
def generate_answer(model, tokenizer, ids: list[int], task: str, max_gen: int) -> tuple[str, float | None]:
    """Greedy answer to prompt ``ids`` and, if the model is sparsified, the density of its prefill."""
    from transformers import LogitsProcessorList

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {}
    if task == "samsum":  # pred.py: a newline also ends the answer, which has at least one token
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        kwargs = {"eos_token_id": [*eos, newline], "min_new_tokens": 1}
    probe = PrefillDensity(model) if sparse_llm.active_method(model) is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    processors = LogitsProcessorList([probe] if probe else [])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_gen,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        logits_processor=processors,
        **kwargs,
    )
    answer = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    return answer, probe.density if probe else None


def _folder_name(model: str, label: str) -> str:
    """``pred/`` folder of a model and method: ``gemma3-270m-streaming-local_tokens=256-sink_tokens=64``."""
    label = label.replace("[", "-").replace(",", "-").replace("]", "")
    return re.sub(r"[^\w.=+-]+", "_", f"{Path(model).name}-{label}")


def _mean100(values: list[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def score_table(records: list[dict], longbench_e: bool) -> dict:
    """``{method: {task: score}}`` (LongBench) or ``{method: {task: {bucket: score}}}`` (LongBench-E),
    plus ``"avg"`` per method (mean over its tasks, per bucket for -E); scores x100, None if empty."""
    per: dict[str, dict[str, list]] = {}
    for r in records:
        per.setdefault(r["method"], {}).setdefault(r["task"], []).append(r)
    table = {}
    for method, tasks in per.items():
        row: dict = {}
        for task, rs in tasks.items():
            if longbench_e:
                row[task] = {
                    b: _mean100([r["score"] for r in rs if length_bucket(r["length"]) == b]) for b in BUCKETS
                }
            else:
                row[task] = _mean100([r["score"] for r in rs])
        if longbench_e:
            row["avg"] = {b: _avg([row[t][b] for t in tasks]) for b in BUCKETS}
        else:
            row["avg"] = _avg(list(row.values()))
        table[method] = row
    return table


def _avg(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def markdown(table: dict, longbench_e: bool) -> str:
    """The score table as markdown: one row per method (per method and length bucket for -E)."""
    tasks = list(dict.fromkeys(t for row in table.values() for t in row if t != "avg")) + ["avg"]
    show = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    head = ["method", *(["length"] if longbench_e else []), *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        for bucket in BUCKETS if longbench_e else (None,):
            cells = [show(row[t][bucket] if longbench_e else row[t]) if t in row else "-" for t in tasks]
            lines.append("| " + " | ".join([method, *([bucket] if longbench_e else []), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(
    store: ResultsStore, config: LongBenchConfig, datasets: dict, labels: list[str], provenance: dict
) -> dict:
    """pred/ files in dataset order, per-folder result.json, results.json and scores.md, from all records."""
    records = store.records()
    by_id = {r["id"]: r for r in records}
    pred_root = store.folder / ("pred_e" if config.longbench_e else "pred")
    for label in labels:
        folder = pred_root / _folder_name(config.model, label)
        for task, examples in datasets.items():
            rows = [by_id.get(_sample_id(task, i, label, config)) for i in range(len(examples))]
            lines = [{k: r[k] for k in ("pred", "answers", "all_classes", "length")} for r in rows if r]
            text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
            atomic_write_text(folder / f"{task}.jsonl", text)
    table = score_table(records, config.longbench_e)
    for label, row in table.items():
        atomic_write_json(pred_root / _folder_name(config.model, label) / "result.json", row)
    densities = {}
    for r in records:
        if r.get("density") is not None:
            densities.setdefault(r["method"], []).append(r["density"])
    scores = {
        "longbench_e" if config.longbench_e else "longbench": table,
        "density": {m: sum(d) / len(d) for m, d in densities.items()},
        "examples": {label: sum(r["method"] == label for r in records) for label in labels},
    }
    path = store.write_results(scores, device=config.device)
    results = json.loads(path.read_text(encoding="utf-8"))
    results["versions"].update(metric_versions())
    atomic_write_json(path, {**results, "longbench": provenance})
    atomic_write_text(store.folder / "scores.md", markdown(table, config.longbench_e))
    return scores


def _sample_id(task: str, index: int, label: str, config: LongBenchConfig) -> str:
    return f"{task}_e/{index}/{label}" if config.longbench_e else f"{task}/{index}/{label}"


def run_longbench(
    config: LongBenchConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    model=None,
    tokenizer=None,
) -> dict:
    """Run ``config``; returns the ``scores`` written to ``<out>/results.json``.

    ``model``/``tokenizer`` may be passed already loaded (then ``config.model`` only names the
    predictions' folder); otherwise they are loaded from ``config.model``. Data are read (or
    downloaded) before the model is loaded, so a missing dataset fails fast with FileNotFoundError.
    """
    specs = common.method_specs(config.methods, config.method_params)
    data_dir = config.data_dir if config.data_dir is not None else download_data()
    datasets = {t: load_examples(t, data_dir, config.longbench_e, config.limit) for t in config.tasks}
    provenance = data_provenance(data_dir, config.tasks, config.longbench_e)
    prompts = {t: task_spec(t, config.longbench_e) for t in config.tasks}
    max_gen = {t: min(spec.max_gen, config.max_new_tokens or spec.max_gen) for t, spec in prompts.items()}
    metric_functions()  # fail now, not after hours of generation, if the metrics' packages are missing
    record_config = asdict(config)
    store = ResultsStore(out or common.default_out("longbench", record_config), record_config, resume=resume)
    if model is None:
        model, tokenizer = load_any(config.model, device=config.device, dtype=common.DTYPES[config.dtype])
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; LongBench needs one")
    max_length = config.max_length or default_max_length(model)
    total = sum(len(e) for e in datasets.values()) * len(specs)
    with tqdm(total=total, disable=not progress, desc="longbench", unit="sample") as bar:
        for task, examples in datasets.items():
            bar.set_postfix_str(task)
            for i, example in enumerate(examples):
                todo = [s for s in specs if not store.done(_sample_id(task, i, s.label, config))]
                bar.update(len(specs) - len(todo))
                if not todo:
                    continue
                prompt = render_prompt(prompts[task], example)
                prompt_ids, truncated = build_prompt_ids(tokenizer, task, prompt, max_length)
                for spec in todo:
                    with common.applied(model, spec):
                        pred, density = generate_answer(model, tokenizer, prompt_ids, task, max_gen[task])
                    answers, classes = example["answers"], example.get("all_classes")
                    store.add(
                        {
                            "id": _sample_id(task, i, spec.label, config),
                            "task": task,
                            "method": spec.label,
                            "_id": example.get("_id"),
                            "pred": pred,
                            "answers": answers,
                            "all_classes": classes,
                            "length": example["length"],
                            "prompt_tokens": len(prompt_ids),
                            "truncated": truncated,
                            "density": density,
                            "score": score_prediction(task, pred, answers, classes),
                        }
                    )
                    bar.update(1)
    return _write_outputs(store, config, datasets, [s.label for s in specs], provenance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    default_length = f"min(max_position_embeddings, {MAX_LENGTH_CAP}) - {ANSWER_ROOM}"
    parser.add_argument("--tasks", type=common.comma_list, default=None, help="comma-separated; default all")
    parser.add_argument("--e", "--longbench-e", dest="longbench_e", action="store_true", help="LongBench-E")
    parser.add_argument("--data-dir", default=None, help="folder of the official <task>.jsonl files")
    parser.add_argument("--max-length", type=int, help=f"prompt tokens kept (middle cut); {default_length}")
    parser.add_argument("--limit", type=int, default=None, help="first N examples per task")
    parser.add_argument(
        "--max-new-tokens", type=int, help="cap the official answer lengths (quick checks; not comparable)"
    )


def run_from_args(args) -> int:
    config = LongBenchConfig(
        model=args.model,
        tasks=args.tasks,
        longbench_e=args.longbench_e,
        methods=args.methods,
        method_params=args.method_params,
        data_dir=args.data_dir,
        max_length=args.max_length,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
    )
    scores = run_longbench(config, args.out, resume=args.resume, progress=common.show_progress(args))
    print(markdown(scores["longbench_e" if config.longbench_e else "longbench"], config.longbench_e), end="")
    return 0
