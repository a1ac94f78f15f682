"""LongBench and LongBench-E (Bai et al., ACL 2024) with the official protocol, methods side by side.

The protocol is THUDM/LongBench's ``pred.py`` and ``eval.py``:

- Prompt templates and generation lengths are read at run time from the task YAMLs that lm-eval
  installs (``lm_eval/tasks/longbench/<task>[_e].yaml``: ``doc_to_text`` and ``max_gen_toks``), which
  carry the official ``config/dataset2prompt.json`` and ``dataset2maxlen.json`` values; the JSONL
  field ``input`` fills the template's ``{{question}}``.
- A prompt longer than ``max_length`` tokens is cut in the middle: its first and last
  ``max_length // 2`` tokens are kept (decoded and joined), since instructions sit at both ends.
- The chat template is applied when the tokenizer has one, except for the few-shot and code tasks
  (:data:`NO_CHAT`; "chat models are better off without build prompts on these tasks", ``pred.py``).
  Greedy decoding; for samsum a newline also stops generation, after at least one token.
- Scores: the official metric functions, imported from ``lm_eval.tasks.longbench.metrics``; per
  example the max over the ground truths; per task the mean x100. trec, triviaqa, samsum and lsht
  predictions are cut at their first line before scoring. LongBench-E also splits by the example's
  ``length`` field (words) into 0-4k, 4-8k and 8k+.

Data: ``<data_dir>/<task>.jsonl`` and ``<task>_e.jsonl`` (the official files, fields ``input``,
``context``, ``answers``, ``length``, ``all_classes``, ``_id``), or, without a data dir, the official
``data.zip`` of the hub dataset THUDM/LongBench, downloaded once with ``huggingface_hub`` and unpacked
into the sparse-llm cache. (THUDM/LongBench is a loading-script dataset, which ``datasets`` >= 4 no
longer runs, so ``datasets.load_dataset`` cannot read it.)

A run folder holds ``config.json``, ``samples.jsonl`` (one record per example and method; a rerun with
``resume`` skips those), ``results.json`` and ``scores.md`` (the score table), and the predictions in
LongBench's layout: ``pred/<model>-<method>/<task>.jsonl`` (``pred_e/`` for LongBench-E) with
``pred``, ``answers``, ``all_classes`` and ``length`` per line, plus ``result.json`` per folder, so
the official ``eval.py`` can rescore them.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import logging
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import sparse_llm
from sparse_llm.eval import common
from sparse_llm.eval.haystack import encode
from sparse_llm.models import load_any
from sparse_llm.results import ResultsStore, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

TASKS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)  # fmt: skip
E_TASKS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# Official eval.py's dataset2metric; the functions live in lm_eval.tasks.longbench.metrics.
METRICS = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                     "triviaqa"), "qa_f1_score"),
    "multifieldqa_zh": "qa_f1_zh_score",
    **dict.fromkeys(("dureader", "vcsum"), "rouge_zh_score"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rouge_score"),
    **dict.fromkeys(("trec", "lsht"), "classification_score"),
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    **dict.fromkeys(("lcc", "repobench-p"), "code_sim_score"),
}  # fmt: skip
BUCKETS = ("0-4k", "4-8k", "8k+")
# Default max_length: the model's context, capped at 32K (LongBench prompts are mostly shorter; the
# official runs use 31500 for 32K models), minus room for the longest answer (gov_report & co, 512).
MAX_LENGTH_CAP = 32768
ANSWER_ROOM = 512
HUB_REPO = "THUDM/LongBench"
HOW_TO_GET = (
    f"download https://huggingface.co/datasets/{HUB_REPO}/resolve/main/data.zip, unzip it and pass "
    "--data-dir <unzipped>/data (files <task>.jsonl and <task>_e.jsonl), or run with network access"
)
EVAL_EXTRA = 'pip install "sparse-llm[eval]"'


def _lm_eval_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"LongBench prompts and metrics come from lm-eval: {EVAL_EXTRA}")
    return Path(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class TaskSpec:
    """One dataset's official prompt template (Jinja, ``{{context}}``/``{{question}}``) and answer length."""

    name: str
    prompt: str
    max_gen: int


