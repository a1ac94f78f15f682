"""lm-evaluation-harness model type ``sparse-llm``: any lm-eval task through a sparse attention method.

Importing this module registers the model type with lm-eval (lm-eval has no entry-point discovery;
importing ``sparse_llm`` alone imports nothing of lm-eval). It is lm-eval's ``hf`` model (``HFLM``)
whose ``_model_call`` (log-likelihoods) and ``_model_generate`` (generation) run inside
:func:`sparse_llm.sparse_attention`, the shape of lm-eval's ``hf_steered.py``; the tasks are lm-eval's
own, unchanged. In ``model_args``:

- ``method``: a registered method (``sparse-llm methods``), default ``dense``; ``sdpa`` is the
  unpatched model, for a baseline from the same code path;
- the method's parameters by name, e.g. ``sink_tokens=128,local_tokens=1024,block_size=64``;
- everything else goes to ``HFLM`` (``batch_size``, ``dtype``, ``max_length``, ``parallelize``, ...);
- ``pretrained`` may name an embedded model (``gemma3-270m``), resolved to its built local checkpoint.

From Python::

    import lm_eval
    import sparse_llm.eval.lm_eval_plugin  # registers "sparse-llm"

    lm_eval.simple_evaluate(model="sparse-llm", model_args="pretrained=gemma3-270m,method=streaming",
                            tasks=["niah_single_1"], metadata={"max_seq_lengths": [4096]})

or :func:`run_lm_eval` / ``sparse-llm eval lm-eval``, which also resolve the embedded name in the task
metadata (RULER reads its tokenizer from ``metadata["pretrained"]``) and write a results file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, simple_parse_args_string
except ImportError as err:  # a ModuleNotFoundError, so that `sparse-llm eval` lists the task as unavailable
    raise ModuleNotFoundError(
        f'the lm-eval plugin needs lm-eval: pip install "sparse-llm[eval]" ({err})'
    ) from err

import sparse_llm
from sparse_llm.eval import common
from sparse_llm.eval.longbench import PrefillDensity
from sparse_llm.eval.longbench_data import E_TASKS, HOW_TO_GET, TASKS
from sparse_llm.results import atomic_write_json, atomic_write_text, run_metadata

logger = logging.getLogger(__name__)

MODEL_TYPE = "sparse-llm"


def resolve_pretrained(pretrained: str) -> str:
    """The local checkpoint of an embedded model name (built on first use); other names unchanged."""
    from sparse_llm import models

    if pretrained not in models.list_models():
        return pretrained
    return str(models.ensure_built(pretrained))


def method_parameters(method: str) -> set[str]:
    """Names of the parameters of registered ``method`` (none for the ``sdpa`` baseline)."""
    if method == common.BASELINE:
        return set()
    return {f.name for f in dataclasses.fields(sparse_llm.get_method(method))}


def split_method_args(method: str, kwargs: dict) -> tuple[dict, dict]:
    """``(method parameters, the rest for HFLM)`` from ``model_args``; a parameter of another method
    (say ``local_tokens`` with ``method=dense``) raises ValueError instead of reaching ``from_pretrained``."""
    mine = method_parameters(method)  # an unknown method raises ValueError here
    params = {k: v for k, v in kwargs.items() if k in mine}
    rest = {k: v for k, v in kwargs.items() if k not in mine}
    others = set().union(*(method_parameters(m) for m in sparse_llm.list_methods())) - mine
    stray = sorted(others & set(rest))
    if stray:
        raise ValueError(f"{stray} are not parameters of method {method!r}; its parameters: {sorted(mine)}")
    return params, rest


def lm_eval_docs(dataset):
    """lm-eval ``process_docs`` for the official JSONL: its ``input`` is the stock prompts' ``question``."""
    return dataset.map(lambda doc: {"question": doc["input"]})


