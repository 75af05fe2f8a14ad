"""Building a run from its settings: device, data, model, optimizer, sparsifier.

``build_run`` does it in a fixed order, because the order is part of the run: the global torch
RNG is seeded with ``config.seed`` right before the model is built (after the small-dense width
search, which builds models of its own), the dense FLOPs reference is measured before the
sparsifier is made (on the CSR backend the sparsifier replaces the dense layers), and under
torch.distributed the model is wrapped by DDP last and every process's RNG reseeded by rank.
Building the same settings twice gives the same run, bit for bit.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data import Dataset, load_dataset
from ..flops import flops
from ..methods import get_method, make_sparsifier
from ..methods.dst import Static
from ..models import build_model, model_inputs
from ..pruning import prune_at_init, small_dense_width
from ..pruning.ablations import shuffle_masks
from ..sparsity.masks import density_mismatch, validate_masks
from ..sparsity.targets import partition
from . import folder
from .config import (DENSE_METHODS, MAX_COUNT, PRUNE_AT_INIT_METHODS, ConfigError,
                     TrainConfig)
from .data_order import epoch_order
from .distributed import Distributed
from .measure import flat_predictions

SMALL_DENSE = "small-dense"
Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when torch sees a device, else the CPU; a CUDA device that is not there
    is a ``ConfigError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device here; "
                          "use --device cpu")
    return device


def check_method(method: str) -> None:
    """``ConfigError`` unless ``method`` is a registered method, dense, small-dense or pruning
    at initialisation."""
    if method in DENSE_METHODS or method in PRUNE_AT_INIT_METHODS:
        return
    try:
        get_method(method)
    except ValueError as exc:
        raise ConfigError(f"{exc}; or 'dense', 'small-dense', or pruning at initialisation: "
                          f"{', '.join(PRUNE_AT_INIT_METHODS)}") from None


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the settings over all of ``model``'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


#: The kind of data set (``Dataset.kind``) each kind of model input (``models.model_inputs``)
#: needs.
DATA_KIND_OF_INPUTS = {"features": "classification", "tokens": "sequence"}


def check_model_fits_data(config: TrainConfig, data: Dataset) -> None:
    """``ConfigError`` unless the model reads what the data set holds (features and labels, or
    token sequences and next tokens)."""
    inputs = model_inputs(config.model)
    if DATA_KIND_OF_INPUTS[inputs] != data.kind:
        fits = ("a sequence data set (--data text)" if inputs == "tokens"
                else "a data set of features and labels (e.g. --data fashion-mnist)")
        raise ConfigError(f"model {config.model!r} reads {inputs}, but data set {config.data!r} "
                          f"holds {data.kind} examples; use {fits}, or a model for "
                          f"{config.data!r} (see sparsetrain list)")
    if config.augment and data.kind != "classification":
        raise ConfigError(f"data set {config.data!r} has no augmentation (it is for images); "
                          "leave --augment out")


def build_network(config: TrainConfig, data: Dataset, width: float) -> nn.Module:
    """The settings' model for ``data`` at ``width`` (initialised from the global RNG)."""
    return build_model(config.model, num_classes=data.num_classes,
                       input_shape=tuple(data.input_shape), width=width)


def small_dense(config: TrainConfig, data: Dataset, log: Log) -> float:
    """The width at which the dense model has as many weights as the sparse one keeps."""
    c = config
    sparse, dense = partition(build_network(c, data, c.width), list(c.dense_layers),
                              sparsify_embeddings=c.sparsify_embeddings)
    target = round(c.density * sum(t.numel for t in sparse)) + sum(t.numel for t in dense)
    result = small_dense_width(lambda w: build_network(c, data, w), target,
                               low=0.01 * c.width, high=c.width)
    log(f"small-dense: width {result.width:.4g} has {result.params} sparsifiable "
        f"weights (the sparse model keeps {target})")
    return result.width


@dataclass
class Run:
    """Everything ``build_run`` makes; ``net`` is what the training steps run (the model, or
    its DDP wrapper); ``checkpoint`` is the loaded checkpoint when resuming, else ``None``."""

    device: torch.device
    data: Dataset
    n_train: int
    steps_per_epoch: int
    total_steps: int
    width: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    checkpoint: dict[str, Any] | None
    example: torch.Tensor
    dense_flops: float
    sparsifier: Any | None
    net: nn.Module


