"""``sparsetrain reproduce``: train the runs behind the papers' claims, then write the claims
table (``docs/RESULTS.md``).

``STUDIES`` are the sweeps (all cells go into one folder, so cells shared by two studies are
trained once, and a second call trains only what is missing); ``claims()`` lists what is
measured on them (``claims.py``). The wall time of every call that trained something is added
up in ``reproduce.json`` in the folder, and the results file states it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import load_dataset
from .analyze import final_positions
from .claims import MARGIN, Claim, claims_table, matches, measure
from .config import ConfigError, TrainConfig
from .folder import atomic_write_json
from .report import analysis_links
from .results import collect_runs
from .sweep import PRESETS, expand_grid, run_sweep

SEEDS = [0, 1, 2]
FASHION = dict(PRESETS["fashion-mnist"]["base"])  # LeNet-300-100, 10 epochs: the main job
LENET5 = {**FASHION, "model": "lenet5", "epochs": 2}
CIFAR = {"data": "cifar10-sample", "distribution": "erk", "batch_size": 128, "lr": 0.1,
         "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "delta_t": 20,
         "progress": False}
RESNET20 = {**CIFAR, "model": "resnet20", "epochs": 5}
VGG = {**CIFAR, "model": "vgg11", "width": 0.25, "epochs": 10}

#: name -> (base settings, grid); the seeds are added to every grid.
STUDIES: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "lenet300": (FASHION, {k: v for k, v in PRESETS["fashion-mnist"]["grid"].items()
                           if k != "seed"}),
    "lenet300-5x": (FASHION, {"method": ["rigl"], "length": [5], "density": [0.05, 0.02]}),
    "lenet300-uniform": (FASHION, {"method": ["static", "set", "rigl"],
                                   "distribution": ["uniform"], "density": [0.05, 0.02]}),
    "lenet300-extreme": (FASHION, {"method": ["snip", "grasp", "synflow"],
                                   "density": [0.01, 0.002]}),
    "lenet300-random": (FASHION, {"method": ["static"], "distribution": ["uniform"],
                                  "density": [0.01, 0.002]}),
    "lenet300-ablations": (FASHION, {"method": ["snip", "grasp", "synflow"],
                                     "prune_ablation": [None, "shuffle", "reinit"],
                                     "density": [0.05, 0.02]}),
    "lenet300-itop": (FASHION, {"method": ["set", "rigl"], "delta_t": [25, 400],
                                "density": [0.05]}),
    "lenet5": (LENET5, {"method": ["dense", "small-dense", "static", "snip", "grasp", "set",
                                   "rigl"], "density": [0.05]}),
    "lenet5-uniform": (LENET5, {"method": ["static", "rigl"], "distribution": ["uniform"],
                                "density": [0.05]}),
    "resnet20": (RESNET20, {"method": ["dense", "static", "snip", "grasp", "set", "rigl"],
                            "density": [0.1]}),
    "resnet20-uniform": (RESNET20, {"method": ["static"], "distribution": ["uniform"],
                                    "density": [0.1]}),
    "vgg": (VGG, {"method": ["dense", "small-dense", "static", "snip", "grasp", "set", "rigl"],
                  "density": [0.1, 0.02]}),
    "vgg-uniform": (VGG, {"method": ["static"], "distribution": ["uniform"],
                          "density": [0.1, 0.02]}),
}
#: Rough seconds per epoch on one core, to train the longest cells first (fewer idle cores
#: at the end).
_EPOCH_COST = {"lenet300": 1.3, "lenet5": 15.0, "resnet20": 14.0, "vgg11": 3.5}

RIGL = "RigL (Evci et al., 2020)"
GRASP = "GraSP (Wang et al., 2020)"
SYNFLOW = "SynFlow (Tanaka et al., 2020)"
FRANKLE = "Frankle et al., 2021"
ITOP = "ITOP (Liu et al., 2021)"
NAMES = {"lenet300": "LeNet-300-100, Fashion-MNIST", "lenet5": "LeNet-5, Fashion-MNIST",
         "resnet20": "ResNet-20, CIFAR-10 sample", "vgg11": "VGG-11 x0.25, CIFAR-10 sample"}


def cells(cifar10_sample: str | None = None) -> list[TrainConfig]:
    """Every cell of ``STUDIES`` (once), longest first; ``cifar10_sample`` is the data folder
    (or file) of the CIFAR-10 sample, else ``$SPARSETRAIN_CIFAR10_SAMPLE`` names it."""
    found: dict[str, TrainConfig] = {}
    for base, grid in STUDIES.values():
        base = dict(base)
        if base["data"] == "cifar10-sample" and cifar10_sample:
            base["data_dir"] = str(cifar10_sample)
        for config in expand_grid(base, {**grid, "seed": SEEDS}):
            found.setdefault(config.run_name(), config)
    return sorted(found.values(), key=lambda c: -_EPOCH_COST.get(c.model, 5.0)
                  * c.trained_epochs())


def _sel(base: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """A selector of runs: the study's settings, at length 1 and unablated unless given."""
    chosen = {"length": 1.0, "prune_ablation": None, **base, **settings}
    return {k: v for k, v in chosen.items() if k not in TrainConfig.NON_SEMANTIC}


