"""The PNG plots of a report (matplotlib, no display needed).

For each kind of data present, its measure (``MEASURES``: the test accuracy of classification
runs, the validation loss in nats per byte of sequence runs) against density and against
training FLOPs, and after every epoch; for all finished runs, the per-layer densities at the
lowest density and the fraction of weights ever active of the dynamic methods.
``make_plots(rows, runs, out_dir)`` writes those it has data for and returns their file names
and captions.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .comparison import method_label
from .config import DENSE_METHODS
from .results import (DYNAMIC, is_number, label_rank, method_rank, run_key, run_kind,
                      run_labels)


@dataclass(frozen=True)
class Measure:
    """What the plots show of runs on one kind of data."""

    row: str        # the mean in a row of ``results.summarise``
    std: str        # its standard deviation there
    eval_key: str   # the value in the eval records of metrics.jsonl
    label: str      # axis label
    name: str       # in titles
    files: tuple[str, str, str]  # against density, against training FLOPs, after every epoch


MEASURES = {
    "classification": Measure("accuracy", "std", "test_accuracy", "test accuracy", "Accuracy",
                              ("accuracy_vs_density.png", "accuracy_vs_train_flops.png",
                               "learning_curves.png")),
    "sequence": Measure("loss", "loss_std", "test_loss", "validation loss (nats/byte)",
                        "Validation loss", ("loss_vs_density.png", "loss_vs_train_flops.png",
                                            "loss_curves.png")),
}


def _captions(m: Measure, kind: str) -> list[str]:
    lower = " (lower is better)" if kind == "sequence" else ""
    return [f"{m.label.capitalize()}{lower} against density (log scale; the dashed line is "
            "dense training); error bars are the standard deviation over seeds.",
            f"{m.label.capitalize()} against training FLOPs relative to dense (RigL paper, "
            "Appendix H); error bars as above.",
            f"{m.label.capitalize()} after every epoch, one panel per density: the mean over "
            "seeds, shaded one standard deviation either side."]


LAYERS_CAPTION = "The density of every layer at the lowest overall density."
EVER_ACTIVE_CAPTION = ("For SET, SNFS and RigL: the fraction of the weights that have been "
                       "active at some point of training (mean over seeds).")


def make_plots(rows: list[dict[str, Any]], runs: list[dict[str, Any]],
               out_dir: Path) -> list[tuple[str, str]]:
    """Write the plots of ``rows`` (``summarise``) and the finished ``runs`` to ``out_dir``;
    return (file name, caption) of each one written."""
    made = []
    for kind, m in MEASURES.items():
        kind_rows = [r for r in rows if r["kind"] == kind]
        kind_runs = [r for r in runs if run_kind(r["summary"]) == kind]
        by_density, by_flops, curves = m.files
        written = [
            _plot_measure_vs(kind_rows, m, "density", out_dir / by_density,
                             "density (fraction of weights kept)", f"{m.name} against density"),
            _plot_measure_vs(kind_rows, m, "train_flops", out_dir / by_flops,
                             "training FLOPs relative to dense", f"{m.name} against training cost"),
            _plot_curves(kind_runs, m, out_dir / curves),
        ]
        made += [(f, c) for f, c, ok in zip(m.files, _captions(m, kind), written) if ok]
    for kind, m in MEASURES.items():
        kind_rows = [r for r in rows if r["kind"] == kind]
        name = f"{m.row}_vs_wall_time.png"
        if len({r.get("variant") for r in kind_rows}) > 1 and _plot_measure_vs(
                kind_rows, m, "epoch_seconds", out_dir / name,
                "wall-clock seconds per training epoch",
                f"{m.name} against training time", log_x=False):
            made.append((name, f"{m.label.capitalize()} against the measured wall-clock time "
                         "of a training epoch (what a structure or backend buys and costs); "
                         "error bars as above."))
    if _plot_layer_densities(runs, out_dir / "layer_densities.png"):
        made.append(("layer_densities.png", LAYERS_CAPTION))
    if _plot_ever_active(runs, out_dir / "ever_active.png"):
        made.append(("ever_active.png", EVER_ACTIVE_CAPTION))
    return made


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return True


def _decorate(ax, xlabel: str, ylabel: str | None, title: str, legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)


#: Markers cycled with the colours, so that series stay apart beyond ten of them.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _colours(plt, n: int) -> list:
    """``n`` distinct colours: matplotlib's ten, or the twenty of ``tab20`` beyond ten."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(n)]


def _series_label(row: dict[str, Any], several_distributions: bool) -> str:
    if several_distributions and row["distribution"] != "-":
        return f"{method_label(row)} ({row['distribution']})"
    return method_label(row)


