"""``sparsetrain analyze RUN...``: what the masks and gradients of finished runs show.

``write_analysis(paths, out_dir)`` reads every finished run folder under ``paths`` and writes
``analysis.md`` and PNG plots:

- **Mask overlap.** The Jaccard overlap of the final masks (read from each run's checkpoint,
  which holds the active positions) of every pair of sparse runs of one model at one density:
  averaged over pairs of seeds, a method against itself (how much the seed decides the mask)
  and against the other methods (whether they find the same connections). Two independent
  random masks of density d overlap by about d / (2 - d), the table's reference line.
- **Loss along lines** (``landscape.py``): from each run's initialisation to its solution, and
  from the Static solution to each other method's, with the barrier of each line.
- **Exploration.** The ever-active fraction (weights active at some point) against accuracy,
  mean over seeds, per model, density and method (ITOP, Liu et al. 2021).
- **Per-layer density over time**, from the densities logged with every evaluation, for the
  first seed of each method at each model's lowest density.
- **Gradient flow.** The norm of the active gradients that ``sparsetrain train`` logs with
  every training-metrics line (``grad_norm`` in ``metrics.jsonl``), overall per method and
  density (mean over seeds), and per layer for the first seed of each method at the lowest
  density.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..analysis import position_overlap
from . import landscape, mask_history
from .config import DENSE_METHODS, make_config
from .folder import load_checkpoint, read_metrics
from .plots import _pyplot, _save
from .results import collect_runs, label_rank, run_key, run_labels


def final_positions(run: dict[str, Any]) -> dict[str, Any]:
    """Weight name -> sorted flat active positions at the end of a finished run, from its
    checkpoint (empty for a dense run); ``ConfigError`` when the checkpoint cannot be read."""
    summary = run["summary"]
    checkpoint = load_checkpoint(run["folder"], make_config(summary["config"]))
    return (checkpoint.get("sparsifier") or {}).get("positions") or {}


def overlap_tables(runs: list[dict[str, Any]]) -> dict[tuple[str, float], dict]:
    """(model, density) -> {(label a, label b): mean overall Jaccard over run pairs}."""
    labels = run_labels(runs, with_model=False)  # tables of one model each
    groups: dict[tuple[str, float], list[tuple[str, dict]]] = defaultdict(list)
    for run in runs:
        s = run["summary"]
        if s["method"] in DENSE_METHODS or not (run["folder"] / "checkpoint.pt").is_file():
            continue
        model, _, _, density = run_key(s)
        groups[(model, density)].append((labels[run["folder"]], final_positions(run)))
    tables = {}
    for key, items in groups.items():
        pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
        for (la, pa), (lb, pb) in itertools.combinations(items, 2):
            value = position_overlap(pa, pb).overall
            pairs[tuple(sorted((la, lb), key=label_rank))].append(value)
        tables[key] = {k: statistics.fmean(v) for k, v in pairs.items()}
    return tables


def _overlap_markdown(tables: dict) -> list[str]:
    lines = []
    for (model, density), table in sorted(tables.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        labels = sorted({x for pair in table for x in pair}, key=label_rank)
        lines += [f"### {model} at density {density:.3g}", "",
                  f"Mean Jaccard overlap of the final masks over pairs of runs (two independent "
                  f"random masks: {density / (2 - density):.3f}; '-' no pair).", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for a in labels:
            cells = []
            for b in labels:
                pair = tuple(sorted((a, b), key=label_rank))
                cells.append(f"{table[pair]:.3f}" if pair in table else "-")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _grad_series(runs: list[dict[str, Any]]):
    """density -> label -> [per-seed {step: overall norm}]; and per-layer curves."""
    overall: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    layers: dict[float, dict[str, dict[str, dict]]] = defaultdict(dict)
    labels = run_labels(runs)
    for run in runs:
        records = [r for r in read_metrics(run["folder"])
                   if isinstance(r, dict) and r.get("kind") == "train"
                   and isinstance(r.get("grad_norm"), dict)]
        if not records:
            continue
        _, _, _, density = run_key(run["summary"])
        label = labels[run["folder"]]
        overall[density][label].append({r["step"]: r["grad_norm"]["overall"] for r in records})
        if label not in layers[density]:
            names = [n for n in records[0]["grad_norm"] if n != "overall"]
            layers[density][label] = {n: {r["step"]: r["grad_norm"].get(n) for r in records}
                                      for n in names}
    return overall, layers


def _plot_grad_overall(overall, path: Path) -> bool:
    if not overall:
        return False
    plt = _pyplot()
    densities = sorted(overall, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 3.8),
                             squeeze=False)
    for ax, density in zip(axes[0], densities):
        for label, curves in sorted(overall[density].items(),
                                    key=lambda kv: label_rank(kv[0])):
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"density {density:.3g}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("norm of the active gradients")
    fig.suptitle("Gradient flow through training (mean over seeds)")
    return _save(fig, path)


def _plot_grad_layers(layers, path: Path) -> bool:
    if not layers:
        return False
    density = min(layers)
    chosen = sorted(layers[density].items(), key=lambda kv: label_rank(kv[0]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.8), sharey=True,
                             squeeze=False)
    for ax, (label, per_layer) in zip(axes[0], chosen):
        for name, points in per_layer.items():
            steps = sorted(s for s, v in points.items() if v is not None)
            ax.plot(steps, [points[s] for s in steps], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("norm of the layer's active gradient")
    fig.suptitle(f"Gradient flow per layer at density {density:.3g} (first seed)")
    return _save(fig, path)


LINES_CAPTION = ("The training loss along straight lines between weights: from each run's "
                 "initialisation to its solution (left), and from the Static solution to "
                 "each other method's solution (right); lowest seed.")
LAYERS_CAPTION = ("The density of every layer at each evaluation, lowest seed, at each "
                  "model's lowest density: constant for Static, SET and RigL, growing "
                  "sparsity for GMP, moving between layers for SNFS.")


def write_analysis(paths: Iterable[str | Path], out_dir: str | Path, *,
                   lines: bool = True) -> Path:
    """Write ``analysis.md`` and its plots to ``out_dir``; return analysis.md. ``lines=False``
    leaves out the loss along lines (it rebuilds every run of the lowest seed)."""
    runs = [r for r in collect_runs(paths) if r["summary"] is not None]
    if not runs:
        raise ValueError("no finished runs (folders with a summary.json) in the given paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs, with_model=False)  # for the sections of one model each
    md = ["# Analysis", "", f"{len(runs)} finished runs.", "", "## Mask overlap", ""]
    tables = overlap_tables(runs)
    md += _overlap_markdown(tables) if tables else ["No sparse run with a checkpoint.", ""]
    if lines:
        md += ["## Loss along lines", ""]
        found = landscape.lines(runs, labels)
        if landscape.plot(found, out_dir / "lines.png"):
            md += ["![lines.png](lines.png)", "", LINES_CAPTION, ""]
            md += landscape.markdown(found)
        else:
            md += ["No run has its initial weights (initial.pt; runs trained before it was "
                   "written).", ""]
    md += ["## Exploration: weights ever active", ""]
    md += mask_history.exploration_markdown(runs, labels) or ["No sparse run.", ""]
    md += ["## Per-layer density over time", ""]
    if mask_history.plot_layer_densities(mask_history.layer_density_series(runs, labels),
                                         out_dir / "layer_density.png"):
        md += ["![layer_density.png](layer_density.png)", "", LAYERS_CAPTION, ""]
    else:
        md += ["No run logged its layer densities (runs trained before they were logged).", ""]
    md += ["## Gradient flow", ""]
    overall, layers = _grad_series(runs)
    made = [(name, caption) for name, caption, ok in [
        ("grad_norm.png", "The norm of the active gradients of each logged step, mean over "
         "seeds, one panel per density.", _plot_grad_overall(overall, out_dir / "grad_norm.png")),
        ("grad_norm_layers.png", "The norm of each layer's active gradient at the lowest "
         "density, one panel per method (first seed).",
         _plot_grad_layers(layers, out_dir / "grad_norm_layers.png"))] if ok]
    for name, caption in made:
        md += [f"![{name}]({name})", "", caption, ""]
    if not made:
        md += ["No run logged gradient norms (runs trained before they were logged).", ""]
    path = out_dir / "analysis.md"
    path.write_text("\n".join(md) + "\n")
    return path
