"""LongBench and LongBench-E (Bai et al., ACL 2024): the data and the official protocol, no model.

The protocol is THUDM/LongBench's ``pred.py`` and ``eval.py``:

- Prompt templates and generation lengths are read at run time from the task YAMLs that lm-eval
  installs (``lm_eval/tasks/longbench/<task>[_e].yaml``: ``doc_to_text`` and ``max_gen_toks``), which
  carry the official ``config/dataset2prompt.json`` and ``dataset2maxlen.json`` values; the JSONL
  field ``input`` fills the template's ``{{question}}`` (:func:`task_spec`, :func:`render_prompt`).
- A prompt longer than ``max_length`` tokens is cut in the middle: its first and last
  ``max_length // 2`` tokens are kept (decoded and joined), since instructions sit at both ends.
- The chat template is applied when the tokenizer has one, except for the few-shot and code tasks
  (:data:`NO_CHAT`; "chat models are better off without build prompts on these tasks", ``pred.py``).
- Scores: the official metric functions, imported from ``lm_eval.tasks.longbench.metrics``; per
  example the max over the ground truths; per task the mean x100. trec, triviaqa, samsum and lsht
  predictions are cut at their first line before scoring. LongBench-E also splits by the example's
  ``length`` field (words) into 0-4k, 4-8k and 8k+.

Data: ``<data_dir>/<task>.jsonl`` and ``<task>_e.jsonl`` (the official files, fields ``input``,
``context``, ``answers``, ``length``, ``all_classes``, ``_id``), or, without a data dir, the official
``data.zip`` of the hub dataset THUDM/LongBench, downloaded once with ``huggingface_hub`` and unpacked
into the sparse-llm cache. (THUDM/LongBench is a loading-script dataset, which ``datasets`` >= 4 no
longer runs, so ``datasets.load_dataset`` cannot read it.)

lm-eval, yaml and jinja2 are imported only when a function needs them, not at import. Generation,
the score table and the run folder are in :mod:`sparse_llm.eval.longbench`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparse_llm.eval.haystack import encode

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


def metric_functions():
    try:
        from lm_eval.tasks.longbench import metrics
    except ImportError as err:  # lm-eval itself, or jieba / fuzzywuzzy / rouge of its [longbench] extra
        raise ImportError(f"the LongBench metrics need lm-eval[longbench]: {EVAL_EXTRA} ({err})") from err
    return metrics


def score_prediction(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """The official score in [0, 1] of one prediction: the best over the ground truths."""
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = getattr(metric_functions(), METRICS[task])
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
