"""LongBench and LongBench-E (Bai et al., ACL 2024): the data and the official protocol, no model.

The protocol is THUDM/LongBench's ``pred.py`` and ``eval.py``:

- Prompt templates and generation lengths are THUDM's ``config/dataset2prompt.json`` and
  ``dataset2maxlen.json``, shipped verbatim in ``sparse_llm/eval/data/longbench/`` (source commit and
  MIT license in its ``NOTICE`` and ``LICENSE``); a prompt is ``template.format(**example)``, as in
  ``pred.py`` (:func:`task_spec`, :func:`render_prompt`). lm-eval's task YAMLs are not used: since
  lm-eval 0.4.9.2, 6 of their 21 templates have lost a newline or a trailing space.
- Truncation as in ``pred.py`` (:func:`build_prompt_ids`): the prompt is tokenized the tokenizer's
  default way, with its special tokens (a BOS counts towards ``max_length``); if longer than
  ``max_length``, its first and last ``max_length // 2`` tokens are decoded without special tokens
  and the two texts joined, since instructions sit at both ends.
- The chat template is applied when the tokenizer has one, except for the few-shot and code tasks
  (:data:`NO_CHAT`; "chat models are better off without build prompts on these tasks", ``pred.py``).
- Scores: the official metric functions, imported from ``lm_eval.tasks.longbench.metrics``, except
  ``code_sim_score``, which is THUDM's own (lm-eval's skips blank lines since 0.4.13); per example
  the max over the ground truths; per task the mean x100. trec, triviaqa, samsum and lsht
  predictions are cut at their first line before scoring. LongBench-E also splits by the example's
  ``length`` field (words) into 0-4k, 4-8k and 8k+. :func:`metric_versions` and
  :func:`data_provenance` say which packages and files a score came from.

Data: ``<data_dir>/<task>.jsonl`` and ``<task>_e.jsonl`` (the official files, fields ``input``,
``context``, ``answers``, ``length``, ``all_classes``, ``_id``), or, without a data dir, the official
``data.zip`` of the hub dataset THUDM/LongBench, downloaded once with ``huggingface_hub`` and unpacked
into the sparse-llm cache. (THUDM/LongBench is a loading-script dataset, which ``datasets`` >= 4 no
longer runs, so ``datasets.load_dataset`` cannot read it.)

lm-eval and fuzzywuzzy are imported only when a function needs them, not at import. Generation,
the score table and the run folder are in :mod:`sparse_llm.eval.longbench`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sparse_llm.eval.haystack import encode

logger = logging.getLogger(__name__)

TASKS = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
)
E_TASKS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# Official eval.py's dataset2metric; the functions live in lm_eval.tasks.longbench.metrics.
METRICS = {
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"),
        "qa_f1_score",
    ),
    "multifieldqa_zh": "qa_f1_zh_score",
    **dict.fromkeys(("dureader", "vcsum"), "rouge_zh_score"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rouge_score"),
    **dict.fromkeys(("trec", "lsht"), "classification_score"),
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    **dict.fromkeys(("lcc", "repobench-p"), "code_sim_score"),
}
BUCKETS = ("0-4k", "4-8k", "8k+")
HUB_REPO = "THUDM/LongBench"
EVAL_EXTRA = 'pip install "sparse-llm[eval]"'
# THUDM/LongBench's config files, shipped verbatim as package data (see data/longbench/NOTICE).
PROMPTS_FILE, MAXLEN_FILE = "dataset2prompt.json", "dataset2maxlen.json"
CONFIG_SOURCE = (
    "https://github.com/THUDM/LongBench/tree/2e00731f8d0bff23dc4325161044d0ed8af94c1e/LongBench/config"
)
SOURCE_FILE = "source.json"  # beside the unpacked hub data: the dataset revision and data.zip's sha256
# Distributions the scores depend on: lm-eval's metrics, the libraries they and code_sim_score import,
# and Levenshtein, which fuzzywuzzy uses when installed (otherwise difflib, whose ratios differ).
METRIC_DISTRIBUTIONS = {
    "lm_eval": ("lm_eval",),
    "jieba": ("jieba",),
    "rouge": ("rouge",),
    "fuzzywuzzy": ("fuzzywuzzy",),
    "Levenshtein": ("Levenshtein", "python-Levenshtein"),
}


def how_to_get(flag: str = "--data-dir") -> str:
    """Where to get the data, for an error message; ``flag`` is the running command's own flag for
    the data folder (``eval longbench``: ``--data-dir``, ``eval lm-eval``: ``--longbench-data``)."""
    return (
        f"download https://huggingface.co/datasets/{HUB_REPO}/resolve/main/data.zip, unzip it and pass "
        f"{flag} <unzipped>/data (files <task>.jsonl and <task>_e.jsonl), or run with network access"
    )


def config_file(name: str):
    """The shipped copy of THUDM's ``config/<name>`` (an importlib.resources Traversable)."""
    return resources.files("sparse_llm.eval").joinpath("data", "longbench", name)


