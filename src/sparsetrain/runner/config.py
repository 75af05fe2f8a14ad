"""The settings of one training run: defaults, YAML files, command-line overrides, checks.

A run is fully described by a ``TrainConfig``; it is saved as ``config.yaml`` in the run folder,
and ``--resume`` refuses a folder whose saved settings differ from the ones asked for.

Every YAML the command line reads (config and sweep files, ``--method-option``,
``--data-option`` and ``--grid`` values) goes through ``parse_yaml``: PyYAML's safe loader
without aliases (a few hundred bytes of ``*name`` expand to billions of items), with files
bounded in size, and every failure a ``ConfigError`` naming where the YAML came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .. import checks
from ..sparsity.distributions import DISTRIBUTIONS, check_erk_power_scale
from ..sparsity.structure import parse_structure
from ..pruning.ablations import ABLATIONS
from ..sparsity.schedules import DROP_FRACTION_DECAYS


class ConfigError(ValueError):
    """A setting that does not exist or has a value that cannot work."""


# Methods that prune once at initialisation and then train with the mask fixed (st.Static).
PRUNE_AT_INIT_METHODS = ("snip", "grasp", "synflow")
DENSE_METHODS = ("dense", "small-dense")  # the runs that train every weight
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "multistep", "constant")
PRUNE_SCOPES = ("global", "layer")
BACKENDS = ("masked", "csr")
#: Bounds of settings that would build no model, or run for ever, beyond them.
MAX_WIDTH = 16.0
MAX_COUNT = 2**31 - 1  # epochs, steps, batches, examples
MAX_SEED = 2**32 - 1
#: Numbers in ``data_options`` are counts and shapes of data made in memory (seeds apart).
MAX_DATA_NUMBER = 10**7
MAX_YAML_BYTES = 1 << 20
DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]?|1[01][0-9]|12[0-7]))?")


@dataclass
class TrainConfig:
    """Every setting of ``sparsetrain train`` (each is also a YAML key and a ``--option``)."""

    model: str | None = None
    data: str | None = None
    method: str = "rigl"
    density: float = 0.1
    distribution: str = "erk"
    structure: str = "unstructured"
    width: float = 1.0
    dense_layers: list[str] = field(default_factory=list)
    sparsify_embeddings: bool = False
    delta_t: int = 100
    alpha: float = 0.3
    drop_fraction_decay: str = "cosine"
    t_end: float = 0.75
    method_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "masked"
    prune_scope: str = "global"
    prune_iterations: int | None = None
    prune_batches: int = 4
    prune_ablation: str | None = None
    epochs: int = 10
    length: float = 1.0
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
    clip_grad_norm: float | None = None
    augment: bool | None = None
    train_size: int | None = None
    data_dir: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = False
    check_masks: bool = True
    out: str | None = None
    runs_dir: str = "runs"

    # Settings that change where or how visibly a run happens, not what it computes: they may
    # differ when a run is resumed, and are left out of derived run names.
    NON_SEMANTIC = ("device", "checkpoint_every", "log_every", "progress", "tensorboard", "out",
                    "runs_dir", "data_dir", "check_masks")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.keys()}

    def trained_epochs(self) -> int:
        """The epochs the run trains: ``epochs * length`` (``check`` accepts only settings
        that make it a whole number, within float rounding)."""
        return round(self.epochs * self.length)

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


def _close_setting(name: str) -> list[str]:
    """The setting ``name`` was likely meant for: a close spelling (difflib ratio 0.6 or more),
    or a fair one (0.5) that shares a word with it ('decay' -> 'weight_decay'); so that
    'learning_rate' is not taken for 'length' (0.53)."""
    words = {w for w in name.split("_") if w}
    return [k for k in difflib.get_close_matches(name, TrainConfig.keys(), n=3, cutoff=0.5)
            if difflib.SequenceMatcher(None, k, name).ratio() >= 0.6
            or words & set(k.split("_"))][:1]


def unknown_key_error(key: str, where: str) -> ConfigError:
    keys = TrainConfig.keys()
    close = _close_setting(normalise_key(key))
    hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are: {', '.join(keys)}"
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


class _AliasRefused(yaml.YAMLError):
    def __init__(self, event: yaml.AliasEvent):
        super().__init__()
        self.event = event


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``, ``<<: *name``), and reading numbers
    such as ``1e-3`` as YAML 1.2 does (PyYAML, YAML 1.1, wants ``1.0e-3``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event())
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(  # PyYAML copies the resolvers for the subclass first
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem or exc.context} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (safe types, no aliases); ``ConfigError`` naming ``where`` (e.g.
    ``"config file c.yaml"``, ``"the value of --data-option n_train"``) if it cannot be
    read."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _AliasRefused as exc:
        mark = exc.event.start_mark
        raise ConfigError(
            f"{where} uses the YAML alias *{exc.event.anchor} (line {mark.line + 1}, column "
            f"{mark.column + 1}); aliases are not accepted (a few can expand into billions of "
            "values): write the value out in full") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be read as YAML") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML of the file ``path`` (at most 1 MiB of UTF-8) by ``parse_yaml``; errors name
    it as ``what`` (``"config file"``, ``"sweep file"``) and the path."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path} is larger than 1 MiB; is it the right file? A {what} "
                          "holds settings only")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {data[exc.start]:#04x} at "
                          f"position {exc.start}); save it as UTF-8") from None
    return parse_yaml(text, f"{what} {path}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML config file, keys normalised (``batch-size`` -> ``batch_size``)."""
    path = Path(path)
    raw = read_yaml_file(path, "config file")
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