def _ranking(base: dict[str, Any], density: float, small_dense: bool) -> list[Claim]:
    where = f"{NAMES[base['model']]}, density {density:g}"
    def at(method: str) -> dict[str, Any]:
        return _sel(base, method=method, density=density)

    out = [Claim("RigL >= SET", RIGL, where, "at-least", at("rigl"), at("set")),
           Claim("SET >= Static", RIGL, where, "at-least", at("set"), at("static"))]
    if small_dense:
        out += [Claim(f"{m} >= small-dense (same parameter count)", RIGL, where, "at-least",
                      _sel(base, method=m.lower(), density=density),
                      _sel(base, method="small-dense", density=density))
                for m in ("RigL", "Static")]
    return out


def _erk(base: dict[str, Any], density: float, methods: tuple[str, ...]) -> list[Claim]:
    where = f"{NAMES[base['model']]}, density {density:g}"
    return [Claim(f"ERK >= uniform ({m})", RIGL, where, "at-least",
                  _sel(base, method=m, density=density, distribution="erk"),
                  _sel(base, method=m, density=density, distribution="uniform"))
            for m in methods]


def _pruning(base: dict[str, Any], density: float) -> list[Claim]:
    where = f"{NAMES[base['model']]}, density {density:g}"
    return [Claim("GraSP >= SNIP", GRASP, where, "at-least",
                  _sel(base, method="grasp", density=density),
                  _sel(base, method="snip", density=density)),
            Claim("SNIP > random (uniform)", GRASP, where, "superior",
                  _sel(base, method="snip", density=density),
                  _sel(base, method="static", density=density, distribution="uniform"))]


def claims() -> list[Claim]:
    """Every claim measured, in the order of the table."""
    out: list[Claim] = []
    for d in (0.1, 0.05, 0.02):
        out += _ranking(FASHION, d, small_dense=True)
    out += _ranking(LENET5, 0.05, small_dense=True)
    out += _ranking(RESNET20, 0.1, small_dense=False)
    for d in (0.1, 0.02):
        out += _ranking(VGG, d, small_dense=True)
    for d in (0.05, 0.02):
        out += _erk(FASHION, d, ("static", "set", "rigl"))
    out += _erk(LENET5, 0.05, ("static", "rigl"))
    out += _erk(RESNET20, 0.1, ("static",))
    for d in (0.1, 0.02):
        out += _erk(VGG, d, ("static",))
    for d in (0.05, 0.02):
        out.append(Claim("RigL 5x >= GMP 1x", RIGL, f"{NAMES['lenet300']}, density {d:g}",
                         "at-least", _sel(FASHION, method="rigl", density=d, length=5.0),
                         _sel(FASHION, method="gmp", density=d)))
    for d in (0.02, 0.01, 0.002):
        out += _pruning(FASHION, d)
    out += _pruning(LENET5, 0.05) + _pruning(RESNET20, 0.1)
    for d in (0.1, 0.02):
        out += _pruning(VGG, d)
    for d in (0.01, 0.002):
        out.append(Claim("SynFlow avoids layer collapse (no layer cut to one weight or none)",
                         SYNFLOW,
                         f"{NAMES['lenet300']}, density {d:g}", "collapse",
                         _sel(FASHION, method="synflow", density=d),
                         others=(_sel(FASHION, method="snip", density=d),
                                 _sel(FASHION, method="grasp", density=d))))
    for m in ("snip", "grasp", "synflow"):
        for ablation in ("shuffle", "reinit"):
            for d in (0.05, 0.02):
                what = ("masks shuffled" if ablation == "shuffle" else
                        "weights re-initialised")
                out.append(Claim(f"{m} with {what} >= {m}",
                                 FRANKLE, f"{NAMES['lenet300']}, density {d:g}", "at-least",
                                 _sel(FASHION, method=m, density=d, prune_ablation=ablation),
                                 _sel(FASHION, method=m, density=d)))
    dynamic = {"method": ("static", "set", "rigl"), "delta_t": (25, 100, 400)}
    out.append(Claim("more weights explored (ever-active) goes with higher accuracy", ITOP,
                     f"{NAMES['lenet300']}, density 0.05: Static, SET, RigL, delta_t 25/100/400",
                     "correlation", _sel(FASHION, density=0.05, **dynamic)))
    out.append(Claim("more weights explored (ever-active) goes with higher accuracy", ITOP,
                     f"{NAMES['lenet300']}, density 0.05: RigL alone, delta_t 25/100/400",
                     "correlation", _sel(FASHION, density=0.05, method="rigl",
                                         delta_t=(25, 100, 400))))
    return out