@functools.cache
def _official(name: str) -> dict:
    return json.loads(config_file(name).read_text(encoding="utf-8"))


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TaskSpec:
    """One dataset's official prompt template (for ``str.format``: ``{context}``, ``{input}``) and
    answer length."""

    name: str
    prompt: str
    max_gen: int


def task_spec(task: str, longbench_e: bool = False) -> TaskSpec:
    """The prompt and generation length of ``task`` (the same for LongBench-E, as in ``pred.py``)."""
    if task not in (E_TASKS if longbench_e else TASKS):
        raise ValueError(f"unknown LongBench{'-E' if longbench_e else ''} task {task!r}")
    name = f"{task}_e" if longbench_e else task
    return TaskSpec(name, _official(PROMPTS_FILE)[task], int(_official(MAXLEN_FILE)[task]))


def render_prompt(spec: TaskSpec, example: dict) -> str:
    """The official prompt of one example: ``spec.prompt.format(**example)``, as ``pred.py`` does."""
    return spec.prompt.format(**example)


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

    ``pred.py``'s rule: ``max_length`` counts ``tokenizer(prompt).input_ids``, the tokens with the
    special tokens the tokenizer adds by default (a BOS; an EOS too for tokenizers that append one).
    A longer prompt keeps its first and last ``max_length // 2`` of them, each half decoded with
    ``skip_special_tokens=True`` and the texts joined: the BOS takes one of the head's places but is
    dropped from the text, so ``max_length // 2 - 1`` text tokens are kept in front of the cut. The
    text is then tokenized again: with the chat template (except :data:`NO_CHAT` tasks) rendered and
    tokenized without adding special tokens, since the template writes its own BOS (``pred.py``'s
    hand-written per-model wrappers had none and let the tokenizer add it); otherwise with the
    tokenizer's BOS but without a trailing EOS/SEP. Either way the prompt has one BOS, and, when cut,
    about ``2 * (max_length // 2)`` tokens (re-tokenizing the joined text can merge tokens at the seam).
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])  # pred.py: tokenizer(prompt)
    truncated = len(ids) > max_length
    if truncated:
        kept = middle_truncate(ids, max_length)
        cut = len(kept) // 2
        prompt = tokenizer.decode(kept[:cut], skip_special_tokens=True) + tokenizer.decode(
            kept[cut:], skip_special_tokens=True
        )
    if task not in NO_CHAT and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return encode(tokenizer, text, specials=False), truncated
    return encode(tokenizer, prompt, specials=True), truncated


def metric_functions():
    try:
        from lm_eval.tasks.longbench import metrics
    except ImportError as err:  # lm-eval itself, or jieba / fuzzywuzzy / rouge of its [longbench] extra
        raise ImportError(f"the LongBench metrics need lm-eval[longbench]: {EVAL_EXTRA} ({err})") from err
    return metrics