def _plot_measure_vs(rows, m: Measure, x_key: str, path: Path, xlabel: str, title: str,
                     log_x: bool = True) -> bool:
    plt = _pyplot()
    several = len({r["distribution"] for r in rows if r["distribution"] != "-"}) > 1
    series: dict[str, list[dict]] = defaultdict(list)
    dense = [r for r in rows if r["method"] == "dense"]
    for r in rows:
        if r["method"] != "dense" and r.get(x_key) is not None:
            series[_series_label(r, several)].append(r)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ordered = sorted(series.items(), key=lambda kv: method_rank(kv[0].split()[0]))
    colours = _colours(plt, len(ordered))
    for i, (label, items) in enumerate(ordered):
        items.sort(key=lambda r: r[x_key])
        ax.errorbar([r[x_key] for r in items], [r[m.row] for r in items],
                    yerr=[r[m.std] for r in items], marker=MARKERS[i % len(MARKERS)],
                    color=colours[i], capsize=3, label=label)
    if dense:
        level = statistics.fmean(r[m.row] for r in dense)
        ax.axhline(level, color="black", linestyle="--", label="dense")
        if len(dense) == 1 and dense[0][m.std]:
            ax.axhspan(level - dense[0][m.std], level + dense[0][m.std], color="black",
                       alpha=0.08)
    if log_x:
        ax.set_xscale("log")
        values = sorted({r[x_key] for items in series.values() for r in items})
        if len(values) <= 6:  # a tick at every value where they are few and far apart
            ax.set_xticks(values)
            ax.set_xticklabels([f"{v:.3g}" for v in values])
            ax.minorticks_off()
        else:  # many values: the decades labelled, not the ticks between them
            from matplotlib.ticker import NullFormatter

            ax.xaxis.set_minor_formatter(NullFormatter())
    _decorate(ax, xlabel, m.label, title)
    return _save(fig, path)


def _plot_curves(runs, m: Measure, path: Path) -> bool:
    plt = _pyplot()
    # density -> label -> the curves of its seeds (epoch -> value)
    by_density: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    labels = run_labels(runs)
    for run in runs:
        points = {e["epoch"]: e[m.eval_key] for e in run["evals"]
                  if is_number(e.get(m.eval_key))}
        if not points:
            continue
        density = run_key(run["summary"])[3]
        label = labels[run["folder"]]
        by_density[density][label].append(points)
    if not by_density:
        return False
    densities = sorted(by_density, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 3.8),
                             sharey=True, squeeze=False)
    for ax, density in zip(axes[0], densities):
        for label, curves in sorted(by_density[density].items(),
                                    key=lambda kv: label_rank(kv[0])):
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.fmean(c[e] for c in curves) for e in epochs]
            line, = ax.plot(epochs, mean, marker=".", label=f"{label} ({len(curves)})")
            if len(curves) > 1:
                std = [statistics.stdev(c[e] for c in curves) for e in epochs]
                ax.fill_between(epochs, [a - b for a, b in zip(mean, std)],
                                [a + b for a, b in zip(mean, std)], color=line.get_color(),
                                alpha=0.2)
        _decorate(ax, "epoch", None, f"density {density:.3g}", legend_size=7)
    axes[0][0].set_ylabel(m.label)
    fig.suptitle(f"Learning curves ({m.label} after each epoch)")
    return _save(fig, path)


def _plot_layer_densities(runs, path: Path) -> bool:
    plt = _pyplot()
    finished = [r["summary"] for r in runs if r["summary"]["method"] not in DENSE_METHODS]
    if not finished:
        return False
    lowest = min(run_key(s)[3] for s in finished)
    chosen: dict[str, dict] = {}
    for s in finished:
        if run_key(s)[3] == lowest:
            chosen.setdefault(s["method"], s)
    layers = list(next(iter(chosen.values())).get("layer_densities", {}))
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4))
    width = 0.8 / len(chosen)
    for i, (method, s) in enumerate(sorted(chosen.items(), key=lambda kv: method_rank(kv[0]))):
        ax.bar([j + i * width for j in range(len(layers))],
               [s.get("layer_densities", {}).get(n, math.nan) for n in layers], width,
               label=method)
    ax.set_xticks([j + width * (len(chosen) - 1) / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("density of the layer")
    ax.set_title(f"Per-layer densities at overall density {lowest:.3g}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_ever_active(runs, path: Path) -> bool:
    plt = _pyplot()
    labels = run_labels(runs)
    curves: dict[str, list[dict]] = defaultdict(list)  # label -> per seed {epoch: fraction}
    for run in runs:
        s = run["summary"]
        if s["method"] not in DYNAMIC:
            continue
        points = {e["epoch"]: e["ever_active"] for e in run["evals"]
                  if is_number(e.get("ever_active"))}
        if points:
            curves[f"{labels[run['folder']]} at {run_key(s)[3]:.3g}"].append(points)
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, seeds in sorted(curves.items()):
        epochs = sorted(set.intersection(*(set(c) for c in seeds)))
        ax.plot(epochs, [statistics.fmean(c[e] for c in seeds) for e in epochs], marker=".",
                label=f"{label} ({len(seeds)})")
    _decorate(ax, "epoch", "fraction of weights ever active",
              "Weights explored by the dynamic methods")
    return _save(fig, path)