def build_run(config: TrainConfig, dist: Distributed, log: Log,
              resume_from: Path | None = None, changed: Iterable[str] = ()) -> Run:
    """Build the run of ``config`` on this process; with ``resume_from``, load that folder's
    checkpoint (checked against ``config``, but for the settings named in ``changed``) and take
    a pruned run's masks from it. Raises ``ConfigError`` for settings that cannot work here."""
    c = config
    check_method(c.method)
    device = dist.device(resolve_device(c.device))
    if c.batch_size < dist.world:
        raise ConfigError(f"batch_size {c.batch_size} is the total batch over all "
                          f"{dist.world} processes, so it must be at least that")
    data = load_dataset(c.data, c.data_dir, **c.data_options)
    check_model_fits_data(c, data)
    n_train = len(data.train_y) if c.train_size is None else min(len(data.train_y), c.train_size)
    steps_per_epoch = math.ceil(n_train / c.batch_size)
    total_steps = steps_per_epoch * c.trained_epochs()  # epochs * length
    width = small_dense(c, data, log) if c.method == SMALL_DENSE else c.width
    torch.manual_seed(c.seed)
    model = build_network(c, data, width).to(device)
    optimizer = make_optimizer(c, model)
    checkpoint = (folder.load_checkpoint(resume_from, c, changed)
                  if resume_from is not None else None)
    example = data.prepare(data.train_x[:1], train=False).to(device)
    reference = model if c.method != SMALL_DENSE else build_network(c, data, c.width)
    dense_flops = flops(reference.to(device), example).total
    if c.method in DENSE_METHODS:
        sparsifier = None
    elif c.method in PRUNE_AT_INIT_METHODS:
        # on resume the checkpoint holds the masks (their per-layer counts are the pruning's,
        # which a CSR layer must have before the weights are loaded)
        if checkpoint is None:
            masks = _pruned_masks(c, model, data, n_train, steps_per_epoch, device, dist, log)
            masks = _ablate(c, model, masks, data, width, device, log)
        else:  # the checkpoint holds the ablated masks and weights
            masks = _saved_pruned_masks(checkpoint, model, c.density)
        sparsifier = Static(model, optimizer, distribution=c.distribution, masks=masks,
                            **_common_options(c, total_steps))
    else:
        sparsifier = _registered_sparsifier(c, model, optimizer, total_steps)
    if sparsifier is not None:
        log(sparsifier.summary())
    net = model
    if dist.active:
        # after the sparsifier: it names weights as the model does, and the CSR backend
        # replaces layers, which DDP must see in their final form
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        torch.manual_seed(c.seed * 1000 + dist.rank)  # dropout differs per rank
    return Run(device, data, n_train, steps_per_epoch, total_steps, width, model, optimizer,
               checkpoint, example, dense_flops, sparsifier, net)


def _common_options(c: TrainConfig, total_steps: int) -> dict[str, Any]:
    # a method's own default structure (SRigL: fan-in) unless one is given
    structure = {} if c.structure == "unstructured" else {"structure": c.structure}
    return dict(density=c.density, total_steps=total_steps, dense_layers=list(c.dense_layers),
                seed=c.seed, backend=c.backend, sparsify_embeddings=c.sparsify_embeddings,
                **structure)


def saved_active_sets(state: Any) -> dict[str, torch.Tensor] | None:
    """The active sets of a saved sparsifier state, for ``masks=`` (sorted positions, or the
    bool masks of states saved before positions were); ``None`` when it has neither, and the
    sparsifier then reports what is wrong when it loads the state."""
    if not isinstance(state, dict):
        return None
    saved = {}
    for key in ("masks", "positions"):
        if isinstance(state.get(key), dict):
            saved.update(state[key])
    return saved or None


def _saved_pruned_masks(checkpoint: dict[str, Any], model: nn.Module, density: float):
    """The active sets of a resumed run pruned at initialisation; ``ConfigError`` unless they
    keep the configured density (to a weight per layer, the pruning's rounding)."""
    saved = saved_active_sets(checkpoint.get("sparsifier"))
    params = dict(model.named_parameters())
    if not saved or not all(n in params for n in saved):
        return saved  # the sparsifier says what is wrong when it loads the state
    shapes = {n: tuple(params[n].shape) for n in saved}
    try:
        positions = validate_masks(saved, shapes, None)
    except ValueError:
        return saved  # likewise
    mismatch = density_mismatch(positions, shapes, density)
    if mismatch is not None:
        raise ConfigError(f"the checkpoint's masks keep {mismatch[0]} of {mismatch[1]} weights, "
                          f"not the run's density {density}; it was altered or is of another "
                          "run")
    return saved


#: Method options that name a step of training (the methods' ``t_start``, ``t_end``; GMP's
#: ``start_step``, ``end_step``): given for the run at length 1, they are multiplied by the
#: training length. Periods (``delta_t``, ``frequency``) are not: the RigL paper's longer runs
#: keep the update interval (google-research/rigl, ``imagenet_train_eval.py``: its
#: ``training_steps_multiplier`` scales ``maskupdate_begin_step`` and ``maskupdate_end_step``,
#: not ``maskupdate_frequency``).
STEP_OPTIONS = ("t_start", "t_end", "start_step", "end_step")