def metric_versions() -> dict[str, str]:
    """The version of each of :data:`METRIC_DISTRIBUTIONS` (importlib.metadata), or "not installed"."""
    versions = {}
    for key, names in METRIC_DISTRIBUTIONS.items():
        versions[key] = "not installed"
        for name in names:
            try:
                versions[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return versions


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """THUDM's ``code_sim_score`` (``LongBench/metrics.py``, MIT): ``fuzz.ratio / 100`` of the ground
    truth and the first line, after leading newlines, without a backtick, ``#`` or ``//``, even if it is
    blank. lm-eval >= 0.4.13 skips blank lines here, which changes lcc and repobench-p scores."""
    from fuzzywuzzy import fuzz

    all_lines = prediction.lstrip("\n").split("\n")
    prediction = ""
    for line in all_lines:
        if ("`" not in line) and ("#" not in line) and ("//" not in line):
            prediction = line
            break
    return fuzz.ratio(prediction, ground_truth) / 100


def score_prediction(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """The official score in [0, 1] of one prediction: the best over the ground truths."""
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metrics = metric_functions()
    metric = code_sim_score if METRICS[task] == "code_sim_score" else getattr(metrics, METRICS[task])
    return max([float(metric(prediction, truth, all_classes=all_classes)) for truth in answers], default=0.0)


def length_bucket(length: int) -> str:
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
        raise FileNotFoundError(f"LongBench data is not available offline ({err}); {how_to_get()}") from err
    root.mkdir(parents=True, exist_ok=True)
    logger.info("unpacking %s into %s", archive, target)
    # hf_hub_download's cache layout is .../snapshots/<commit>/data.zip
    revision = Path(archive).parent.name if re.fullmatch(r"[0-9a-f]{40}", Path(archive).parent.name) else None
    source = {"repo": HUB_REPO, "file": "data.zip", "revision": revision, "sha256": sha256_of(Path(archive))}
    with tempfile.TemporaryDirectory(prefix=".unpacking-", dir=root) as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        unpacked = Path(tmp) / "data" if (Path(tmp) / "data").is_dir() else Path(tmp)
        (unpacked / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            unpacked.rename(target)  # atomic: a reader never sees half the files
        except OSError:
            if not target.is_dir():  # else another process unpacked it first
                raise
    return target


def data_file(task: str, data_dir: str | Path, longbench_e: bool = False) -> Path:
    """``<data_dir>/<task>[_e].jsonl`` or ``<data_dir>/data/<task>[_e].jsonl``; FileNotFoundError if none."""
    name = f"{task}_e" if longbench_e else task
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists() and (Path(data_dir) / "data" / f"{name}.jsonl").exists():
        path = Path(data_dir) / "data" / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"LongBench file {path} not found; {how_to_get()}")
    return path


def data_provenance(data_dir: str | Path, tasks, longbench_e: bool = False) -> dict:
    """What a run's inputs were: the sha256 of the shipped prompt and length files and of each data
    file, and, for data unpacked by :func:`download_data`, the hub revision and data.zip's sha256
    (``source``; None for a folder of the user's)."""
    paths = [data_file(task, data_dir, longbench_e) for task in tasks]
    source_file = paths[0].parent / SOURCE_FILE if paths else Path(data_dir) / SOURCE_FILE
    source = json.loads(source_file.read_text(encoding="utf-8")) if source_file.exists() else None
    config = {name: sha256_of(config_file(name)) for name in (PROMPTS_FILE, MAXLEN_FILE)}
    return {
        "config": {"source": CONFIG_SOURCE, "sha256": config},
        "data": {"dir": str(data_dir), "source": source, "sha256": {p.name: sha256_of(p) for p in paths}},
    }


def load_examples(
    task: str, data_dir: str | Path, longbench_e: bool = False, limit: int | None = None
) -> list[dict]:
    """The first ``limit`` examples of ``<data_dir>/<task>[_e].jsonl`` (``<data_dir>/data/`` also works)."""
    path = data_file(task, data_dir, longbench_e)
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
