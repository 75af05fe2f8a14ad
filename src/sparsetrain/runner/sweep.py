"""Sweeps: a grid of training runs (methods x densities x distributions x seeds x ...).

Each cell of the grid is one ``sparsetrain train`` run in its own folder under the sweep
folder, named from its settings. Finished cells (with a ``summary.json``) are skipped and
interrupted ones resumed from their checkpoint, so running a sweep again continues it.
``jobs > 1`` trains cells in parallel processes.

A sweep file is YAML with two mappings, ``base`` (settings shared by every cell) and ``grid``
(setting -> list of values)::

    base: {model: lenet300, data: fashion-mnist, epochs: 10, distribution: erk}
    grid: {method: [dense, static, rigl], density: [0.1, 0.05], seed: [0, 1]}

Dense training does not depend on the density or the distribution: its cells are merged.
A sweep file or a preset (and ``expand_grid``) may also name cells to leave out of the
product, ``exclude``: a list of mappings of settings to a value or a list of values; a cell is
left out when each setting of one such mapping has one of its values (the "long" preset: GMP
at length 1 only)::

    exclude: [{method: gmp, length: [2, 5]}]
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .cells import SweepFailed, SweepStopped, train_cells
from ..methods import available_methods
from .config import (DENSE_METHODS, ConfigError, TrainConfig, make_config, normalise_key,
                     read_yaml_file, unknown_key_error)
from .folder import is_finished

__all__ = ["PRESETS", "SweepFailed", "SweepStopped", "expand_grid", "load_sweep_exclude",
           "load_sweep_file", "read_sweep_file", "run_sweep"]

PRESETS: dict[str, dict[str, Any]] = {
    # The README's main job: 66 runs (3 seeds), 10-15 minutes on 2 CPU cores, setup included.
    "fashion-mnist": {
        "base": {"model": "lenet300", "data": "fashion-mnist", "distribution": "erk",
                 "epochs": 10, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine",
                 "delta_t": 100, "progress": False},
        "grid": {"method": ["dense", "small-dense", "static", "snip", "grasp", "set", "rigl",
                            "gmp"],
                 "density": [0.1, 0.05, 0.02], "seed": [0, 1, 2]},
    },
    # Byte-level language modelling, like the RigL paper's character-level experiment, on the
    # default text corpus (the first 1 MiB of the Python standard library's .py files, 10%
    # held out): gpt-mini at width 0.5 (embedding 128, 0.87M weights), sequences of 128
    # bytes, 2 epochs of 231 steps, AdamW with the gradients clipped at norm 1 (without clipping
    # the dense runs stall on plateaus, 1.68-2.17 nats/byte over three seeds). Dense runs once
    # per seed. About 26 minutes on 2 CPU cores with --jobs 2 (140 s a run on one core);
    # docs/language_model.md.
    "lm": {
        "base": {"model": "gpt-mini", "data": "text", "data_options": {"context": 128},
                 "width": 0.5, "distribution": "erk", "epochs": 2,
                 "batch_size": 32, "optimizer": "adamw", "lr": 3.0e-3, "weight_decay": 0.05,
                 "lr_schedule": "cosine", "warmup_epochs": 0.1, "clip_grad_norm": 1.0,
                 "delta_t": 25, "progress": False},
        "grid": {"method": ["dense", "static", "set", "rigl"], "density": [0.1, 0.05],
                 "seed": [0, 1, 2]},
    },
    # The RigL paper's longer training (its Fig. 2: RigL at 5x against pruning) on the
    # fashion-mnist preset's setting: Static, SET and RigL at lengths 1, 2 and 5 (epochs and
    # every schedule stretched, --length), GMP at length 1; densities 0.05 and 0.02, three
    # seeds: 60 runs, 1500 epochs in all. An estimate, not a measurement: about 20 minutes on
    # 2 CPU cores with --jobs 2, scaled from the fashion-mnist main job (22 runs of 10 epochs
    # in about 3 minutes, 0.8 s an epoch); docs/long_training.md.
    "long": {
        "base": {"model": "lenet300", "data": "fashion-mnist", "distribution": "erk",
                 "epochs": 10, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine",
                 "delta_t": 100, "progress": False},
        "grid": {"method": ["static", "set", "rigl", "gmp"], "length": [1, 2, 5],
                 "density": [0.05, 0.02], "seed": [0, 1, 2]},
        "exclude": [{"method": "gmp", "length": [2, 5]}],
    },
    # What a structure buys and costs: Static and RigL on the CSR backend, unstructured, 2:4,
    # fan-in and block:4x4, at densities 0.1 and 0.05 (2:4 holds density 0.5 only: it runs
    # there, beside unstructured at 0.5). The 10-output classifier stays dense in every run, as
    # no 4-row block tiles it. The report adds seconds per epoch and accuracy against time.
    # 48 runs (3 seeds): about 6 minutes on 2 CPU cores with --jobs 2.
    "structured": {
        "base": {"model": "lenet300", "data": "fashion-mnist", "distribution": "erk",
                 "epochs": 10, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine",
                 "delta_t": 100, "backend": "csr", "dense_layers": ["fc3.weight"],
                 "progress": False},
        "grid": {"method": ["static", "rigl"],
                 "structure": ["unstructured", "2:4", "fan-in", "block:4x4"],
                 "density": [0.5, 0.1, 0.05], "seed": [0, 1, 2]},
        "exclude": [{"structure": "2:4", "density": [0.1, 0.05]},
                    {"structure": ["fan-in", "block:4x4"], "density": 0.5}],
    },
    # Every registered method (those since RigL included) beside dense and small-dense, on the
    # main job's setting: LeNet-300-100 on Fashion-MNIST, 10 epochs, ERK, densities 0.1, 0.05
    # and 0.02, 3 seeds. Each method runs with its own defaults (the paper's, scaled to the run's
    # length); the README gives the measured time on 2 cores and the table.
    "methods": {
        "base": {"model": "lenet300", "data": "fashion-mnist", "distribution": "erk",
                 "epochs": 10, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine",
                 "delta_t": 100, "progress": False},
        "grid": {"method": [*DENSE_METHODS, *available_methods()],
                 "density": [0.1, 0.05, 0.02], "seed": [0, 1, 2]},
    },
    # The RigL paper's CIFAR-10 setting (WRN-22-2, 80% and 90% sparsity) and the GraSP paper's
    # VGG19 and ResNet32 at 90-98%: for a machine with a GPU and the CIFAR-10 batches in
    # data/cifar-10-batches-py.
    "paper-cifar10": {
        "base": {"data": "cifar10", "data_dir": "data", "epochs": 200, "batch_size": 128,
                 "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4,
                 "lr_schedule": "multistep", "lr_milestones": [0.3, 0.6, 0.8],
                 "lr_gamma": 0.2, "warmup_epochs": 1, "distribution": "erk"},
        "grid": {"model": ["wrn-22-2", "vgg19", "resnet32"],
                 "method": ["dense", "small-dense", "static", "snip", "grasp", "set", "rigl",
                            "gmp"],
                 "density": [0.2, 0.1, 0.05, 0.02], "seed": [0, 1, 2]},
    },
}


def load_sweep_file(path: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``base`` and ``grid`` of a sweep file (``read_sweep_file`` gives its ``exclude`` too)."""
    return read_sweep_file(path)[:2]