TIMING = "reproduce.json"

CAVEATS = f"""\
- **Small data, short training.** Every run here is short: {FASHION['epochs']} epochs of
  Fashion-MNIST for LeNet-300-100, {LENET5['epochs']} for LeNet-5, and {RESNET20['epochs']} and
  {VGG['epochs']} epochs of a 5,438-image sample of CIFAR-10 for ResNet-20 and VGG-11 at
  {VGG['width']:g} of its width. The papers train CIFAR-10 for 160-250 epochs
  on 50,000 images and ImageNet for 100 epochs or more. A method that needs time to find a
  good topology (RigL, SET) has few mask updates here; a claim that fails here may hold with
  the papers' budgets, and this table says nothing about it then.
- **Three seeds.** With 3 seeds the 95% interval is wide (t = 4.30 with 2 degrees of freedom):
  differences of a few tenths of a point are inconclusive unless the seeds agree closely.
- **Small models.** Layer collapse and the ERK distribution matter most in deep networks with
  layers of very different sizes; LeNet-300-100 has three layers.
- **Nothing was tuned toward the papers.** The settings are those of the README's main job (a
  learning rate and schedule chosen for dense LeNet-300-100), used for every method alike.
"""


def _timing(out: Path) -> dict[str, Any]:
    path = out / TIMING
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict) and isinstance(record.get("calls"), list):
                return record
        except (OSError, json.JSONDecodeError):
            pass
    return {"calls": []}


