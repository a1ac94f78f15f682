"""Plots of finished (or interrupted) evaluation runs, drawn from their result files only.

A separate step from the runs: each function reads a results folder (``config.json``,
``samples.jsonl``) and writes a PNG beside them, so a figure can be redrawn at any time
(``sparse-llm eval niah --plot-only --out FOLDER``). Figures use matplotlib's Agg canvas directly:
no global backend is switched and no display is needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from sparse_llm.results import CONFIG_FILE, RESULTS_FILE, SAMPLES_FILE

NIAH_PNG = "niah.png"
MQAR_PNG = "mqar.png"
SWEEP_PNG = "sweep-L{length}.png"
_BASELINE = "sdpa"  # the unpatched model (eval.common.BASELINE), drawn in black
_RETRIEVED, _MISSED, _NOT_RUN = "#1a9850", "#d73027", "#d9d9d9"


def read_samples(folder: str | os.PathLike) -> list[dict]:
    """The records of ``folder``'s ``samples.jsonl`` (a torn last line of a killed run is skipped)."""
    path = Path(folder) / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SAMPLES_FILE} in {folder}: not a results folder, or nothing ran yet")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def niah_grid(folder: str | os.PathLike) -> dict:
    """The needle grid of a ``niah`` results folder.

    Returns ``{"config", "lengths", "depths", "methods"}`` where ``methods`` maps each method name (in
    the run's order) to ``{"label", "exact", "rouge1"}``: float arrays ``[len(depths), len(lengths)]``
    of the protocol's score (exact match 1/0; RULER's ``string_match_all`` under ``--protocol ruler``)
    and ROUGE-1 recall, NaN for cells not run.
    """
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not a results folder")
    config = json.loads(config_path.read_text())
    if config.get("task") != "niah":
        raise ValueError(f"{folder} holds a {config.get('task')!r} run, not a niah run")
    lengths, depths = list(config["lengths"]), [float(d) for d in config["depths"]]
    shape = (len(depths), len(lengths))
    methods = {
        name: {"label": name, "exact": np.full(shape, np.nan), "rouge1": np.full(shape, np.nan)}
        for name in config["methods"]
    }
    for record in read_samples(folder):
        method = methods.get(record["method"])
        rows = [i for i, d in enumerate(depths) if math.isclose(d, record["depth"], abs_tol=1e-9)]
        if method is None or not rows or record["length"] not in lengths:
            continue  # a record from outside this grid
        cell = rows[0], lengths.index(record["length"])
        method["label"] = record.get("label", method["label"])
        method["exact"][cell] = float(record.get("string_match_all", record["exact_match"]))
        method["rouge1"][cell] = float(record["rouge1_recall"])
    return {"config": config, "lengths": lengths, "depths": depths, "methods": methods}


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot_niah(folder: str | os.PathLike) -> Path:
    """Draw ``niah.png`` in ``folder``: the classic needle heatmap, one panel per method.

    Needle depth (%) on the y axis, top = start of the haystack; context length on the x axis. A cell
    is green when the answer was retrieved (exact match), red when missed, grey when not run yet, and
    shows the ROUGE-1 recall of the answer. Each panel's title gives the method's accuracy.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    grid = niah_grid(folder)
    lengths, depths, methods = grid["lengths"], grid["depths"], grid["methods"]
    ncols = min(3, len(methods))
    nrows = -(-len(methods) // ncols)
    width, height = 1.0 + 0.9 * len(lengths), 1.2 + 0.38 * len(depths)
    fig = Figure(figsize=(ncols * max(width, 3.0), nrows * max(height, 2.5) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    cmap = ListedColormap([_MISSED, _RETRIEVED]).with_extremes(bad=_NOT_RUN)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, (ax, method) in enumerate(zip(axes.flat, methods.values(), strict=False)):
        exact = np.ma.masked_invalid(method["exact"])
        ax.imshow(exact, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (i, j), value in np.ndenumerate(method["rouge1"]):
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.2g}", ha="center", va="center", fontsize=8)
        done = method["exact"][~np.isnan(method["exact"])]
        accuracy = f"{done.mean():.2f} ({int(done.sum())}/{done.size})" if done.size else "not run"
        ax.set_title(f"{method['label']}\naccuracy {accuracy}", fontsize=9)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k % ncols == 0:
            ax.set_ylabel("needle depth (%)")
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    config = grid["config"]
    fig.suptitle(
        f"needle in a haystack: {config.get('model')}, needle {config.get('needle')}, "
        f"haystack {Path(str(config.get('haystack'))).name}  (green: retrieved, red: missed; "
        "cell: ROUGE-1 recall)",
        fontsize=10,
    )
    path = Path(folder) / NIAH_PNG
    fig.savefig(path, dpi=110)
    return path


def plot_mqar(folder: str | Path) -> Path:
    """Draw ``mqar.png`` beside ``folder``'s ``results.json``: accuracy vs budget, one panel per (T, N).

    Methods without a budget (sdpa, dense) are horizontal dashed lines. Uses matplotlib's Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    results = json.loads((folder / RESULTS_FILE).read_text())
    rows = results["scores"]["rows"]
    settings = list(dict.fromkeys((r["T"], r["N"]) for r in rows))
    fig = Figure(figsize=(4.2 * len(settings) + 1.4, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    styles = {}  # one color per method across panels
    for ax, (t, n) in zip(axes, settings, strict=True):
        here = [r for r in rows if (r["T"], r["N"]) == (t, n) and r["accuracy"] is not None]
        for method in dict.fromkeys(r["method"] for r in here):
            mine = [r for r in here if r["method"] == method]
            color = styles.setdefault(method, "k" if method == _BASELINE else f"C{len(styles)}")
            if mine[0]["budget"] is None:  # sdpa, dense: one accuracy, drawn across the panel
                ls = ":" if method == _BASELINE else "--"
                ax.axhline(mine[0]["accuracy"], ls=ls, color=color, label=method)
            else:
                budgets_, accs = [r["budget"] for r in mine], [r["accuracy"] for r in mine]
                ax.plot(budgets_, accs, "o-", color=color, label=method)
        ax.set(title=f"T={t}, N={n}", xlabel="budget (tokens)", ylabel="accuracy", ylim=(-0.02, 1.02))
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    model = results["config"].get("model") or "tiny MQAR model"
    fig.suptitle(f"MQAR: {model}")
    path = folder / MQAR_PNG
    fig.savefig(path, dpi=110)
    return path


def plot_sweep(folder: str | os.PathLike) -> list[Path]:
    """Draw ``sweep-L<length>.png`` beside ``folder``'s ``results.json``, one figure per length.

    Left: accuracy vs measured density; right: accuracy vs prefill speedup over sdpa (1 = sdpa).
    Each method is a line over its settings; sdpa is a dotted black line (left) and point (right);
    grey steps join the Pareto frontier; a star marks, per method, the smallest density at which it
    matches the reference accuracy (sdpa, else a full-density point). Uses matplotlib's Agg canvas.
    """
    folder = Path(folder)
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {RESULTS_FILE} in {folder}: not a results folder, or its run did not finish (--resume)"
        )
    results = json.loads(path.read_text())
    if results["config"].get("task") != "sweep":
        raise ValueError(f"{folder} holds a {results['config'].get('task')!r} run, not a sweep")
    scores, config = results["scores"], results["config"]
    colors = {m: "k" if m == _BASELINE else f"C{i}" for i, m in enumerate(config["methods"])}
    paths = []
    for length, info in scores["by_length"].items():
        rows = [r for r in scores["rows"] if str(r["length"]) == length]
        fig = _sweep_figure(rows, info, config, colors, int(length))
        out = folder / SWEEP_PNG.format(length=length)
        fig.savefig(out, dpi=110)
        paths.append(out)
    return paths


def _sweep_figure(rows: list[dict], info: dict, config: dict, colors: dict, length: int):
    """The figure of one length: accuracy vs density (left) and vs speedup (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_d, ax_s = fig.subplots(1, 2)
    _sweep_axes(ax_d, "attended", rows, info["pareto_density"], colors)
    _sweep_axes(ax_s, "speedup", rows, info["pareto_speedup"], colors)
    for method, m in info["matches_reference"].items():
        if m is not None:
            ax_d.plot(
                m.get("attended", m["density"]),
                m["accuracy"],
                "*",
                ms=15,
                mec="k",
                color=colors.get(method),
                label=f"{method}: matches {info['reference']['method']}",
            )
    ax_d.set(
        xlabel="measured density (exact blocks + far field)",
        ylabel="accuracy (exact match)",
        xlim=(0, 1.02),
        ylim=(-0.03, 1.03),
        title="accuracy vs density",
    )
    ax_s.set(
        xlabel="prefill speedup over sdpa",
        ylabel="accuracy (exact match)",
        ylim=(-0.03, 1.03),
        title="accuracy vs speedup",
    )
    if info["sdpa_prefill_s"] is None:
        ax_s.text(
            0.5,
            0.5,
            "sdpa not run at this length:\nno speedup",
            ha="center",
            va="center",
            transform=ax_s.transAxes,
        )
    else:
        ax_s.axvline(1.0, ls=":", color="k", lw=0.8)
    handles = {}
    for ax in (ax_d, ax_s):
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small")
    fig.suptitle(
        f"sweep: {config.get('model')}, {_length_label(length)} tokens, needle "
        f"{config.get('needle')}, haystack {Path(str(config.get('haystack'))).name}, "
        f"{len(config.get('depths', []))} depths"
    )
    return fig


def _sweep_axes(ax, key: str, rows: list[dict], frontier: list[str], colors: dict) -> None:
    """Accuracy vs ``key`` ("attended" density or "speedup"): one line per method, the Pareto frontier's
    steps."""
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted(
            (r for r in rows if r["method"] == method and r.get(key) is not None), key=lambda r: r[key]
        )
        if method == _BASELINE and key == "attended":  # unpatched: no mask, no density
            sdpa = next(r for r in rows if r["method"] == method)
            ax.axhline(sdpa["accuracy"], ls=":", color="k", label="sdpa")
        elif mine:
            ax.plot(
                [r[key] for r in mine],
                [r["accuracy"] for r in mine],
                "o-",
                color=colors.get(method),
                label=method,
            )
    by_id = {r["id"]: r for r in rows}
    front = [by_id[i] for i in frontier if i in by_id]
    if front:
        ax.step(
            [r[key] for r in front],
            [r["accuracy"] for r in front],
            where="post",
            color="0.6",
            lw=4,
            alpha=0.4,
            zorder=0,
            label="Pareto frontier",
        )
