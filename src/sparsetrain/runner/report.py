"""Reports of finished runs: a table like the RigL paper's, plots, Markdown and HTML.

``write_report(paths, out_dir)`` reads every run folder under ``paths`` (a folder holding a
``summary.json``; folders without one are unfinished and listed as such) and writes
``report.md``, ``report.html`` and PNG plots: accuracy against density, accuracy against
training FLOPs, learning curves, per-layer densities, and for the dynamic methods the fraction
of weights ever active during training. A run folder whose summary cannot be read or lacks
what the report shows is a ``ConfigError`` that names the file.
"""

from __future__ import annotations

import html
import math
import numbers
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError
from .folder import SUMMARY, find_run_folders, is_run_folder, read_metrics, read_summary

METHOD_ORDER = ["dense", "small-dense", "static", "snip", "grasp", "synflow", "set", "snfs",
                "rigl", "gmp"]
DYNAMIC = ("set", "snfs", "rigl")


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def collect_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run under ``paths``: ``{"folder", "summary" (None if unfinished), "evals"}``."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if is_run_folder(path):
            folders.append(path)
        elif path.is_dir():
            folders += find_run_folders(path)
    return [_read_run(run) for run in dict.fromkeys(folders)]


def _read_run(run: Path) -> dict[str, Any]:
    path = run / SUMMARY
    try:
        summary = read_summary(run)
        records = read_metrics(run)
    except OSError as exc:  # unreadable (a broken summary is a RunFolderError naming it)
        raise ConfigError(f"cannot read the run folder {run}: {exc}; if {path} is broken, "
                          f"delete it and run sparsetrain train --resume {run} to write it "
                          "again") from None
    if summary is not None:
        problem = _summary_problem(summary)
        if problem:
            raise ConfigError(f"{path} is not a complete run summary ({problem}); delete it "
                              f"and run sparsetrain train --resume {run} to write it again")
    evals = [r for r in records if isinstance(r, dict) and r.get("kind") == "eval"
             and _is_number(r.get("epoch")) and _is_number(r.get("test_accuracy"))]
    return {"folder": run, "summary": summary, "evals": evals}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _summary_problem(summary: Any) -> str | None:
    """What the report cannot use in ``summary``, or ``None``."""
    if not isinstance(summary, dict):
        return f"a JSON object is expected, not a {type(summary).__name__}"
    for key in ("test_accuracy", "density"):
        if not _is_number(summary.get(key)):
            return f"{key!r} is missing or not a number"
    for key in ("train_flops_vs_dense", "inference_flops_vs_dense"):
        if summary.get(key) is not None and not _is_number(summary[key]):
            return f"{key!r} is not a number"
    if not isinstance(summary.get("method"), str):
        return "'method' is missing or not a string"
    for key in ("model", "data"):
        if not isinstance(summary.get(key, ""), str):
            return f"{key!r} is not a string"
    config = summary.get("config", {})
    if not isinstance(config, dict):
        return "'config' is not a mapping"
    if not isinstance(config.get("distribution", ""), str):
        return "'config' has a 'distribution' that is not a string"
    if not _is_number(config.get("density", 0.0)):
        return "'config' has a 'density' that is not a number"
    layers = summary.get("layer_densities", {})
    if not isinstance(layers, dict) or not all(_is_number(v) for v in layers.values()):
        return "'layer_densities' is not a mapping of layer names to numbers"
    return None