_CONTAINERS = (Mapping, list, tuple, set, frozenset, bytes, bytearray)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` in the type of the field ``name`` (YAML and the CLI give strings, ints...)."""
    annotation = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"setting {name!r} must be of type {annotation}, got None; leave it "
                          f"out for the default ({default!r})")
    try:
        if isinstance(value, (bytes, bytearray, set, frozenset)):
            raise ValueError
        if "bool" in annotation:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool) and value not in (0, 1):
                raise ValueError
            return bool(value)
        if annotation.startswith("list"):
            if isinstance(value, Mapping):
                raise ValueError
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            if any(isinstance(v, _CONTAINERS) or isinstance(v, bool) for v in items):
                raise ValueError
            item_type = float if "float" in annotation else str
            return [item_type(str(v).strip()) if item_type is str else item_type(v)
                    for v in items if str(v).strip() != ""]
        if annotation.startswith("dict"):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        if isinstance(value, (Mapping, list, tuple)):
            raise ValueError
        if "int" in annotation and "float" not in annotation:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in annotation:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, bool):
            raise ValueError
        return str(value)
    except OverflowError:
        raise ConfigError(f"setting {name!r} must be a finite number, got "
                          f"{checks.shown(value)}") from None
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {name!r} must be of type {annotation}, got {checks.shown(value)}"
        ) from None


def saved_setting(saved: Mapping[str, Any], key: str) -> Any:
    """Setting ``key`` of saved settings (a checkpoint's or a summary's ``config``): its
    default where they were saved before the setting existed (``None`` for a name that is no
    setting)."""
    return saved[key] if key in saved else _DEFAULTS.get(key)


_DEFAULTS = TrainConfig().to_dict()  # every setting's default, as to_dict gives it


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
        checks.choice(c.distribution, "distribution", DISTRIBUTIONS)
        structure = parse_structure(c.structure)
        _require(structure.kind == "unstructured" or c.method not in DENSE_METHODS,
                 f"structure {c.structure!r} constrains the sparse weights of a sparse method; "
                 f"method {c.method!r} has none: leave --structure out")
        checks.real_in_range(c.width, "width", 0.0, MAX_WIDTH, low_open=True,
                             fix=f"width multiplies every hidden layer; 1 is the model's own "
                             f"size, and wider than {MAX_WIDTH:g} is too large to build")
        for name in ("epochs", "batch_size", "lr_step_epochs", "delta_t", "prune_batches",
                     "log_every"):
            checks.positive_int(getattr(c, name), name, high=MAX_COUNT)
        _check_length(c.length, c.epochs)
        checks.positive_real(c.lr, "lr")
        checks.real_in_range(c.momentum, "momentum", 0.0, 1.0, high_open=True)
        checks.real_in_range(c.weight_decay, "weight_decay", 0.0)
        checks.real_in_range(c.lr_gamma, "lr_gamma", 0.0, 1.0, low_open=True,
                             meaning="the factor of the learning rate at each step or "
                             "milestone")
        for i, milestone in enumerate(c.lr_milestones):
            checks.real_in_range(milestone, f"lr_milestones[{i}]", 0.0,
                                 fix="give lr_milestones as fractions of training (<= 1) or "
                                 "epochs, e.g. 0.5,0.75")
        checks.fraction(c.alpha, "alpha", zero=True, meaning="the initial drop fraction")
        checks.choice(c.drop_fraction_decay, "drop_fraction_decay", DROP_FRACTION_DECAYS)
        checks.fraction(c.t_end, "t_end", meaning="the fraction of training after which the "
                        "mask stops changing")
        checks.choice(c.optimizer, "optimizer", OPTIMIZERS)
        checks.choice(c.lr_schedule, "lr_schedule", LR_SCHEDULES)
        checks.real_in_range(c.warmup_epochs, "warmup_epochs", 0.0)
        checks.real_in_range(c.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        if c.clip_grad_norm is not None:
            checks.positive_real(c.clip_grad_norm, "clip_grad_norm",
                                 fix="give the largest norm of the active gradients, e.g. 1.0, "
                                 "or leave it out to train without clipping")
        checks.choice(c.prune_scope, "prune_scope", PRUNE_SCOPES)
        if c.prune_ablation is not None:
            checks.choice(c.prune_ablation, "prune_ablation", ABLATIONS)
        if c.prune_iterations is not None:
            checks.positive_int(c.prune_iterations, "prune_iterations", high=MAX_COUNT)
        checks.non_negative_int(c.checkpoint_every, "checkpoint_every", high=MAX_COUNT,
                                fix="0 writes checkpoints at epoch ends only")
        if c.train_size is not None:
            checks.positive_int(c.train_size, "train_size", high=MAX_COUNT)
        checks.integer_in_range(c.seed, "seed", 0, MAX_SEED)
        checks.choice(c.backend, "backend", BACKENDS)
        _check_method_options(c.method_options)
        _check_data_options(c.data_options)
    _require(c.prune_ablation is None or c.method in PRUNE_AT_INIT_METHODS,
             f"prune_ablation changes the masks or weights of pruning at initialisation; "
             f"method {c.method!r} does not prune at initialisation: use one of "
             f"{', '.join(PRUNE_AT_INIT_METHODS)}, or leave prune_ablation out")
    _require(c.backend == "masked" or c.method not in DENSE_METHODS,
             f"backend 'csr' holds sparse weights; method {c.method!r} has none: use "
             "--backend masked")
    _require(DEVICE.fullmatch(c.device) is not None,
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N the number of a GPU, 0 to "
             f"127), got {checks.shown(c.device)}; e.g. --device cuda:0")
    for name in ("out", "runs_dir", "data_dir"):
        _require("\0" not in (getattr(c, name) or ""),
                 f"{name} must be a path, got {checks.shown(getattr(c, name))} (it holds a NUL "
                 "character)")


def _check_length(length: float, epochs: int) -> None:
    """``length`` finite and > 0, and ``epochs * length`` a whole number of epochs from 1 to
    ``MAX_COUNT`` (a run trains whole epochs, and the schedules stretch by ``length``
    exactly only then)."""
    checks.positive_real(length, "length", fix="length multiplies the training (epochs and every "
                         "schedule): give e.g. --length 2 or --length 5, or leave it out for 1")
    product = epochs * length
    _require(product <= MAX_COUNT,
             f"length {length:g} times epochs {epochs} is {product:g} epochs, more than "
             f"{MAX_COUNT}; give a smaller --length or --epochs")
    whole = round(product)
    _require(whole >= 1 and abs(product - whole) <= 1e-6 * max(1.0, product),
             f"length {length:g} times epochs {epochs} is {product:g} epochs, but a run trains "
             f"whole epochs; give a length that makes epochs * length a whole number of at "
             f"least 1 (e.g. --length 2), or change --epochs")


def _check_method_options(options: dict[str, Any]) -> None:
    for key in options:
        _require(isinstance(key, str) and key.isidentifier(),
                 f"method_options must be named by keyword names, got {checks.shown(key)}; pass "
                 "--method-option NAME=VALUE")
    if "erk_power_scale" in options:
        check_erk_power_scale(options["erk_power_scale"])


def _check_data_options(options: dict[str, Any]) -> None:
    """In general terms, as the data sets take different options: plain values, finite
    numbers, counts and sizes up to ``MAX_DATA_NUMBER``, seeds in [0, ``MAX_SEED``]."""
    for key, value in options.items():
        _require(isinstance(key, str) and key.isidentifier(),
                 f"data_options must be named by keyword names, got {checks.shown(key)}; pass "
                 "--data-option NAME=VALUE")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            name = f"data option {key}" + (f"[{i}]" if isinstance(value, list) else "")
            _require(item is None or isinstance(item, (bool, str, int, float)),
                     f"{name} must be a number, a string or a list of them, got "
                     f"{checks.shown(value)}")
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if "seed" in key:
                checks.integer_in_range(item, name, 0, MAX_SEED)
                continue
            checks.real_in_range(item, name)
            _require(abs(item) <= MAX_DATA_NUMBER,
                     f"{name} must be at most {MAX_DATA_NUMBER:,} in size, got "
                     f"{checks.shown(item)}; data options are counts and sizes of data made in "
                     "memory: give a smaller one")


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing a value met twice in full rather than as an alias, which
    ``parse_yaml`` refuses."""

    def ignore_aliases(self, data):
        return True


def dump_yaml(config: TrainConfig) -> str:
    """The settings as the YAML text of ``config.yaml``, readable by ``load_yaml``."""
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False)