def task_spec(task: str, longbench_e: bool = False) -> TaskSpec:
    """The prompt and generation length of ``task`` from lm-eval's installed LongBench task YAML."""
    import yaml

    name = f"{task}_e" if longbench_e else task
    path = _lm_eval_dir() / "tasks" / "longbench" / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"lm-eval has no LongBench task file {path}; is lm-eval >= 0.4.9 installed?")

    class Loader(yaml.SafeLoader):  # the YAMLs tag metric functions with !function
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    return TaskSpec(name, config["doc_to_text"], int(config["generation_kwargs"]["max_gen_toks"]))


def render_prompt(spec: TaskSpec, example: dict) -> str:
    """The official prompt of one example (the JSONL's ``input`` is the template's ``question``)."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(spec.prompt).render(context=example["context"], question=example["input"])


def middle_truncate(ids: list[int], max_length: int) -> list[int]:
    """``ids`` if it fits, else its first and last ``max_length // 2`` tokens (LongBench's ``pred.py``)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(ids) <= max_length:
        return list(ids)
    half = max_length // 2
    return list(ids[:half]) + list(ids[-half:])


def build_prompt_ids(tokenizer, task: str, prompt: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` for ``task``, middle-truncated and chat-wrapped; and whether it was cut.

    The prompt's text tokens (without special tokens) are what ``max_length`` counts; the chat
    template or BOS is added after the cut, as in ``pred.py``.
    """
    ids = encode(tokenizer, prompt, specials=False)
    truncated = len(ids) > max_length
    if truncated:
        half = middle_truncate(ids, max_length)
        cut = len(half) // 2
        prompt = tokenizer.decode(half[:cut], skip_special_tokens=True) + tokenizer.decode(
            half[cut:], skip_special_tokens=True
        )
    if task not in NO_CHAT and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return encode(tokenizer, text, specials=False), truncated
    return encode(tokenizer, prompt, specials=True), truncated


def _metrics():
    try:
        from lm_eval.tasks.longbench import metrics
    except ImportError as err:  # lm-eval itself, or jieba / fuzzywuzzy / rouge of its [longbench] extra
        raise ImportError(f"the LongBench metrics need lm-eval[longbench]: {EVAL_EXTRA} ({err})") from err
    return metrics


def score_prediction(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """The official score in [0, 1] of one prediction: the best over the ground truths."""
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = getattr(_metrics(), METRICS[task])
    return max([float(metric(prediction, truth, all_classes=all_classes)) for truth in answers], default=0.0)


def _bucket(length: int) -> str:
    return BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]


def download_data(cache_dir: str | Path | None = None) -> Path:
    """The folder of the official JSONL files, downloading and unpacking THUDM/LongBench's data.zip once."""
    from sparse_llm.models import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "longbench"
    target = root / "data"
    if target.is_dir():
        return target
    from huggingface_hub import hf_hub_download

    try:
        archive = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
    except OSError as err:  # offline (LocalEntryNotFoundError), HTTP errors
        raise FileNotFoundError(f"LongBench data is not available offline ({err}); {HOW_TO_GET}") from err
    root.mkdir(parents=True, exist_ok=True)
    logger.info("unpacking %s into %s", archive, target)
    with tempfile.TemporaryDirectory(prefix=".unpacking-", dir=root) as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        unpacked = Path(tmp) / "data" if (Path(tmp) / "data").is_dir() else Path(tmp)
        try:
            unpacked.rename(target)  # atomic: a reader never sees half the files
        except OSError:
            if not target.is_dir():  # else another process unpacked it first
                raise
    return target


def load_examples(
    task: str, data_dir: str | Path, longbench_e: bool = False, limit: int | None = None
) -> list[dict]:
    """The first ``limit`` examples of ``<data_dir>/<task>[_e].jsonl`` (``<data_dir>/data/`` also works)."""
    name = f"{task}_e" if longbench_e else task
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists() and (Path(data_dir) / "data" / f"{name}.jsonl").exists():
        path = Path(data_dir) / "data" / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"LongBench file {path} not found; {HOW_TO_GET}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            example = json.loads(line)
            missing = [k for k in ("input", "context", "answers", "length") if k not in example]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing LongBench fields {missing}")
            examples.append(example)
    return examples


def _check_tasks(tasks, longbench_e: bool) -> tuple[str, ...]:
    valid = E_TASKS if longbench_e else TASKS
    for task in tasks:
        if task not in valid:
            close = difflib.get_close_matches(str(task), valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            if task in TASKS:
                hint = " LongBench-E has no such dataset."
            kind = "LongBench-E" if longbench_e else "LongBench"
            raise ValueError(f"unknown {kind} task {task!r}.{hint} Known: {', '.join(valid)}")
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
    """A logits processor that reads :func:`sparse_llm.attention_stats` once, right after the prefill."""

    def __init__(self, model):
        self.model, self.density = model, None

    def __call__(self, input_ids, scores):
        if self.density is None:
            self.density = sparse_llm.attention_stats(self.model)["density"]
        return scores


@torch.inference_mode()
def generate_answer(model, tokenizer, ids: list[int], task: str, max_gen: int) -> tuple[str, float | None]:
    """Greedy answer to prompt ``ids`` and, if the model is sparsified, the density of its prefill."""
    from transformers import LogitsProcessorList

    from sparse_llm.patches import hf

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {}
    if task == "samsum":  # pred.py: a newline also ends the answer, which has at least one token
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        kwargs = {"eos_token_id": [*eos, newline], "min_new_tokens": 1}
    probe = PrefillDensity(model) if hf.active_method(model) is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    processors = LogitsProcessorList([probe] if probe else [])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_gen, do_sample=False,
        num_beams=1, pad_token_id=pad, logits_processor=processors, **kwargs,
    )  # fmt: skip
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
                    b: _mean100([r["score"] for r in rs if _bucket(r["length"]) == b]) for b in BUCKETS
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


def _write_outputs(store: ResultsStore, config: LongBenchConfig, datasets: dict, labels: list[str]) -> dict:
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
    store.write_results(scores, device=config.device)
    atomic_write_text(store.folder / "scores.md", markdown(table, config.longbench_e))
    return scores


def _sample_id(task: str, index: int, label: str, config: LongBenchConfig) -> str:
    return f"{task}_e/{index}/{label}" if config.longbench_e else f"{task}/{index}/{label}"


def run_longbench(
    config: LongBenchConfig, out: str | Path | None = None, *, resume: bool = False, progress: bool = False,
    model=None, tokenizer=None,
) -> dict:  # fmt: skip
    """Run ``config``; returns the ``scores`` written to ``<out>/results.json``.

    ``model``/``tokenizer`` may be passed already loaded (then ``config.model`` only names the
    predictions' folder); otherwise they are loaded from ``config.model``. Data are read (or
    downloaded) before the model is loaded, so a missing dataset fails fast with FileNotFoundError.
    """
    specs = common.method_specs(config.methods, config.method_params)
    data_dir = config.data_dir if config.data_dir is not None else download_data()
    datasets = {t: load_examples(t, data_dir, config.longbench_e, config.limit) for t in config.tasks}
    prompts = {t: task_spec(t, config.longbench_e) for t in config.tasks}
    max_gen = {t: min(spec.max_gen, config.max_new_tokens or spec.max_gen) for t, spec in prompts.items()}
    _metrics()  # fail now, not after hours of generation, if the metrics' packages are missing
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
                    store.add({
                        "id": _sample_id(task, i, spec.label, config), "task": task, "method": spec.label,
                        "_id": example.get("_id"), "pred": pred, "answers": answers, "all_classes": classes,
                        "length": example["length"], "prompt_tokens": len(prompt_ids), "truncated": truncated,
                        "density": density, "score": score_prediction(task, pred, answers, classes),
                    })  # fmt: skip
                    bar.update(1)
    return _write_outputs(store, config, datasets, [s.label for s in specs])


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
        model=args.model, tasks=args.tasks, longbench_e=args.longbench_e, methods=args.methods,
        method_params=args.method_params, data_dir=args.data_dir, max_length=args.max_length,
        limit=args.limit, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    scores = run_longbench(config, args.out, resume=args.resume, progress=common.show_progress(args))
    print(markdown(scores["longbench_e" if config.longbench_e else "longbench"], config.longbench_e), end="")
    return 0
