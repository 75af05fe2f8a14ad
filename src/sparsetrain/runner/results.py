"""The results of finished runs: reading run folders, checking their summaries, grouping them.

``collect_runs(paths)`` reads every run folder under ``paths`` (a folder holding a
``summary.json``; folders without one are unfinished); a run folder whose summary cannot be
read or lacks what a report shows is a ``ConfigError`` that names the file. ``summarise(runs)``
groups the finished ones into rows, one per (kind of data, model, method, distribution,
density, training length, and any other setting in which runs of those differ: their
``variant``), with means and standard deviations over the seeds, and for every
method but Static the paired difference to Static at the same density and length over the
seeds both have, with its 95% confidence interval (``stats.paired_difference``; accuracy:
higher is better, loss: lower is better; ``comparison``).

The kind of data (``"data_kind"`` of a summary, the data set's ``Dataset.kind``; summaries
without it are of classification runs) decides what a row measures: test accuracy on
classification data; on sequence data (byte-level text) the validation loss in nats per byte
(``test_loss``), and the next-byte accuracy.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .config import DENSE_METHODS, ConfigError, TrainConfig, saved_setting
from .folder import SUMMARY, find_run_folders, is_run_folder, read_metrics, read_summary
from .comparison import compare_to_static, judged_by

METHOD_ORDER = ["dense", "small-dense", "static", "snip", "grasp", "synflow", "set", "snfs",
                "rigl", "gmp"]
DYNAMIC = ("set", "snfs", "rigl")
KINDS = ("classification", "sequence")


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def label_rank(label: str) -> tuple[tuple[int, str], str]:
    """The order of labels of ``run_labels`` (``"model: method ..."``): by method, then
    label."""
    return method_rank(label.split(": ")[-1].split()[0]), label


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def bits(nats: float) -> float:
    return nats / math.log(2)


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
             and is_number(r.get("epoch")) and is_number(r.get("test_accuracy"))]
    return {"folder": run, "summary": summary, "evals": evals}


def _summary_problem(summary: Any) -> str | None:
    """What a report cannot use in ``summary``, or ``None``."""
    if not isinstance(summary, dict):
        return f"a JSON object is expected, not a {type(summary).__name__}"
    for key in ("test_accuracy", "density"):
        if not is_number(summary.get(key)):
            return f"{key!r} is missing or not a number"
    if summary.get("data_kind", KINDS[0]) not in KINDS:
        return f"'data_kind' is not one of {', '.join(KINDS)}"
    if run_kind(summary) == "sequence" and not is_number(summary.get("test_loss")):
        return "'test_loss' is missing or not a number"
    for key in ("train_flops_vs_dense", "inference_flops_vs_dense", "test_loss"):
        if summary.get(key) is not None and not is_number(summary[key]):
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
    if not is_number(config.get("density", 0.0)):
        return "'config' has a 'density' that is not a number"
    layers = summary.get("layer_densities", {})
    if not isinstance(layers, dict) or not all(is_number(v) for v in layers.values()):
        return "'layer_densities' is not a mapping of layer names to numbers"
    if not isinstance(summary.get("data_info", {}), dict):
        return "'data_info' is not a mapping"
    return None


def run_kind(summary: dict[str, Any]) -> str:
    """The kind of data the run was trained on (``Dataset.kind``)."""
    return summary.get("data_kind", KINDS[0])


def run_key(summary: dict[str, Any]) -> tuple[str, str, str, float]:
    """(model, method, distribution, density) of a run; dense runs are at density 1 and
    dense and small-dense runs have no distribution ("-")."""
    config = summary.get("config", {})
    method = summary["method"]
    distribution = "-" if method in DENSE_METHODS else config.get("distribution", "-")
    density = float(config.get("density", summary["density"]))
    if method == "dense":
        density = 1.0
    return summary.get("model", "?"), method, distribution, density


def run_length(summary: dict[str, Any]) -> float:
    """The training-length multiplier of a run (1 for runs without one)."""
    length = summary.get("config", {}).get("length", 1.0)
    return float(length) if is_number(length) else 1.0


def _row_key(summary: dict[str, Any]) -> tuple:
    """(kind, model, method, distribution, density, length): what a row of runs shares."""
    return (run_kind(summary), *run_key(summary), run_length(summary))


_ROW_KEYS = {"model", "method", "distribution", "density", "length", "seed"}


def run_variants(summaries: list[dict[str, Any]]) -> list[str]:
    """For runs that share a row key (kind, model, method, distribution, density, length):
    what tells them apart besides the seed, one label per run: the settings whose values
    differ among them, where the run's value is not the default (``"prune_ablation shuffle"``,
    ``"delta_t 25"``); ``""`` for a run at the defaults of those settings, or when the runs
    differ only in their seeds."""
    configs = [s.get("config", {}) if isinstance(s.get("config"), dict) else {}
               for s in summaries]
    keys = sorted({k for c in configs for k in c} - _ROW_KEYS - set(TrainConfig.NON_SEMANTIC))
    differ = [k for k in keys if len({repr(saved_setting(c, k)) for c in configs}) > 1]
    return [", ".join(f"{k} {c.get(k)}" for k in differ
                      if saved_setting(c, k) != saved_setting({}, k)) for c in configs]


def variant_labels(runs: list[dict[str, Any]]) -> dict[Path, str]:
    """run folder -> its variant (``run_variants``) among the finished runs of its row."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run["summary"] is not None:
            s = run["summary"]
            groups[_row_key(s)].append(run)
    labels = {}
    for items in groups.values():
        for run, label in zip(items, run_variants([r["summary"] for r in items])):
            labels[run["folder"]] = label
    return labels