def train_all(out: Path, *, jobs: int, cifar10_sample: str | None = None,
              log: Callable[[str], None] = print) -> None:
    """Train every cell not finished yet; add this call's wall time to ``reproduce.json``."""
    todo = cells(cifar10_sample)
    for data, data_dir in sorted({(c.data, c.data_dir) for c in todo}, key=str):
        load_dataset(data, data_dir)  # a missing data set fails now, not after an hour
    missing = sum(not (out / c.run_name() / "summary.json").is_file() for c in todo)
    start = time.perf_counter()
    run_sweep(todo, out, jobs=jobs, log=log)
    if missing:
        record = _timing(out)
        record["calls"].append({
            "trained": missing, "jobs": jobs, "wall_s": round(time.perf_counter() - start, 1),
            "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()})
        atomic_write_json(record, out / TIMING)


def _studies_table() -> list[str]:
    lines = ["| study | model and data | epochs | methods | densities | other |",
             "|---|---|---:|---|---|---|"]
    for name, (base, grid) in STUDIES.items():
        other = ", ".join(f"{k} {'/'.join('none' if v is None else str(v) for v in vals)}"
                          for k, vals in grid.items() if k not in ("method", "density"))
        lines.append(f"| {name} | {NAMES[base['model']]} | {base['epochs']} | "
                     f"{', '.join(grid['method'])} | "
                     f"{', '.join(f'{d:g}' for d in grid['density'])} | {other or '-'} |")
    return lines


def with_active_counts(run: dict[str, Any]) -> dict[str, Any]:
    """The run's summary, with ``layer_active_counts`` read from its checkpoint where the
    summary lacks them (runs trained before summaries had them)."""
    summary = run["summary"]
    if "layer_active_counts" in summary:
        return summary
    try:
        positions = final_positions(run)
    except ConfigError:
        return summary
    return {**summary, "layer_active_counts": {k: int(v.numel()) for k, v in positions.items()}}


def _analysis_links(analysis: Path | None, where: Path) -> list[str]:
    links = analysis_links(analysis, where)
    if not links:
        return []
    return ["## Inside the runs", "",
            "`sparsetrain analyze` on the same runs: the overlap of the final masks across "
            "seeds and methods, the training loss along the lines from initialisation to "
            "solution and between solutions, the gradient norm at initialisation and through "
            "training, the ever-active fraction against accuracy, and the per-layer density "
            "over time.", ""] + [f"- [{what}]({path})" for path, what in links] + [""]


def write_results(out: Path, results: Path, command: str, *, analysis: Path | None = None
                  ) -> tuple[Path, dict[str, int]]:
    """Measure every claim on the finished runs in ``out``; write the claims table to
    ``results`` (linking ``analysis``, where ``sparsetrain analyze`` wrote about the runs,
    when given). Returns the path and the count of each verdict."""
    counted = [sel for c in claims() if c.kind == "collapse" for sel in (c.a, *c.others)]
    summaries = [with_active_counts(r) if any(matches(r["summary"], sel) for sel in counted)
                 else r["summary"] for r in collect_runs([out]) if r["summary"] is not None]
    measured = [measure(c, summaries) for c in claims()]
    counts: dict[str, int] = {}
    for m in measured:
        counts[m.verdict] = counts.get(m.verdict, 0) + 1
    calls = _timing(out)["calls"]
    wall = sum(c["wall_s"] for c in calls)
    expected = len(cells())
    timing = (f"{wall / 60:.1f} minutes of wall time to train {sum(c['trained'] for c in calls)}"
              f" runs, {calls[-1]['jobs']} at a time on a machine with {calls[-1]['cpus']} "
              f"cores (the last run trained on {calls[-1]['date']})" if calls else
              "no training time recorded (the runs were trained by another command)")
    cpu = platform.processor() or platform.machine()
    text = [
        "# The papers' claims, measured", "",
        f"Regenerated by `bash scripts/reproduce.sh` (`{command}`: trains what is missing in "
        f"`{out}`, then rewrites this "
        f"file). {len(summaries)} finished runs of the {expected} planned; {timing}. PyTorch "
        f"{torch.__version__} on {cpu}.", "",
        "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".", "",
        "Each row compares two sets of runs trained with the same seeds (0, 1, 2): *measured* is "
        "the mean test accuracy of each, their mean paired difference and its 95% confidence "
        "interval (t distribution over the seeds). `A > B` holds when the interval lies above "
        "0. `A >= B` holds when it lies above 0, or contains 0 but lies above "
        f"-{MARGIN} (no loss of more than {MARGIN * 100:g} points of accuracy is compatible "
        "with the runs); it does not hold when the interval lies below 0, and is "
        "inconclusive otherwise. 'random' is a Static run with uniform per-layer density "
        "(random pruning at initialisation).", "",
        *claims_table(measured), "",
        "## What a failure here means", "", CAVEATS,
        *_analysis_links(analysis, results.parent),
        "## The runs", "",
        "All in one folder (a cell shared by two studies is trained once), 3 seeds each. "
        "Fashion-MNIST runs use the README main job's settings (SGD with momentum 0.9, "
        "learning rate 0.05, cosine schedule, batch 128, delta_t 100); the CIFAR-10 runs use "
        "learning rate 0.1, weight decay 5e-4, the crop-and-flip augmentation, and delta_t 20. "
        "Pruning at initialisation prunes globally (SynFlow in 100 rounds); dynamic methods "
        "and Static use ERK unless the row says uniform.", "",
        *_studies_table(), "",
    ]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(text))
    return results, counts
