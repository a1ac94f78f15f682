"""Evaluations, each a module with ``add_arguments(parser)`` and ``run_from_args(args) -> int``.

``list_tasks()`` names them; ``task_module(name)`` imports one lazily (lm-eval and datasets are
optional, so nothing heavy is imported until a task runs). Shared pieces: ``haystack`` (needle prompts),
:mod:`sparse_llm.texts` (offline long texts) and :mod:`sparse_llm.results` (result files, resume).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sparse_llm.names import unknown_name

_TASKS = {
    "niah": ("sparse_llm.eval.niah", "needle-in-a-haystack grid (context length x depth), heatmap"),
    "sweep": ("sparse_llm.eval.sweep", "methods x budgets x lengths on the needle grid, Pareto plots"),
    "mqar": ("sparse_llm.eval.mqar", "multi-query associative recall: prompted LLM or tiny trained model"),
    "longbench": ("sparse_llm.eval.longbench", "LongBench / LongBench-E, official prompts and metrics"),
    "lm-eval": ("sparse_llm.eval.lm_eval_plugin", "lm-evaluation-harness tasks through the sparse-llm model"),
}


def list_tasks() -> dict[str, str]:
    """Evaluation names with one-line descriptions."""
    return {name: description for name, (_, description) in _TASKS.items()}


def task_module(name: str) -> ModuleType:
    """The module of evaluation ``name``; unknown names raise a ValueError with close matches."""
    if name not in _TASKS:
        raise unknown_name("evaluation", name, _TASKS)
    return importlib.import_module(_TASKS[name][0])