def read_sweep_file(path: str | Path
                    ) -> tuple[dict[str, Any], dict[str, list[Any]], list[dict[str, Any]]]:
    """``base``, ``grid`` and ``exclude`` (empty when it has none, checked) of a sweep file."""
    path = Path(path)
    raw = read_yaml_file(path, "sweep file")
    if not isinstance(raw, Mapping) or set(raw) - {"base", "grid", "exclude"}:
        raise ConfigError(f"sweep file {path} must be a mapping with the keys 'base' and "
                          "'grid' (and, if cells are left out, 'exclude')")
    parts = {key: raw.get(key) or {} for key in ("base", "grid")}
    for key, part in parts.items():
        if not isinstance(part, Mapping):
            raise ConfigError(f"sweep file {path}: {key!r} must be a mapping (setting: "
                              f"{'value' if key == 'base' else 'list of values'}), not a "
                              f"{type(part).__name__}")
    exclude = raw.get("exclude") or []
    try:
        _exclusions(exclude)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {path}: {exc}") from None
    return dict(parts["base"]), dict(parts["grid"]), list(exclude)


def load_sweep_exclude(path: str | Path) -> list[dict[str, Any]]:
    """The ``exclude`` list of a sweep file (empty when it has none), checked."""
    return read_sweep_file(path)[2]


