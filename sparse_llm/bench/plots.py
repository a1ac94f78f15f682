"""Plots of benchmark reports: a separate step that reads only the JSON files (PNG next to the JSON)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ideal_line(ax, densities):
    """The 1/density curve on ``ax``; returns its line (for a legend)."""
    lo = min([*densities, 0.05])
    xs = [lo + (1 - lo) * i / 50 for i in range(51)]
    return ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal 1/density")[0]


def _save(plt, fig, report_path: Path) -> Path:
    """Write ``fig`` next to its report as ``<report>.png`` and close it (pyplot keeps figures alive)."""
    fig.tight_layout()
    out = report_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_LENGTH_MARKERS = "os^Dv<>p*h"


def _series_label(method: str, chunk: int | None) -> str:
    return method if chunk is None else f"{method} (chunks of {chunk})"


def plot_prefill(report_path: str | Path) -> Path:
    """``<report>.png``: prefill latency and peak activation memory per method (and prefill chunk),
    lines against the length when the report has several lengths, bars at its one length otherwise;
    and the sparse layers' attention speedup over our ``dense`` against attended density, one colour
    per method (the same in every panel) and one marker per length."""
    path = Path(report_path)
    report = json.loads(path.read_text())
    rows = report["results"]
    plt = _pyplot()

    def series_of(r):  # one line, bar and colour per (method, prefill chunk)
        return r["method"], r.get("prefill_chunk")

    by_series: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["length"]):
        by_series.setdefault(series_of(r), []).append(r)
    series = list(dict.fromkeys(series_of(r) for r in rows))  # the report's order
    palette = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    colour = {key: palette[i % len(palette)] for i, key in enumerate(series)}
    lengths = sorted({r["length"] for r in rows})
    marker = {n: _LENGTH_MARKERS[i % len(_LENGTH_MARKERS)] for i, n in enumerate(lengths)}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.8))
    panels = (
        (left, "median_s", "prefill s (median)", "prefill latency"),
        (middle, "peak_mem_mb", "peak activation MiB (first timed run)", "peak memory"),
    )
    for ax, field, ylabel, title in panels:
        if len(lengths) > 1:
            for key in series:
                mine = by_series[key]
                ax.plot(
                    [r["length"] for r in mine],
                    [r[field] for r in mine],
                    "o-",
                    color=colour[key],
                    label=_series_label(*key),
                )
            ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel=ylabel, title=title)
            ax.legend(fontsize=8)
        else:  # one length: a bar per method, its value written beside it
            values = [by_series[k][0][field] for k in series]
            ys = range(len(series))
            ax.barh(ys, values, color=[colour[k] for k in series])
            for y, value in zip(ys, values, strict=True):
                ax.text(
                    value, y, f" {value:.1f}" if value < 100 else f" {value:.0f}", va="center", fontsize=8
                )
            ax.set_yticks(list(ys), [_series_label(*k) for k in series], fontsize=8)
            ax.invert_yaxis()
            ax.set(xlabel=ylabel, title=f"{title}, {lengths[0]} tokens")
            ax.set_xlim(0, max(values) * 1.15)

    # The sparse layers' own attention time (selection included, from the split run) against our
    # dense on the same layers: the speedup that 1/density bounds (end to end, Amdahl caps it).
    def layer_s(r):
        return r["selection_s"] + r["sparse_attention_s"] if r.get("selection_s") is not None else None

    def cell(r):
        return r["length"], r.get("prefill_chunk")

    dense = {cell(r): layer_s(r) for r in rows if r["method"] == "dense" and layer_s(r)}

    def attended(r):  # exact blocks plus the far field's mean keys: what the layer reads
        return r["density"] + (r.get("far_density") or 0.0)

    sparse = [r for r in rows if r["method"] != "dense" and layer_s(r) and cell(r) in dense]
    for r in sparse:
        right.scatter(
            attended(r), dense[cell(r)] / layer_s(r), color=colour[series_of(r)], marker=marker[r["length"]]
        )
    ideal = _ideal_line(right, [attended(r) for r in sparse] or [0.1])
    # legend: each method once (its colour), each length once (its marker)
    plotted = {series_of(r) for r in sparse}
    handles = [
        right.scatter([], [], color=colour[k], marker="o", label=_series_label(*k))
        for k in series
        if k in plotted
    ]
    if len(lengths) > 1:
        handles += [
            right.scatter([], [], color="grey", marker=marker[n], label=f"{n} tokens") for n in lengths
        ]
    handles.append(ideal)
    right.set(
        xlabel="attended density (sparse layers: exact blocks + far field)",
        ylabel="attention speedup over our dense",
        title="sparse layers' attention (selection included) vs density",
        ylim=(0, None),
    )
    right.legend(handles=handles, fontsize=7)
    machine = report.get("machine", {}).get("device", "")
    fig.suptitle(
        f"{report['config'].get('model', '')} on {machine}, {report.get('date', '')[:10]}", fontsize=10
    )
    return _save(plt, fig, path)


def plot_kernel(report_path: str | Path) -> Path:
    """``<report>.png``: kernel speedup over our dense vs density, per pattern, against 1/density."""
    path = Path(report_path)
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if r["pattern"] != "causal"]
    lengths = sorted({r["length"] for r in report["results"]})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for key in dict.fromkeys((r["pattern"], r["impl"]) for r in rows if r["length"] == length):
            mine = sorted(
                (r for r in rows if (r["pattern"], r["impl"]) == key and r["length"] == length),
                key=lambda r: r["density"],
            )
            ax.plot(
                [r["density"] for r in mine],
                [r["speedup_vs_dense"] for r in mine],
                "o-",
                label=f"{key[1]} ({key[0]})",
            )
        _ideal_line(ax, [r["density"] for r in rows] or [0.1])
        ax.set(
            xlabel="density", ylabel="speedup over our dense kernel", title=f"{length} tokens", ylim=(0, None)
        )
        ax.legend(fontsize=8)
    fig.suptitle(f"block-sparse kernel on {report.get('machine', {}).get('device', '')}", fontsize=10)
    return _save(plt, fig, path)
