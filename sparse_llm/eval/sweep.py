"""``sparse-llm eval sweep``: methods x budgets x lengths on the needle grid, as Pareto frontiers.

A *point* is one method setting at one context length: a registered method with its parameters (one
of its ``budgets`` and one combination of its ``grid`` values), or ``"sdpa"`` (the unpatched model).
Each point answers the needle test (:mod:`sparse_llm.eval.niah`) at every depth and is written as one
record: accuracy (exact match over the depths; RULER's string_match_all under ``--protocol ruler``),
accuracy over the depths whose needle lies outside the method's local window (``accuracy_far``), the
mean measured density (:func:`sparse_llm.attention_stats` after each prefill) and the mean prefill
seconds, with the per-depth details. ``results.json`` adds the speedup over sdpa at each length, the
Pareto frontiers, and per method the smallest density at which it matches the reference accuracy
(sdpa, else a point that computed every block, as ``dense`` does); ``sweep-L<length>.png`` draws them
(:func:`sparse_llm.eval.plots.plot_sweep`).

Budgets are tokens (``512``, ``4k``) or fractions of the context length (``1/8``, ``0.125``: the
length times the fraction, rounded up to a multiple of the method's ``block_size``). They go to the
methods whose dataclass has a ``budget`` field, or which declare how a budget maps to their
parameters with a classmethod ``params_for_budget(budget: int, params: dict) -> dict`` (e.g. a window
method returning ``local_tokens = budget - sink_tokens``). Other methods run once per length. A setting
that its method rejects (e.g. a budget below ``sink_tokens + local_tokens``) is skipped with a warning
and listed in ``results.json``. Prefill times are single measurements beside a score, not a benchmark
(``sparse-llm bench`` reports medians of repeated runs).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import sys
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sparse_llm
from sparse_llm.eval import niah
from sparse_llm.eval.common import (
    BASELINE,
    MethodSpec,
    applied,
    comma_list,
    default_out,
    json_object,
    prefill_and_generate,
    show_progress,
)
from sparse_llm.eval.plots import plot_sweep
from sparse_llm.results import RESULTS_FILE, ResultsStore

logger = logging.getLogger(__name__)

TASKS = ("niah",)
DEFAULT_METHODS = "sdpa,dense,block_topk,dhsa"
DEFAULT_BUDGETS = "1/16,1/8,1/4"
Budget = int | Fraction  # tokens, or a fraction of the context length


# ------------------------------------------------------------------------------------- budgets


def parse_budget(value) -> Budget:
    """``512``, ``"512"``, ``"4k"`` -> 512 / 4096 tokens; ``"1/8"``, ``"0.125"``, ``0.125`` ->
    ``Fraction(1, 8)`` of the context length. Raises ``ValueError`` for anything else, zero or
    negative tokens, and fractions outside (0, 1]."""
    bad = (
        f"bad budget {value!r}: use tokens (e.g. 512 or 4k) or a fraction of the context length "
        "in (0, 1] (e.g. 1/8 or 0.125)"
    )
    if isinstance(value, bool):
        raise ValueError(bad)
    if isinstance(value, (int, Fraction)):
        budget = value
    elif isinstance(value, float):
        budget = Fraction(repr(value))
    else:
        text = str(value).strip().lower()
        try:
            if re.fullmatch(r"\d+k?", text):
                budget = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
            else:
                budget = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(bad) from None
    if isinstance(budget, int) and budget < 1 or isinstance(budget, Fraction) and not 0 < budget <= 1:
        raise ValueError(bad)
    return budget


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"1/16,1/8,512"`` -> ``(Fraction(1, 16), Fraction(1, 8), 512)``; ``""`` -> ``()``."""
    return tuple(parse_budget(x) for x in comma_list(text))


def format_budget(budget: Budget) -> str:
    """``512`` -> ``"512"``, ``Fraction(1, 8)`` -> ``"1/8"`` (``"1/1"`` for the whole length)."""
    return str(budget) if isinstance(budget, int) else f"{budget.numerator}/{budget.denominator}"