def scaled_step_options(options: dict[str, Any], length: float) -> dict[str, Any]:
    """``options`` with each ``STEP_OPTIONS`` integer s in [1, ``MAX_COUNT``] as
    ``max(1, round(s * length))``; other values as given, for the method to check."""
    scaled = dict(options)
    for key in STEP_OPTIONS:
        value = scaled.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_COUNT:
            scaled[key] = max(1, round(value * length))
    return scaled


def accepted_keywords(cls: type) -> set[str]:
    """The keywords a class's constructor takes, through ``**kwargs`` handed on to a base
    class's constructor (SRigL takes RigL's)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _registered_sparsifier(c: TrainConfig, model: nn.Module, optimizer, total_steps: int):
    # the schedule settings every method may take; each gets those its constructor names
    # (t_end, and GMP's default start and end, are fractions of total_steps, which the
    # training length has scaled already)
    schedule = dict(distribution=c.distribution, delta_t=c.delta_t, alpha=c.alpha,
                    drop_fraction_decay=c.drop_fraction_decay,
                    t_end=max(1, int(c.t_end * total_steps)))
    accepted = accepted_keywords(get_method(c.method))
    options: dict[str, Any] = {k: v for k, v in schedule.items() if k in accepted}
    options.update(scaled_step_options(c.method_options, c.length))
    try:
        return make_sparsifier(c.method, model, optimizer, **_common_options(c, total_steps),
                               **options)
    except TypeError as exc:
        raise ConfigError(f"method {c.method!r} does not take these method_options: "
                          f"{exc}") from None


def _flat_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per prediction (per example, or per position of a sequence)."""
    return nn.functional.cross_entropy(*flat_predictions(out, y))


#: Added to the seed to draw the weights of ``--prune-ablation reinit`` afresh.
REINIT_SEED_OFFSET = 1_000_003


def _ablate(c: TrainConfig, model: nn.Module, masks: dict[str, torch.Tensor], data: Dataset,
            width: float, device: torch.device, log: Log) -> dict[str, torch.Tensor]:
    """``--prune-ablation``: the pruned masks shuffled within each layer (exact counts), or
    the model's weights drawn again from another seed under the same masks."""
    if c.prune_ablation == "shuffle":
        masks = shuffle_masks(masks, c.seed)
        log(f"{c.method}: masks shuffled within each layer (the same count in each)")
    elif c.prune_ablation == "reinit":
        torch.manual_seed(c.seed + REINIT_SEED_OFFSET)
        model.load_state_dict(build_network(c, data, width).to(device).state_dict())
        log(f"{c.method}: weights drawn afresh (seed {c.seed} + {REINIT_SEED_OFFSET}) under "
            "the pruned masks")
    return masks


def _pruned_masks(c: TrainConfig, model: nn.Module, data: Dataset, n_train: int,
                  steps_per_epoch: int, device: torch.device, dist: Distributed,
                  log: Log) -> dict[str, torch.Tensor]:
    """Prune at initialisation on the first ``prune_batches`` batches of the seed's order for
    epoch -1; rank 0's masks on every process."""
    order = epoch_order(n_train, c.seed, -1)
    batches = []
    for i in range(min(c.prune_batches, steps_per_epoch)):
        idx = order[i * c.batch_size:(i + 1) * c.batch_size]
        x = data.prepare(data.train_x[idx], train=False)
        batches.append((x.to(device), data.prepare_targets(data.train_y[idx]).to(device)))
    iterations = c.prune_iterations or (100 if c.method == "synflow" else 1)
    # GraSP draws a balanced sample of each class, which needs one label per example: on
    # sequence data (a label per position) it scores every example of the batches
    options = ({"samples_per_class": None}
               if c.method == "grasp" and data.kind != "classification" else {})
    start = time.perf_counter()
    # attention through its math kernel: GraSP differentiates twice, which the fused CPU
    # kernels of F.scaled_dot_product_attention cannot (models without attention: no change)
    with sdpa_kernel(SDPBackend.MATH):
        masks = prune_at_init(
            model, c.method, c.density, data=batches, scope=c.prune_scope,
            iterations=iterations, distribution=c.distribution if c.prune_scope == "layer"
            else None, dense_layers=list(c.dense_layers), seed=c.seed,
            sparsify_embeddings=c.sparsify_embeddings, structure=c.structure,
            loss_fn=_flat_cross_entropy, **options)
    log(f"{c.method}: pruned at initialisation to density {c.density} "
        f"({iterations} round(s), {time.perf_counter() - start:.1f} s)")
    # every rank scored the same batches; rank 0's masks are the run's all the same
    return {n: dist.broadcast(m) for n, m in masks.items()}
