"""How the masks of finished runs moved (``sparsetrain analyze``): the ever-active fraction
against accuracy, and the density of every layer through training."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .config import DENSE_METHODS
from .results import is_number, label_rank, run_key


def exploration_markdown(runs: list[dict[str, Any]], labels: dict[Path, str]) -> list[str]:
    """Per model and density: each sparse method's mean ever-active fraction and accuracy
    over its seeds (ITOP: the more weights explored, the better)."""
    groups: dict[tuple[str, float], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        s = run["summary"]
        model, method, _, density = run_key(s)
        if method in DENSE_METHODS or not is_number(s.get("ever_active_fraction")):
            continue
        groups[(model, density)][labels[run["folder"]]].append(
            (s["ever_active_fraction"], s["test_accuracy"]))
    lines = []
    for (model, density), table in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        lines += [f"### {model} at density {density:.3g}", "",
                  "| run | ever-active fraction | test accuracy | seeds |", "|---|---:|---:|---:|"]
        for label, values in sorted(table.items(), key=lambda kv: label_rank(kv[0])):
            lines.append(f"| {label} | {statistics.fmean(v[0] for v in values):.4f} | "
                         f"{statistics.fmean(v[1] for v in values):.4f} | {len(values)} |")
        lines.append("")
    return lines


def layer_density_series(runs: list[dict[str, Any]], labels: dict[Path, str]) -> dict:
    """model -> (lowest density, {label: {layer: [(epoch, density)]}}) for the lowest seed."""
    found: dict[str, tuple[float, dict]] = {}
    candidates = sorted((r for r in runs
                         if r["summary"]["method"] not in DENSE_METHODS),
                        key=lambda r: (run_key(r["summary"])[3],
                                       r["summary"]["config"].get("seed", 0)))
    for run in candidates:
        model, _, _, density = run_key(run["summary"])
        series: dict[str, list] = defaultdict(list)
        for e in run["evals"]:
            for name, value in (e.get("layer_densities") or {}).items():
                if is_number(value):
                    series[name].append((e["epoch"], value))
        if not series:
            continue
        lowest, per_label = found.setdefault(model, (density, {}))
        if density == lowest:
            per_label.setdefault(labels[run["folder"]], dict(series))
    return found


def plot_layer_densities(found: dict, path: Path) -> bool:
    from .plots import _pyplot, _save

    panels = [(model, density, label, series) for model, (density, per_label) in
              sorted(found.items()) for label, series in
              sorted(per_label.items(), key=lambda kv: label_rank(kv[0]))]
    if not panels:
        return False
    plt = _pyplot()
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (model, density, label, series) in zip(axes.flat, panels):
        for name, points in series.items():
            ax.plot(*zip(*points), label=name)
        ax.set_yscale("log")
        ax.set_title(f"{model} {label} at {density:.3g}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if len(series) <= 12:
            ax.legend(fontsize=5)
    axes[0][0].set_ylabel("layer density")
    fig.tight_layout()
    return _save(fig, path)
