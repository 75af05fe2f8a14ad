"""The settings of one training run: defaults, YAML files, command-line overrides, checks.

A run is fully described by a ``TrainConfig``; it is saved as ``config.yaml`` in the run folder,
and ``--resume`` refuses a folder whose saved settings differ from the ones asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import difflib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .. import checks


class ConfigError(ValueError):
    """A setting that does not exist or has a value that cannot work."""


# Methods that prune once at initialisation and then train with the mask fixed (st.Static).
PRUNE_AT_INIT_METHODS = ("snip", "grasp", "synflow")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "multistep", "constant")
PRUNE_SCOPES = ("global", "layer")
BACKENDS = ("masked", "csr")


@dataclass
class TrainConfig:
    """Every setting of ``sparsetrain train`` (each is also a YAML key and a ``--option``)."""

    model: str | None = None
    data: str | None = None
    method: str = "rigl"
    density: float = 0.1
    distribution: str = "erk"
    width: float = 1.0
    dense_layers: list[str] = field(default_factory=list)
    delta_t: int = 100
    alpha: float = 0.3
    drop_fraction_decay: str = "cosine"
    t_end: float = 0.75
    method_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "masked"
    prune_scope: str = "global"
    prune_iterations: int | None = None
    prune_batches: int = 4
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_gamma: float = 0.1
    lr_step_epochs: int = 30
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool | None = None
    train_size: int | None = None
    data_dir: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    progress: bool = True
    check_masks: bool = True
    out: str | None = None
    runs_dir: str = "runs"

    # Settings that change where or how visibly a run happens, not what it computes: they may
    # differ when a run is resumed, and are left out of derived run names.
    NON_SEMANTIC = ("device", "checkpoint_every", "log_every", "progress", "out", "runs_dir",
                    "data_dir", "check_masks")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.keys()}

    def semantic_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_SEMANTIC}

    def run_name(self) -> str:
        """A folder name from the model, data, method and every other non-default setting."""
        default = TrainConfig()
        parts = [str(self.model), str(self.data), self.method, f"density{self.density}"]
        for key in self.keys():
            if key in ("model", "data", "method", "density") or key in self.NON_SEMANTIC:
                continue
            value = getattr(self, key)
            if value != getattr(default, key):
                parts.append(f"{key}{_short(value)}")
        name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts))
        if len(name) > 150:  # keep folder names short and still distinct
            name = name[:140] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        return name


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_short(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{_short(v)}" for k, v in sorted(value.items()))
    return str(value)


def normalise_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def unknown_key_error(key: str, where: str) -> ConfigError:
    keys = TrainConfig.keys()
    close = difflib.get_close_matches(normalise_key(key), keys, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are: {', '.join(keys)}"
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML config file, keys normalised (``batch-size`` -> ``batch_size``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not a "
                          f"{type(raw).__name__}")
    settings = {}
    for key, value in raw.items():
        name = normalise_key(key)
        if name not in TrainConfig.keys():
            raise unknown_key_error(key, f"config file {path}")
        settings[name] = value
    return settings


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` in the type of the field ``name`` (YAML and the CLI give strings, ints...)."""
    if value is None:
        return None
    annotation = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    try:
        if "bool" in annotation:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if annotation.startswith("list"):
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            item_type = float if "float" in annotation else str
            return [item_type(str(v).strip()) if item_type is str else item_type(v)
                    for v in items if str(v).strip() != ""]
        if annotation.startswith("dict"):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        if "int" in annotation and "float" not in annotation:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in annotation:
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if math.isnan(result):
                raise ValueError
            return result
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {name!r} must be of type {annotation}, got {value!r}"
        ) from None


def make_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """A checked ``TrainConfig`` from settings dicts, later ones overriding earlier ones."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = normalise_key(key)
            if name not in TrainConfig.keys():
                raise unknown_key_error(key, "the settings")
            merged[name] = value
    defaults = TrainConfig()
    values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in merged.items()}
    config = TrainConfig(**values)
    check(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@contextmanager
def _as_config_error():
    """The ``ValueError`` of a check (``sparsetrain.checks``) raised as a ``ConfigError``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check(config: TrainConfig) -> None:
    """Raise ``ConfigError`` for settings that cannot work (names are checked when used)."""
    c = config
    _require(c.model is not None, "no model given: pass --model (e.g. --model lenet300)")
    _require(c.data is not None, "no data set given: pass --data (e.g. --data fashion-mnist)")
    with _as_config_error():
        checks.fraction(c.density, "density", meaning="the fraction of weights kept")
        checks.positive_real(c.width, "width", fix="width multiplies every hidden layer; 1 is "
                             "the model's own size")
        checks.positive_int(c.epochs, "epochs")
        checks.positive_int(c.batch_size, "batch_size")
        checks.positive_real(c.lr, "lr")
        checks.real_in_range(c.momentum, "momentum", 0.0)
        checks.real_in_range(c.weight_decay, "weight_decay", 0.0)
        checks.positive_real(c.lr_gamma, "lr_gamma")
        checks.positive_int(c.lr_step_epochs, "lr_step_epochs")
        checks.positive_int(c.delta_t, "delta_t")
        checks.fraction(c.t_end, "t_end", meaning="the fraction of training after which the "
                        "mask stops changing")
        checks.choice(c.optimizer, "optimizer", OPTIMIZERS)
        checks.choice(c.lr_schedule, "lr_schedule", LR_SCHEDULES)
        checks.real_in_range(c.warmup_epochs, "warmup_epochs", 0.0)
        checks.real_in_range(c.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        checks.choice(c.prune_scope, "prune_scope", PRUNE_SCOPES)
        if c.prune_iterations is not None:
            checks.positive_int(c.prune_iterations, "prune_iterations")
        checks.positive_int(c.prune_batches, "prune_batches")
        checks.non_negative_int(c.checkpoint_every, "checkpoint_every",
                                fix="0 writes checkpoints at epoch ends only")
        checks.positive_int(c.log_every, "log_every")
        if c.train_size is not None:
            checks.positive_int(c.train_size, "train_size")
        checks.choice(c.backend, "backend", BACKENDS)
    _require(c.backend == "masked" or c.method not in ("dense", "small-dense"),
             f"backend 'csr' holds sparse weights; method {c.method!r} has none: use "
             "--backend masked")
    _require(c.device in ("auto", "cpu") or c.device.startswith("cuda"),
             f"device must be 'auto', 'cpu' or 'cuda[:N]', got {c.device!r}")


def save_yaml(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