def expand_grid(base: Mapping[str, Any], grid: Mapping[str, Any],
                exclude: Iterable[Mapping[str, Any]] = ()) -> list[TrainConfig]:
    """The checked settings of every cell, dense cells merged, in grid order, but for the
    cells that match an entry of ``exclude`` (``excluded``)."""
    rules = _exclusions(exclude)
    keys = []
    for key, values in grid.items():
        name = normalise_key(key)
        if name not in TrainConfig.keys():
            raise unknown_key_error(key, "the sweep grid")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid entry {key!r} must be a non-empty list of values")
        keys.append(name)
    cells, seen = [], set()
    for combination in itertools.product(*(grid[k] for k in grid)):
        settings = dict(base)
        settings.update(zip(keys, combination))
        if settings.get("method") == "dense":
            settings.update(density=1.0, distribution=TrainConfig.distribution)
        config = make_config(settings)
        if any(excluded(config, rule) for rule in rules):
            continue
        key = config.run_name()
        if key not in seen:
            seen.add(key)
            cells.append(config)
    return cells


def _exclusions(exclude: Iterable[Mapping[str, Any]]) -> list[dict[str, list[Any]]]:
    """``exclude`` checked: mappings of known settings to a value or a non-empty list of
    values, none empty (it would leave out every cell)."""
    if isinstance(exclude, Mapping) or not isinstance(exclude, Iterable):
        raise ConfigError("exclude must be a list of mappings (setting: value or list of "
                          f"values), not a {type(exclude).__name__}")
    rules = []
    for rule in exclude:
        if not isinstance(rule, Mapping) or not rule:
            raise ConfigError(f"an entry of exclude must be a non-empty mapping (setting: value "
                              f"or list of values), got {rule!r}")
        checked = {}
        for key, values in rule.items():
            name = normalise_key(key)
            if name not in TrainConfig.keys():
                raise unknown_key_error(key, "exclude")
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise ConfigError(f"exclude entry {key!r} must name at least one value")
            checked[name] = values
        rules.append(checked)
    return rules


def excluded(config: TrainConfig, rule: Mapping[str, list[Any]]) -> bool:
    """Whether every setting of ``rule`` has in ``config`` one of the rule's values (compared
    with ``==``, so ``length: 2`` matches 2.0)."""
    return all(getattr(config, key) in values for key, values in rule.items())


def run_sweep(cells: list[TrainConfig], out_dir: str | Path, *, jobs: int = 1,
              log: Callable[[str], None] = print) -> list[Path]:
    """Train every cell not finished yet; return the run folders of all cells.

    Each cell is trained under its folder's lock, so sweeps started together on one folder
    share the cells: a cell that another process trains is waited for, not trained twice.
    SIGINT, SIGTERM or SIGHUP make every running cell finish its step and write a checkpoint,
    then raise ``SweepStopped``; cells that failed raise ``SweepFailed`` once the others are
    trained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = [out_dir / c.run_name() for c in cells]
    todo = [(c, f) for c, f in zip(cells, folders) if not is_finished(f)]
    log(f"sweep: {len(cells)} runs, {len(cells) - len(todo)} already finished, "
        f"{len(todo)} to train, {jobs} at a time; folder {out_dir}")
    train_cells(todo, jobs, log)
    return folders
