"""Plots of benchmark reports: a separate step that reads only the JSON files (PNG next to the JSON)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ideal_line(ax, densities) -> None:
    lo = min([*densities, 0.05])
    xs = [lo + (1 - lo) * i / 50 for i in range(51)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal 1/density")


def _save(plt, fig, report_path: Path) -> Path:
    """Write ``fig`` next to its report as ``<report>.png`` and close it (pyplot keeps figures alive)."""
    fig.tight_layout()
    out = report_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_prefill(report_path: str | Path) -> Path:
    """``<report>.png``: prefill latency and peak activation memory vs length per method (and prefill
    chunk), and the sparse layers' speedup over our ``dense`` vs density."""
    path = Path(report_path)
    report = json.loads(path.read_text())
    rows = report["results"]
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.5))
    for method, chunk in dict.fromkeys((r["method"], r.get("prefill_chunk")) for r in rows):
        mine = sorted(
            (r for r in rows if (r["method"], r.get("prefill_chunk")) == (method, chunk)),
            key=lambda r: r["length"],
        )
        label = method if chunk is None else f"{method} (chunks of {chunk})"
        lengths = [r["length"] for r in mine]
        left.plot(lengths, [r["median_s"] for r in mine], "o-", label=label)
        middle.plot(lengths, [r["peak_mem_mb"] for r in mine], "o-", label=label)
    for ax, ylabel, title in (
        (left, "prefill s (median)", "prefill latency"),
        (middle, "peak activation MiB (first timed run)", "peak memory"),
    ):
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)

    # The sparse layers' own attention time (selection included, from the split run) against our
    # dense on the same layers: the speedup that 1/density bounds (end to end, Amdahl caps it).
    def layer_s(r):
        return r["selection_s"] + r["sparse_attention_s"] if r.get("selection_s") is not None else None

    def cell(r):
        return r["length"], r.get("prefill_chunk")

    dense = {cell(r): layer_s(r) for r in rows if r["method"] == "dense" and layer_s(r)}
    sparse = [r for r in rows if r["method"] != "dense" and layer_s(r) and cell(r) in dense]
    for r in sparse:
        chunk = "" if r.get("prefill_chunk") is None else f"/{r['prefill_chunk']}"
        label = f"{r['method']} @ {r['length']}{chunk}"
        right.scatter(r["density"], dense[cell(r)] / layer_s(r), label=label)
    _ideal_line(right, [r["density"] for r in sparse] or [0.1])
    right.set(
        xlabel="attention density (sparse layers)",
        ylabel="attention speedup over our dense",
        title="sparse layers' attention (selection included) vs density",
        ylim=(0, None),
    )
    right.legend(fontsize=7)
    machine = report.get("machine", {}).get("device", "")
    fig.suptitle(f"{report['config'].get('model', '')} on {machine}", fontsize=10)
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
