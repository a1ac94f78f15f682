"""lm-evaluation-harness model type ``sparse-llm``: any lm-eval task through a sparse attention method.

Importing this module registers the model type with lm-eval (lm-eval has no entry-point discovery;
importing ``sparse_llm`` alone imports nothing of lm-eval). It is lm-eval's ``hf`` model (``HFLM``)
whose ``_model_call`` (log-likelihoods) and ``_model_generate`` (generation) run inside
:func:`sparse_llm.sparse_attention`, the shape of lm-eval's ``hf_steered.py``; the tasks are lm-eval's
own, unchanged. In ``model_args``:

- ``method``: a registered method (``sparse-llm methods``), default ``dense``; ``sdpa`` is the
  unpatched model, for a baseline from the same code path;
- the method's parameters by name, e.g. ``sink_tokens=128,local_tokens=1024,block_size=64``;
- ``HFLM``'s own arguments (``batch_size``, ``dtype``, ``max_length``, ``parallelize``, ...) and the
  ``from_pretrained`` options of :data:`FROM_PRETRAINED_OPTIONS` (``device_map``, ``load_in_4bit``,
  ...) go to ``HFLM``; any other key is a method parameter, so a misspelt one is an error before the
  model loads;
- ``pretrained`` may name an embedded model (``gemma3-270m``), resolved to its built local checkpoint.

``sparse-llm eval lm-eval ARGS`` is lm-eval's own command line (:func:`main`): ``lm-eval ARGS`` with this
model type registered, lm-eval's flags and output files. From Python::

    import lm_eval
    from sparse_llm.eval.lm_eval_plugin import resolve_pretrained  # importing it registers "sparse-llm"

    path = resolve_pretrained("gemma3-270m")
    lm_eval.simple_evaluate(model="sparse-llm", model_args=f"pretrained={path},method=streaming",
                            tasks=["niah_single_1"], metadata={"max_seq_lengths": [4096], "pretrained": path})

(RULER reads its tokenizer from ``metadata["pretrained"]``; the command line puts the resolved path
there itself.) lm-eval's ``results["config"]`` gets a ``sparse_llm`` entry: the method, its
parameters and the mean prefill density measured during the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

try:
    import lm_eval
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # a ModuleNotFoundError, so that `sparse-llm eval` lists the task as unavailable
    raise ModuleNotFoundError(
        f'the lm-eval plugin needs lm-eval: pip install "sparse-llm[eval]" ({err})'
    ) from err

import sparse_llm
from sparse_llm.eval import common
from sparse_llm.eval.longbench import PrefillDensity
from sparse_llm.eval.longbench_data import E_TASKS, TASKS, how_to_get
from sparse_llm.results import atomic_write_text

logger = logging.getLogger(__name__)

MODEL_TYPE = "sparse-llm"
_HOW_TO_GET = how_to_get("--longbench-data")  # this command's flag, not eval longbench's --data-dir


def resolve_pretrained(pretrained: str) -> str:
    """The local checkpoint of an embedded model name (built on first use); other names unchanged.

    A missing local folder or a misspelt embedded name raises here (:func:`sparse_llm.models.check_model`),
    before lm-eval asks the hub for it.
    """
    from sparse_llm import models

    models.check_model(pretrained, shapes=False)
    if pretrained not in models.list_models():
        return pretrained
    return str(models.ensure_built(pretrained))


def method_parameters(method: str) -> set[str]:
    """Names of the parameters of registered ``method`` (none for the ``sdpa`` baseline)."""
    if method == common.BASELINE:
        return set()
    return {f.name for f in dataclasses.fields(sparse_llm.get_method(method))}


# from_pretrained options that HFLM forwards from model_args beside its own named arguments: the ones
# lm-eval users pass. Any other key is taken as a method parameter, so that a typo ("budgett") fails
# before the model loads instead of reaching the model's constructor.
FROM_PRETRAINED_OPTIONS = frozenset(
    {
        "attn_implementation",
        "device_map",
        "low_cpu_mem_usage",
        "cache_dir",
        "local_files_only",
        "token",
        "use_safetensors",
        "torch_dtype",
        "quantization_config",
        "load_in_8bit",
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_use_double_quant",
    }
)


def hflm_arguments() -> set[str]:
    """The ``model_args`` keys for ``HFLM``: its named arguments and :data:`FROM_PRETRAINED_OPTIONS`."""
    parameters = inspect.signature(HFLM.__init__).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    return named | FROM_PRETRAINED_OPTIONS


def split_method_args(method: str, kwargs: dict) -> tuple[dict, dict]:
    """``(method parameters, the rest for HFLM)`` from ``model_args``.

    :func:`hflm_arguments` go to ``HFLM`` and every other key to the method, so that an unknown key
    (``budgett``, or ``local_tokens`` with ``method=dense``) meets the method's own check, which names
    the parameters it accepts (:class:`SparseLLM` builds the method before it loads the model).
    The ``sdpa`` baseline has no parameters: any such key raises ``ValueError`` here.
    """
    mine = method_parameters(method)  # an unknown method raises ValueError here
    hflm = hflm_arguments()
    params = {k: v for k, v in kwargs.items() if k in mine or k not in hflm}
    rest = {k: v for k, v in kwargs.items() if k not in params}
    if method == common.BASELINE and params:
        raise ValueError(
            f"the sdpa baseline takes no parameters, got {sorted(params)} (HFLM's arguments: {sorted(hflm)})"
        )
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
            f"no LongBench{'-E' if longbench_e else ''} JSONL files in {data_dir}; {_HOW_TO_GET}"
        )
    group = (
        f"group: longbench_local{suffix}\ntask:\n"
        + "".join(f"  - {n}\n" for n in names)
        + "aggregate_metric_list:\n  - metric: score\n    weight_by_size: false\nmetadata:\n  version: 1.0\n"
    )
    atomic_write_text(folder / f"longbench_local{suffix}.yaml", group)
    return names


@register_model(MODEL_TYPE)
class SparseLLM(HFLM):
    """``HFLM`` with a sparse attention method around every forward pass (see the module docstring).

    ``densities`` collects, per forward or generation, the density of the prefill (the fraction of
    causally reachable blocks computed) as reported by :func:`sparse_llm.attention_stats`, and
    ``far_densities`` its far field's (0.0 without one).
    """

    def __init__(self, pretrained="gemma3-270m", method: str = "dense", **kwargs):
        params, kwargs = split_method_args(method, kwargs)
        # Built before HFLM loads the model: a bad method parameter fails first.
        self.method = None if method == common.BASELINE else sparse_llm.get_method(method, **params)
        self.method_name, self.method_params = method, params
        if isinstance(pretrained, str):
            pretrained = resolve_pretrained(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.densities: list[float] = []
        self.far_densities: list[float] = []
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
                stats = sparse_llm.attention_stats(self.model)
                self.densities.append(stats["density"])
                self.far_densities.append(stats["far_density"])
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
            self.far_densities.append(probe.far_density)
        return out

    def get_model_info(self) -> dict:
        """``HFLM``'s model info plus ``sparse_llm``: method, parameters and the run's mean prefill
        density (this process's share under data parallelism; None for ``sdpa``), into lm-eval's
        ``results["config"]``."""
        density = sum(self.densities) / len(self.densities) if self.densities else None
        far = sum(self.far_densities) / len(self.far_densities) if self.far_densities else None
        return {
            **super().get_model_info(),
            "sparse_llm": {
                "version": sparse_llm.__version__,
                "method": self.method_name,
                "params": self.method_params,
                "density": density,
                "far_density": far,
                "forwards": len(self.densities),
            },
        }


# ------------------------------------------------------------------ `sparse-llm eval lm-eval`

_SUBCOMMANDS = ("run", "ls", "validate")  # lm-eval's; without one, lm-eval runs `run`
_PRETRAINED = re.compile(r"(^|,)pretrained=([^,]*)")


def _resolve_model_args(value: str) -> str:
    """One ``--model_args`` value (``k=v,k=v`` or JSON) with an embedded ``pretrained`` resolved."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("pretrained"), str):
            parsed["pretrained"] = resolve_pretrained(parsed["pretrained"])
        return json.dumps(parsed)
    return _PRETRAINED.sub(lambda m: m.group(1) + "pretrained=" + resolve_pretrained(m.group(2)), value)


def stock_argv(argv: list[str]) -> list[str]:
    """``argv`` as lm-eval's own command line takes it.

    - ``--model sparse-llm`` is added to a run that names no ``--model`` (lm-eval's default is ``hf``)
      and no ``--config``;
    - an embedded model name in ``--model_args pretrained=...`` becomes its built checkpoint, so the
      model and the task metadata (RULER's tokenizer) both get the path;
    - our hyphenated spellings are accepted: ``--model-args`` is ``--model_args``, and so on.
    """
    out, in_model_args = [], False
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token.partition("=")
            token = "--" + name[2:].replace("-", "_") + eq + value
        if token.startswith("-"):
            in_model_args = token in ("--model_args", "-a")
            if token.startswith("--model_args="):
                token = "--model_args=" + _resolve_model_args(token.partition("=")[2])
        elif in_model_args and not {"-h", "--help"} & set(argv):
            token = _resolve_model_args(token)
        out.append(token)
    is_run = not out or out[0] not in _SUBCOMMANDS or out[0] == "run"
    named = any(
        t in ("--model", "-M", "--config", "-C") or t.startswith(("--model=", "--config=")) for t in out
    )
    if is_run and not named and any(t in ("--tasks", "-t") or t.startswith("--tasks=") for t in out):
        out += ["--model", MODEL_TYPE]
    return out


def _pop_longbench_data(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--longbench_data DIR`` (or ``--longbench-data``), and DIR."""
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if name in ("--longbench_data", "--longbench-data"):
            if eq:
                return argv[:i] + argv[i + 1 :], value
            if i + 1 == len(argv):
                raise ValueError("--longbench-data needs a folder of the official LongBench JSONL files")
            return argv[:i] + argv[i + 2 :], argv[i + 1]
    return argv, None


def main(argv: list[str]) -> int:
    """``sparse-llm eval lm-eval ARGS``: lm-eval's own command line (``lm-eval ARGS``, see ``lm-eval run
    --help``) with the ``sparse-llm`` model type registered and :func:`stock_argv`'s conveniences.

    One flag of ours: ``--longbench-data DIR`` adds the tasks ``longbench_local_<task>[_e]`` and the
    groups ``longbench_local[_e]`` over the official JSONL files in DIR (:func:`write_lm_eval_tasks`),
    as lm-eval's ``--include_path``; to combine them with other task folders, write them with
    :func:`write_lm_eval_tasks` into that folder instead.
    """
    argv, longbench_data = _pop_longbench_data(list(argv))
    argv = stock_argv(argv)
    with contextlib.ExitStack() as stack:
        if longbench_data is not None:
            if any(t == "--include_path" or t.startswith("--include_path=") for t in argv):
                raise ValueError(
                    "--longbench-data and --include_path together: write the LongBench tasks into your "
                    "task folder with sparse_llm.eval.lm_eval_plugin.write_lm_eval_tasks(data_dir, folder)"
                )
            if not Path(longbench_data).is_dir():
                raise FileNotFoundError(f"LongBench data folder {longbench_data} not found; {_HOW_TO_GET}")
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparse-llm-tasks-"))
            found = [_local_longbench(longbench_data, folder, e) for e in (False, True)]
            if not any(found):
                raise FileNotFoundError(f"no LongBench JSONL files in {longbench_data}; {_HOW_TO_GET}")
            argv += ["--include_path", folder]
        stack.enter_context(_one_line_usage_errors())
        saved = sys.argv
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
            _close_process_group()
    return 0


def _close_process_group():
    """Shut down the process group that ``accelerate launch`` / ``torchrun`` made us join: left to the
    interpreter's exit, gloo's worker threads can outlive it and abort the process (SIGABRT) after
    the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _one_line_usage_errors():
    """While lm-eval parses its command line, a usage error is one line (``prog: error: message``,
    exit 2) as in every other sparse-llm command, instead of argparse's usage block first."""
    import argparse

    def error(parser, message):
        parser.exit(2, f"{parser.prog}: error: {message} (see sparse-llm eval lm-eval --help)\n")

    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def _local_longbench(data_dir: str, folder: str, longbench_e: bool) -> list[str]:
    try:
        return write_lm_eval_tasks(data_dir, folder, longbench_e)
    except FileNotFoundError:  # no files of this variant
        return []