def run_labels(runs: list[dict[str, Any]], *, with_model: bool = True) -> dict[Path, str]:
    """run folder -> how plots name its row among ``runs``: the method (with its length when
    not 1), the distribution when the sparse runs use several, the model when there are
    several (and ``with_model``: not for tables and plots of one model), and the run's
    variant (``variant_labels``)."""
    done = [r for r in runs if r["summary"] is not None]
    keys = {r["folder"]: run_key(r["summary"]) for r in done}
    models = {k[0] for k in keys.values()}
    distributions = {k[2] for k in keys.values() if k[2] != "-"}
    variants = variant_labels(done)
    labels = {}
    for run in done:
        model, method, distribution, _ = keys[run["folder"]]
        length = run_length(run["summary"])
        label = method if length == 1.0 else f"{method} {length:g}x"
        if len(distributions) > 1 and distribution != "-":
            label += f" ({distribution})"
        if variants[run["folder"]]:
            label += f" [{variants[run['folder']]}]"
        labels[run["folder"]] = f"{model}: {label}" if with_model and len(models) > 1 else label
    return labels


def epoch_seconds(summary: dict[str, Any]) -> float | None:
    """A run's wall-clock seconds per training epoch (its evaluations included), or None."""
    config = summary.get("config", {}) if isinstance(summary.get("config"), dict) else {}
    epochs = round(run_length(summary) * float(config.get("epochs") or 0))
    wall = summary.get("wall_time_s")
    return wall / epochs if is_number(wall) and epochs > 0 else None


def _by_seed(items: list[dict[str, Any]], key: str) -> dict[int, float] | None:
    """seed -> value of the runs of one row; ``None`` if a seed occurs twice (runs that differ
    in a setting the row does not show cannot be paired)."""
    values: dict[int, float] = {}
    for s in items:
        seed = s.get("config", {}).get("seed")
        if not is_number(seed) or seed in values or not is_number(s.get(key)):
            return None
        values[int(seed)] = float(s[key])
    return values


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, model, method, distribution, density): accuracy and loss mean and
    std over seeds, FLOPs relative to dense; sorted by kind, model, density (descending) and
    method."""
    variants = variant_labels(runs)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        s = run["summary"]
        if s is not None:
            groups[(*_row_key(s), variants[run["folder"]])].append(s)
    rows = []
    for (kind, model, method, distribution, density, length, variant), items in groups.items():

        def spread(key):
            values = [s[key] for s in items if s.get(key) is not None]
            if not values:
                return None, None
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        accuracy, std = spread("test_accuracy")
        seconds = [t for t in map(epoch_seconds, items) if t is not None]
        loss, loss_std = spread("test_loss")
        rows.append({
            "kind": kind, "model": model, "method": method, "distribution": distribution,
            "density": density, "length": length, "variant": variant,
            "actual_density": spread("density")[0],
            "n": len(items), "accuracy": accuracy, "std": std, "loss": loss,
            "loss_std": loss_std, "train_flops": spread("train_flops_vs_dense")[0],
            "inference_flops": spread("inference_flops_vs_dense")[0],
            "epoch_seconds": statistics.fmean(seconds) if seconds else None,
            "seeds": _by_seed(items, judged_by(kind)[0]), "vs_static": None,
        })
    compare_to_static(rows)
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), r["model"], -r["density"],
                             method_rank(r["method"]), r["length"], r["distribution"],
                             r["variant"]))
    return rows


def data_descriptions(runs: list[dict[str, Any]]) -> list[str]:
    """One line per distinct data set the finished ``runs`` were trained on, from their
    ``data_info`` (the text corpus, its size and SHA-256); none for data sets without it."""
    lines = {}
    for run in runs:
        s = run["summary"]
        info = s.get("data_info") if s is not None else None
        if not info:
            continue
        parts = [f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
                 for k, v in info.items()]
        lines.setdefault(f"{s.get('data', '?')}: " + ", ".join(parts), None)
    return list(lines)