def _key(summary: dict[str, Any]) -> tuple[str, str, str, float]:
    config = summary.get("config", {})
    method = summary["method"]
    distribution = "-" if method in ("dense", "small-dense") else config.get("distribution", "-")
    density = float(config.get("density", summary["density"]))
    if method == "dense":
        density = 1.0
    return summary.get("model", "?"), method, distribution, density


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, distribution, density): accuracy mean and std over seeds,
    FLOPs relative to dense; sorted by model, density (descending) and method."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run["summary"] is not None:
            groups[_key(run["summary"])].append(run["summary"])
    rows = []
    for (model, method, distribution, density), items in groups.items():
        accuracies = [s["test_accuracy"] for s in items]

        def mean_of(key):
            values = [s[key] for s in items if s.get(key) is not None]
            return statistics.fmean(values) if values else None

        rows.append({
            "model": model, "method": method, "distribution": distribution,
            "density": density, "actual_density": mean_of("density"), "n": len(items),
            "accuracy": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "train_flops": mean_of("train_flops_vs_dense"),
            "inference_flops": mean_of("inference_flops_vs_dense"),
        })
    rows.sort(key=lambda r: (r["model"], -r["density"], _method_rank(r["method"]),
                             r["distribution"]))
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| model | method | distribution | density | accuracy (mean ± std, n) | "
             "train FLOPs vs dense | inference FLOPs vs dense |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['distribution']} | {r['density']:.3g} | "
            f"{r['accuracy']:.4f} ± {r['std']:.4f} ({r['n']}) | {_ratio(r['train_flops'])} | "
            f"{_ratio(r['inference_flops'])} |")
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------
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


def _series_label(row: dict[str, Any], several_distributions: bool) -> str:
    if several_distributions and row["distribution"] != "-":
        return f"{row['method']} ({row['distribution']})"
    return row["method"]


def _plot_accuracy_vs(rows, x_key, path: Path, xlabel: str, title: str) -> bool:
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
    for label, items in sorted(series.items(), key=lambda kv: _method_rank(kv[0].split()[0])):
        items.sort(key=lambda r: r[x_key])
        ax.errorbar([r[x_key] for r in items], [r["accuracy"] for r in items],
                    yerr=[r["std"] for r in items], marker="o", capsize=3, label=label)
    if dense:
        ax.axhline(statistics.fmean(r["accuracy"] for r in dense), color="black",
                   linestyle="--", label="dense")
    ax.set_xscale("log")
    values = sorted({r[x_key] for items in series.values() for r in items})
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:.3g}" for v in values])
    ax.minorticks_off()
    _decorate(ax, xlabel, "test accuracy", title)
    return _save(fig, path)


def _plot_learning_curves(runs, path: Path) -> bool:
    plt = _pyplot()
    by_density: dict[float, dict[str, dict]] = defaultdict(dict)
    for run in runs:
        s = run["summary"]
        if s is None or not run["evals"]:
            continue
        _, method, _, density = _key(s)
        by_density[density].setdefault(method, run)  # the first seed found
    if not by_density:
        return False
    densities = sorted(by_density, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 3.8),
                             sharey=True, squeeze=False)
    for ax, density in zip(axes[0], densities):
        for method, run in sorted(by_density[density].items(), key=lambda kv: _method_rank(kv[0])):
            ax.plot([e["epoch"] for e in run["evals"]],
                    [e["test_accuracy"] for e in run["evals"]], marker=".", label=method)
        _decorate(ax, "epoch", None, f"density {density:.3g}", legend_size=7)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle("Learning curves (test accuracy after each epoch)")
    return _save(fig, path)


def _plot_layer_densities(runs, path: Path) -> bool:
    plt = _pyplot()
    finished = [r["summary"] for r in runs if r["summary"] is not None
                and r["summary"]["method"] not in ("dense", "small-dense")]
    if not finished:
        return False
    lowest = min(_key(s)[3] for s in finished)
    chosen: dict[str, dict] = {}
    for s in finished:
        if _key(s)[3] == lowest:
            chosen.setdefault(s["method"], s)
    layers = list(next(iter(chosen.values())).get("layer_densities", {}))
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4))
    width = 0.8 / len(chosen)
    for i, (method, s) in enumerate(sorted(chosen.items(), key=lambda kv: _method_rank(kv[0]))):
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
    curves = []
    for run in runs:
        s = run["summary"]
        if s is None or s["method"] not in DYNAMIC:
            continue
        points = [(e["epoch"], e["ever_active"]) for e in run["evals"]
                  if _is_number(e.get("ever_active"))]
        if points:
            curves.append((f"{s['method']} at {_key(s)[3]:.3g}", points))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(curves):
        ax.plot(*zip(*points), marker=".", label=label)
    _decorate(ax, "epoch", "fraction of weights ever active",
              "Weights explored by the dynamic methods")
    return _save(fig, path)