def resolve_budget(budget: Budget, length: int, block_size: int) -> int:
    """Tokens of ``budget`` at ``length``: a fraction is rounded to tokens, then up to whole blocks."""
    if isinstance(budget, int):
        return budget
    tokens = round(length * budget)
    return max(block_size, -(-tokens // block_size) * block_size)


# -------------------------------------------------------------------------------------- config


@dataclass
class Point:
    """One method setting at one length; ``budget`` in tokens (None: the method has none swept)."""

    method: str
    params: dict
    length: int
    budget: int | None = None
    budget_spec: str | None = None  # the budget as given (``"1/8"``), for swept budgets

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.method, self.params)

    @property
    def id(self) -> str:
        return f"L{self.length}-{self.spec.label}"


@dataclass
class SweepConfig:
    """A sweep of method settings over the needle grid.

    Args:
        niah: the task: model, device, dtype, lengths, depths, needle, haystack, max_new_tokens,
            chat_template (its own ``methods`` and ``method_params`` are not used).
        methods: registered methods; ``"sdpa"`` is the unpatched model (speedups are relative to it).
        method_params: fixed parameters per method, e.g. ``{"dhsa": {"dense_tail_blocks": 0}}``; a
            ``budget`` given here (or a parameter ``params_for_budget`` sets) is not swept.
        budgets: tokens (int) or fractions of the length (``Fraction``, ``"1/8"``, ``0.125``) for the
            methods with a ``budget`` field or a ``params_for_budget`` classmethod; empty: none swept.
        grid: value lists per method and parameter, run as their cartesian product (times the
            budgets), e.g. ``{"dhsa": {"chunk_size": [32, 64]}}``.
    """

    niah: niah.NiahConfig = field(default_factory=lambda: niah.NiahConfig(methods=(BASELINE,)))
    methods: tuple[str, ...] = tuple(comma_list(DEFAULT_METHODS))
    method_params: dict[str, dict] = field(default_factory=dict)
    budgets: tuple[Budget, ...] = tuple(comma_list(DEFAULT_BUDGETS))
    grid: dict[str, dict[str, list]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.niah, niah.NiahConfig):
            raise TypeError(f"niah must be a NiahConfig, got {type(self.niah).__name__}")
        self.methods = tuple(dict.fromkeys(self.methods))
        if not self.methods:
            raise ValueError("no method given; use e.g. --methods sdpa,dense,dhsa")
        self.budgets = tuple(dict.fromkeys(parse_budget(b) for b in self.budgets))
        for option in ("method_params", "grid"):
            given = getattr(self, option)
            if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
                raise ValueError(f"{option} must map method names to parameter dicts, got {given!r}")
            unknown = set(given) - set(self.methods)
            if unknown:
                raise ValueError(
                    f"{option} given for methods not run: {sorted(unknown)}; methods: {list(self.methods)}"
                )
            if given.get(BASELINE):
                raise ValueError(f"the sdpa baseline takes no parameters ({option})")
        for name in self.methods:
            if name == BASELINE:
                continue
            accepted = {f.name for f in fields(sparse_llm.get_method(name))}  # unknown names fail here
            params, grid = self.method_params.get(name, {}), self.grid.get(name, {})
            unknown, both = sorted((set(params) | set(grid)) - accepted), sorted(set(params) & set(grid))
            if unknown:
                raise ValueError(
                    f"method {name!r} got unknown parameters {unknown}; it accepts {sorted(accepted)}"
                )
            if both:
                raise ValueError(f"{name}: give {both} in method_params or in grid, not in both")
            for key, values in grid.items():
                if not isinstance(values, (list, tuple)) or not values:
                    raise ValueError(f"grid values must be non-empty lists, got {name}.{key} = {values!r}")
        if self.niah.lengths is not None:
            self.points(self.niah.lengths)  # settings no method accepts fail before the model loads

    def settings(self, name: str, length: int) -> list[tuple[dict, int | None, str | None]]:
        """``(params, budget tokens, budget as given)`` of method ``name`` at ``length``."""
        if name == BASELINE:
            return [({}, None, None)]
        default = sparse_llm.get_method(name)
        has_budget = "budget" in {f.name for f in fields(default)}
        to_params = getattr(type(default), "params_for_budget", None)
        grid = self.grid.get(name, {})
        out = []
        for combo in itertools.product(*grid.values()):
            params = {**self.method_params.get(name, {}), **dict(zip(grid, combo, strict=True))}
            # A budget, or a parameter the budget would set (a window), fixed by the user: not swept.
            fixed = "budget" in params or (to_params is not None and set(to_params(1, {})) & set(params))
            if fixed or not self.budgets or not (has_budget or to_params):
                out.append((params, params.get("budget"), None))
                continue
            block_size = params.get("block_size", default.block_size)
            for budget in self.budgets:
                tokens = resolve_budget(budget, length, block_size)
                swept = {**params, "budget": tokens} if has_budget else to_params(tokens, dict(params))
                out.append((swept, tokens, format_budget(budget)))
        return out

    def points(self, lengths) -> tuple[list[Point], list[dict]]:
        """The points to run, in order (lengths, methods, settings), and the settings skipped because
        their method rejects them: ``{"id", "method", "params", "length", "budget", "reason"}``.

        Raises ``ValueError`` when a method has no accepted setting at any length."""
        points, skipped, seen = [], [], set()
        for length in lengths:
            for name in self.methods:
                for params, budget, spec in self.settings(name, length):
                    point = Point(name, params, length, budget, spec)
                    if point.id in seen:  # e.g. budgets 1/8 and 512 at 4096 tokens
                        continue
                    seen.add(point.id)
                    try:
                        if name != BASELINE:
                            sparse_llm.get_method(name, **params)
                    except (TypeError, ValueError) as err:
                        skipped.append(
                            {
                                "id": point.id,
                                "method": name,
                                "params": params,
                                "length": length,
                                "budget": budget,
                                "reason": str(err),
                            }
                        )
                        continue
                    points.append(point)
        for name in self.methods:
            if not any(p.method == name for p in points):
                reason = next(s["reason"] for s in skipped if s["method"] == name)
                raise ValueError(f"no setting of {name} is valid at lengths {list(lengths)}: {reason}")
        return points, skipped

    def run_config(self, lengths) -> dict:
        """The JSON-able configuration stored in the results folder (resume compares it)."""
        task = {k: v for k, v in niah.run_fields(self.niah).items() if k not in ("methods", "method_params")}
        return {
            "task": "sweep",
            "sweep_task": "niah",
            **task,
            "lengths": list(lengths),
            "depths": list(self.niah.depths),
            "methods": list(self.methods),
            "method_params": self.method_params,
            "budgets": [format_budget(b) for b in self.budgets],
            "grid": self.grid,
        }


# ---------------------------------------------------------------------------------------- runs


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _local_window(point: Point) -> int | None:
    """The method's fixed local window in tokens (None: sdpa, no window, or one set per length)."""
    if point.method == BASELINE:
        return None
    return getattr(sparse_llm.get_method(point.method, **point.params), "local_tokens", None)


def run_point(
    model,
    tokenizer,
    point: Point,
    prompts: list,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
    protocol: str = "default",
) -> dict:
    """The record of ``point``: every depth's needle prompt (``prompts``, one per depth) answered,
    prefilled whole or ``prefill_chunk`` tokens at a time, scored by
    :func:`~sparse_llm.eval.niah.score_reply` in ``protocol`` (accuracy: its metric)."""
    metric = niah.METRICS[protocol]
    window = _local_window(point)
    depths = []
    for p in prompts:
        with applied(model, point.spec):
            gen = prefill_and_generate(
                model,
                p.input_ids.to(model.device),
                max_new_tokens,
                sparse=point.method != BASELINE,
                prefill_chunk=prefill_chunk,
            )
        reply = tokenizer.decode(gen.ids[0], skip_special_tokens=True)
        start, end = p.needle_span
        depths.append(
            {
                "depth": p.depth,
                "needle_depth": p.needle_depth,
                "needle_position": start,
                "needle_span": [start, end],
                "outside_local": window is None or end <= point.length - window,
                "needle": p.needle_text,
                "generated": reply,
                **niah.score_reply(reply, p.answer, protocol),
                "prefill_s": gen.prefill_s,
                "density": gen.density,
                "far_density": gen.far_density,
            }
        )
    far = [d[metric] for d in depths if d["outside_local"]]
    return {
        "id": point.id,
        "protocol": protocol,
        "method": point.method,
        "label": point.spec.label,
        "params": point.params,
        "length": point.length,
        "budget": point.budget,
        "budget_spec": point.budget_spec,
        "local_tokens": window,
        "accuracy": _mean(d[metric] for d in depths),
        "accuracy_far": _mean(far),
        "far_depths": len(far),
        "density": _mean(d["density"] for d in depths),
        "far_density": _mean(d.get("far_density") for d in depths),
        "prefill_s": _mean(d["prefill_s"] for d in depths),
        "depths": depths,
    }


def _pareto(rows: list[dict], key: str, larger_is_better: bool) -> list[str]:
    """Ids of the rows no other row beats on both ``key`` and accuracy, in order of ``key``."""
    rows = sorted(
        (r for r in rows if r[key] is not None and r["accuracy"] is not None),
        key=lambda r: (-r[key] if larger_is_better else r[key], -r["accuracy"]),
    )
    out, best = [], float("-inf")
    for r in rows:
        if r["accuracy"] > best:
            out.append(r["id"])
            best = r["accuracy"]
    return out


def summarize(records: list[dict], points: list[Point], skipped: list[dict]) -> dict:
    """Scores of the finished points: one row per point (the record without its depths, plus the
    speedup over sdpa at its length) and per length the reference (sdpa, else the first point that
    computed every block), the smallest density at which each other method matches its accuracy
    (``matches_reference``: None where none does) and both Pareto frontiers (``pareto_density``,
    ``pareto_speedup``: point ids)."""
    by_id = {r["id"]: r for r in records}
    rows = [{k: v for k, v in by_id[p.id].items() if k != "depths"} for p in points if p.id in by_id]
    for r in rows:  # what was computed: the exact blocks plus any far field, in the same units
        r["attended"] = None if r["density"] is None else r["density"] + (r.get("far_density") or 0.0)
    by_length = {}
    for length in dict.fromkeys(p.length for p in points):
        here = [r for r in rows if r["length"] == length]
        sdpa = next((r for r in here if r["method"] == BASELINE), None)
        for r in here:
            r["speedup"] = sdpa["prefill_s"] / r["prefill_s"] if sdpa and r["prefill_s"] else None
        full = [r for r in here if r["density"] is not None and r["density"] >= 1 - 1e-9]
        reference = sdpa or (full[0] if full else None)
        matches = {}
        others = [
            r["method"] for r in here if r["method"] not in (BASELINE, reference and reference["method"])
        ]
        for name in dict.fromkeys(others):
            ok = [
                r
                for r in here
                if r["method"] == name
                and r["attended"] is not None
                and reference is not None
                and r["accuracy"] >= reference["accuracy"] - 1e-9
            ]
            best = min(ok, key=lambda r: (r["attended"], -r["accuracy"]), default=None)
            keep = ("id", "density", "far_density", "attended", "accuracy", "budget", "params")
            matches[name] = best and {k: best.get(k) for k in keep}
        by_length[str(length)] = {
            "reference": reference and {k: reference[k] for k in ("id", "method", "accuracy")},
            "sdpa_prefill_s": sdpa["prefill_s"] if sdpa else None,
            "matches_reference": matches,
            "pareto_density": _pareto(here, "attended", larger_is_better=False),
            "pareto_speedup": _pareto(here, "speedup", larger_is_better=True),
        }
    return {
        "points": len(rows),
        "points_total": len(points),
        "rows": rows,
        "by_length": by_length,
        "skipped": skipped,
    }


def run_sweep(
    config: SweepConfig, out: str | Path | None = None, resume: bool = False, progress: bool | None = None
) -> dict:
    """Run every point of ``config``, writing a results folder and one Pareto PNG per length.

    Args:
        config: the sweep.
        out: results folder (default ``results/sweep-<config hash>``); an existing one needs ``resume``.
        resume: continue an interrupted run in ``out``: points already in its ``samples.jsonl`` are
            not run again (the configuration must be the same).
        progress: a progress bar over points; default: when stderr is a terminal.

    Returns ``{"folder", "config", "scores", "plots"}`` (``scores`` as in ``results.json``). Inputs
    are checked before the folder is created, as in :func:`sparse_llm.eval.niah.run_niah`.
    """
    task = config.niah
    text = task.haystack_text()
    lengths, model, tokenizer = task.load()
    points, skipped = config.points(lengths)

    @functools.cache
    def prompts(length: int) -> list:
        return [task.build_prompt(tokenizer, text, length, d) for d in task.depths]

    prompts(lengths[0])  # the shortest length must hold intro, needle and question
    run_config = config.run_config(lengths)
    store = ResultsStore(out or default_out("sweep", run_config), run_config, resume=resume)
    for s in skipped:
        logger.warning("skipping %s: %s", s["id"], s["reason"])
    pending = [p for p in points if not store.done(p.id)]
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(
        total=len(points), initial=len(points) - len(pending), desc="sweep", unit="point", disable=not show
    ) as bar:
        for k, point in enumerate(pending):
            if k == 0:  # untimed warm-up of threads and allocator
                with torch.inference_mode():
                    model(prompts(point.length)[0].input_ids[:, :32].to(model.device))
            bar.set_postfix_str(point.id)
            record = run_point(
                model,
                tokenizer,
                point,
                prompts(point.length),
                task.max_new_tokens,
                task.prefill_chunk,
                task.protocol,
            )
            store.add(record)
            logger.debug("%s: accuracy %.2f, density %s", point.id, record["accuracy"], record["density"])
            bar.update()
    scores = summarize(store.records(), points, skipped)
    store.write_results(scores, device=task.device)
    pngs = plot_sweep(store.folder)
    logger.info("sweep: %d points in %s", len(points), store.folder)
    plots = [str(p) for p in pngs]
    return {"folder": str(store.folder), "config": run_config, "scores": scores, "plots": plots}


def markdown_table(scores: dict) -> str:
    """One row per point (length, method, budget, density with any far field's as "+ far", prefill,
    speedup, accuracy, accuracy far), then per length the smallest attended density (exact + far) at
    which each method matches the reference."""

    def fmt(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        "| length | method | budget | density | prefill s | speedup | accuracy | accuracy far |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in scores["rows"]:
        density = fmt(r["density"], 3) + (f" + {r['far_density']:.3f}" if r.get("far_density") else "")
        lines.append(
            f"| {r['length']} | {r['label']} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{density} | {fmt(r['prefill_s'], 3)} | {fmt(r.get('speedup'))} | "
            f"{fmt(r['accuracy'])} | {fmt(r['accuracy_far'])} |"
        )
    matches = []
    for length, info in scores["by_length"].items():
        ref = info["reference"]
        for name, m in info["matches_reference"].items() if ref else ():
            found = f"from density {m.get('attended', m['density']):.3f} ({m['id']})" if m else "never"
            matches.append(f"{length} tokens: {name} matches {ref['method']} ({ref['accuracy']:.2f}) {found}")
    return "\n".join(lines + [""] + matches if matches else lines)


# ----------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    niah.add_arguments(parser)  # model, methods, lengths, depths, needle, haystack...: same meanings
    parser.set_defaults(methods=comma_list(DEFAULT_METHODS))
    for action in parser._actions:  # same flags; the help text says what they do here
        if action.dest == "plot_only":
            action.help = "redraw the sweep-L<length>.png plots of the --out folder"
        elif action.dest == "methods":
            action.help += f" (default {DEFAULT_METHODS})"
    parser.add_argument("--task", choices=TASKS, default="niah", help="the swept task (default niah)")
    parser.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="tokens (512, 4k) or fractions of the length (1/8, 0.125; rounded up to whole blocks) "
        "for methods with a budget; '' for none (default %(default)s)",
    )
    parser.add_argument(
        "--grid",
        type=json_object,
        default={},
        help='JSON value lists per method, run as a product, e.g. \'{"dhsa": {"chunk_size": [32, 64]}}\'',
    )


def run_from_args(args) -> int:
    if args.plot_only:
        if not args.out:
            raise ValueError("--plot-only needs --out <results folder>")
        pngs = plot_sweep(args.out)
        print(markdown_table(json.loads((Path(args.out) / RESULTS_FILE).read_text())["scores"]))
        print("plots: " + " ".join(map(str, pngs)))
        return 0
    task = niah.config_from_args(args, methods=(BASELINE,))
    config = SweepConfig(
        niah=task,
        methods=args.methods,
        method_params=args.method_params,
        budgets=parse_budgets(args.budgets),
        grid=args.grid,
    )
    result = run_sweep(config, out=args.out, resume=args.resume, progress=show_progress(args))
    print(markdown_table(result["scores"]))
    print(f"results: {result['folder']}  plots: {' '.join(result['plots'])}")
    return 0