def write_lm_eval_tasks(data_dir: str | Path, folder: str | Path, longbench_e: bool = False) -> list[str]:
    """lm-eval task YAMLs over local official JSONL files, for ``--include-path folder``; their names.

    One ``longbench_local_<task>[_e]`` per ``<task>[_e].jsonl`` found in ``data_dir``, each the stock
    lm-eval task (``include:``, so prompts, lengths and metrics stay lm-eval's) with ``dataset_path:
    json`` and ``data_files`` pointing at the file, plus a group ``longbench_local[_e]`` of them all.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stock = Path(lm_eval.__file__).parent / "tasks" / "longbench"
    suffix = "_e" if longbench_e else ""
    names = []
    for task in E_TASKS if longbench_e else TASKS:
        path = Path(data_dir) / f"{task}{suffix}.jsonl"
        if not path.exists():
            continue
        name = f"longbench_local_{task}{suffix}"
        text = (
            f"include: {json.dumps(str(stock / f'{task}{suffix}.yaml'))}\ntask: {name}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(path.resolve()))}\n"
            "process_docs: !function sparse_llm.eval.lm_eval_plugin.lm_eval_docs\n"
        )
        atomic_write_text(folder / f"{name}.yaml", text)
        names.append(name)
    if not names:
        raise FileNotFoundError(
            f"no LongBench{'-E' if longbench_e else ''} JSONL files in {data_dir}; {HOW_TO_GET}"
        )
    group = (
        f"group: longbench_local{suffix}\ntask:\n" + "".join(f"  - {n}\n" for n in names)
        + "aggregate_metric_list:\n  - metric: score\n    weight_by_size: false\nmetadata:\n  version: 1.0\n"
    )  # fmt: skip
    atomic_write_text(folder / f"longbench_local{suffix}.yaml", group)
    return names


@register_model(MODEL_TYPE)
class SparseLLM(HFLM):
    """``HFLM`` with a sparse attention method around every forward pass (see the module docstring).

    ``densities`` collects, per forward or generation, the density of the prefill (the fraction of
    causally reachable blocks computed) as reported by :func:`sparse_llm.attention_stats`.
    """

    def __init__(self, pretrained="gemma3-270m", method: str = "dense", **kwargs):
        params, kwargs = split_method_args(method, kwargs)  # HFLM would pass them on to from_pretrained
        self.method = None if method == common.BASELINE else sparse_llm.get_method(method, **params)
        if isinstance(pretrained, str):
            pretrained = resolve_pretrained(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.densities: list[float] = []
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and self._world_size == 1 and accelerator.num_processes > 1:
            # HFLM shares the work out between the processes of `accelerate launch` only when it
            # counts several GPUs; on CPU (gloo) every process would run the whole task: split it too.
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            logger.info("data parallel on %s: process %d of %d", self.device, self._rank, self._world_size)

    def _sparse(self):
        if self.method is None:
            return contextlib.nullcontext()
        return sparse_llm.sparse_attention(self.model, self.method)

    def _model_call(self, *args, **kwargs):
        with self._sparse():
            logits = super()._model_call(*args, **kwargs)
            if self.method is not None:
                self.densities.append(sparse_llm.attention_stats(self.model)["density"])
        return logits

    def _model_generate(self, *args, **kwargs):
        probe = None
        if self.method is not None:
            from transformers import LogitsProcessorList

            probe = PrefillDensity(self.model)
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), probe])
        with self._sparse():
            out = super()._model_generate(*args, **kwargs)
        if probe is not None and probe.density is not None:
            self.densities.append(probe.density)
        return out


@dataclass
class LmEvalConfig:
    """One ``lm_eval.simple_evaluate`` run through the ``sparse-llm`` model type.

    ``model_args`` as lm-eval takes them (``"pretrained=...,method=..."`` or a dict); ``include_path``
    adds a folder of task YAMLs (``include_defaults=False`` then skips indexing lm-eval's own ~10k
    tasks, which takes seconds); ``longbench_data``, a folder of the official LongBench JSONL files,
    adds the tasks ``longbench_local_<task>[_e]`` and groups ``longbench_local[_e]`` over them (see
    :func:`write_lm_eval_tasks`); ``metadata`` goes to the tasks (RULER: ``max_seq_lengths``).
    """

    tasks: tuple[str, ...]
    model_args: str | dict = "pretrained=gemma3-270m,method=dense"
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 1
    device: str | None = None
    include_path: str | None = None
    include_defaults: bool = True
    longbench_data: str | None = None
    apply_chat_template: bool = False
    gen_kwargs: str | None = None
    metadata: dict = field(default_factory=dict)
    log_samples: bool = False

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("no lm-eval task given; use e.g. --tasks niah_single_1,longbench_trec")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit <= 0):
            raise ValueError(f"limit must be a positive number of samples or fraction, got {self.limit!r}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise FileNotFoundError(f"include path {self.include_path} is not a folder of task YAMLs")
        if self.longbench_data is not None and not Path(self.longbench_data).is_dir():
            raise FileNotFoundError(f"LongBench data folder {self.longbench_data} not found; {HOW_TO_GET}")
        if not self.include_defaults and self.include_path is None and self.longbench_data is None:
            raise ValueError(
                "include_defaults=False needs an include_path (or longbench_data) with the tasks"
            )


def _local_longbench(data_dir: str, folder: str, longbench_e: bool) -> list[str]:
    try:
        return write_lm_eval_tasks(data_dir, folder, longbench_e)
    except FileNotFoundError:  # no files of this variant
        return []


def run_lm_eval(config: LmEvalConfig, output: str | Path | None = None) -> dict | None:
    """Evaluate; returns (and writes to ``output`` if given) ``{"config", "lm_eval", "density", ...}``.

    ``lm_eval`` holds lm-eval's results (``results``, ``groups``, ``configs``, ``versions``, ``n-shot``;
    ``samples`` only with ``log_samples``); ``density`` is the mean prefill density of the sparse
    method (None for ``sdpa``). Under a multi-process launch only rank 0 returns and writes; the other
    ranks return None.
    """
    if output is not None and Path(output).exists():
        raise FileExistsError(f"{output} exists; choose another output file or remove it")
    args = (
        dict(config.model_args)
        if isinstance(config.model_args, dict)
        else simple_parse_args_string(config.model_args)
    )
    args["pretrained"] = resolve_pretrained(args.get("pretrained", "gemma3-270m"))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")  # HFLM's default is cuda
    lm = SparseLLM.create_from_arg_obj(args, {"batch_size": config.batch_size, "device": device})
    with tempfile.TemporaryDirectory(prefix="sparse-llm-tasks-") as generated:
        include = [config.include_path] if config.include_path else []
        if config.longbench_data is not None:
            include.append(generated)
            found = [_local_longbench(config.longbench_data, generated, e) for e in (False, True)]
            if not any(found):
                raise FileNotFoundError(f"no LongBench JSONL files in {config.longbench_data}; {HOW_TO_GET}")
        task_manager = TaskManager(
            include_path=include or None, include_defaults=config.include_defaults,
            metadata={**args, **config.metadata},
        )  # fmt: skip
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(config.tasks), limit=config.limit, num_fewshot=config.num_fewshot,
            task_manager=task_manager, apply_chat_template=config.apply_chat_template,
            gen_kwargs=config.gen_kwargs, log_samples=config.log_samples,
        )  # fmt: skip
    if results is None:  # not rank 0
        return None
    results = json.loads(json.dumps(dict(results), default=handle_non_serializable))
    if not config.log_samples:
        results.pop("samples", None)
    record = {
        "config": {**dataclasses.asdict(config), "model_args": args},
        "lm_eval": results,
        "density": sum(lm.densities) / len(lm.densities) if lm.densities else None,
        **run_metadata(lm.device),
    }
    if output is not None:
        atomic_write_json(output, record)
    return record


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=common.comma_list, required=True, help="lm-eval task or group names")
    parser.add_argument(
        "--model-args", default="pretrained=gemma3-270m,method=dense",
        help="pretrained=<embedded name or HF path>,method=<method or sdpa>,<method parameters>,<HFLM args>",
    )  # fmt: skip
    parser.add_argument("--limit", type=_limit, default=None, help="samples per task (or a fraction < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", default="1", help="an int, or 'auto'")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--include-path", default=None, help="extra folder of task YAMLs")
    parser.add_argument(
        "--only-include-path", action="store_true", help="do not index lm-eval's own tasks (faster start)"
    )
    parser.add_argument(
        "--longbench-data", default=None,
        help="folder of the official LongBench JSONL files: adds the tasks longbench_local_<task>[_e] "
        "and the groups longbench_local[_e]",
    )  # fmt: skip
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--gen-kwargs", default=None, help="e.g. max_gen_toks=64,temperature=0")
    parser.add_argument(
        "--metadata", type=json.loads, default={}, help="JSON, e.g. '{\"max_seq_lengths\": [4096]}'"
    )
    parser.add_argument("--log-samples", action="store_true", help="keep per-sample records in the output")
    parser.add_argument("--output", default=None, help="results JSON (default: results/lm-eval-<hash>.json)")


def run_from_args(args) -> int:
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    config = LmEvalConfig(
        tasks=args.tasks, model_args=args.model_args, limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=batch_size, device=args.device, include_path=args.include_path,
        include_defaults=not args.only_include_path, longbench_data=args.longbench_data,
        apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs, metadata=args.metadata, log_samples=args.log_samples,
    )  # fmt: skip
    output = args.output or common.default_out("lm-eval", dataclasses.asdict(config)) + ".json"
    record = run_lm_eval(config, output)
    if record is not None:
        from lm_eval.utils import make_table

        print(make_table(record["lm_eval"]))
        logger.info("results written to %s", output)
    return 0