PLOTS = {
    "accuracy_vs_density.png": "Test accuracy against density (log scale; the dashed line is "
                               "dense training); error bars are the standard deviation over "
                               "seeds.",
    "accuracy_vs_train_flops.png": "Test accuracy against training FLOPs relative to dense "
                                   "(RigL paper, Appendix H).",
    "learning_curves.png": "Test accuracy after every epoch, one panel per density.",
    "layer_densities.png": "The density of every layer at the lowest overall density.",
    "ever_active.png": "For SET, SNFS and RigL: the fraction of the weights that have been "
                       "active at some point of training.",
}


def write_report(paths: Iterable[str | Path], out_dir: str | Path, *,
                 title: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the plots to ``out_dir``; return report.md."""
    runs = collect_runs(paths)
    finished = [r for r in runs if r["summary"] is not None]
    if not finished:
        raise ValueError(f"no finished runs (folders with a {SUMMARY}) in the given paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    made = {}
    made["accuracy_vs_density.png"] = _plot_accuracy_vs(
        rows, "density", out_dir / "accuracy_vs_density.png", "density (fraction of weights kept)",
        "Accuracy against density")
    made["accuracy_vs_train_flops.png"] = _plot_accuracy_vs(
        rows, "train_flops", out_dir / "accuracy_vs_train_flops.png",
        "training FLOPs relative to dense", "Accuracy against training cost")
    made["learning_curves.png"] = _plot_learning_curves(finished, out_dir / "learning_curves.png")
    made["layer_densities.png"] = _plot_layer_densities(finished, out_dir / "layer_densities.png")
    made["ever_active.png"] = _plot_ever_active(finished, out_dir / "ever_active.png")
    title = title or "Sparse training report"
    table = format_table(rows)
    unfinished = [r["folder"].name for r in runs if r["summary"] is None]
    models = sorted({r["summary"].get("model", "?") for r in finished})
    data = sorted({r["summary"].get("data", "?") for r in finished})
    intro = (f"{len(finished)} finished runs of {', '.join(models)} on {', '.join(data)}. "
             "Accuracy is the test accuracy at the end of training (mean ± standard deviation "
             "over seeds, n runs); FLOPs count a multiply-add as 2 and are relative to the "
             "dense model.")
    md = [f"# {title}", "", intro, "", table, ""]
    for name, caption in PLOTS.items():
        if made[name]:
            md += [f"![{name}]({name})", "", caption, ""]
    md += ["## Runs", ""] + [f"- `{r['folder'].name}`" for r in finished]
    if unfinished:
        md += ["", "Not finished (left out): " + ", ".join(f"`{n}`" for n in unfinished)]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text(_html(title, intro, rows, made, finished, unfinished))
    return out_dir / "report.md"


def _html(title, intro, rows, made, finished, unfinished) -> str:
    e = html.escape
    head = ("<tr><th>model</th><th>method</th><th>distribution</th><th>density</th>"
            "<th>accuracy (mean ± std, n)</th><th>train FLOPs vs dense</th>"
            "<th>inference FLOPs vs dense</th></tr>")
    body = "".join(
        f"<tr><td>{e(r['model'])}</td><td>{e(r['method'])}</td><td>{e(r['distribution'])}</td>"
        f"<td>{r['density']:.3g}</td><td>{r['accuracy']:.4f} ± {r['std']:.4f} ({r['n']})</td>"
        f"<td>{_ratio(r['train_flops'])}</td><td>{_ratio(r['inference_flops'])}</td></tr>"
        for r in rows)
    figures = "".join(f'<figure><img src="{e(n)}" alt="{e(n)}"><figcaption>{e(c)}</figcaption>'
                      "</figure>" for n, c in PLOTS.items() if made[n])
    runs = "".join(f"<li><code>{e(r['folder'].name)}</code></li>" for r in finished)
    left = (f"<p>Not finished (left out): {e(', '.join(n for n in unfinished))}</p>"
            if unfinished else "")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;"
             "text-align:right}td:nth-child(-n+3),th{text-align:left}img{max-width:100%}"
             "figure{margin:2em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body><h1>{e(title)}</h1><p>{e(intro)}</p>"
            f"<table>{head}{body}</table>{figures}<h2>Runs</h2><ul>{runs}</ul>{left}"
            "</body></html>\n")
