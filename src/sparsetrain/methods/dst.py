"""Dynamic sparse training with a fixed number of non-zeros: Static, SET, SNFS and RigL.

RigL paper ("Rigging the Lottery: Making All Tickets Winners", Evci et al. 2020), Algorithm 1,
and ``shared/spec/algorithms.md``. Every ``delta_t`` steps until ``t_end`` each sparse layer
drops the ``floor(f(t) * n_active)`` active weights of smallest magnitude and grows as many
inactive connections with the largest grow score; the methods differ only in that score:

- Static: no topology update at all.
- SET: uniformly random scores.
- SNFS: ``|EMA(0.9) of the dense gradient|``, updated every step.
- RigL: ``|dense gradient|`` of the current batch w.r.t. the effective weight ``W * M``.

Grown weights start at zero with zero optimizer state; inactive weights stay exactly zero
through every optimizer step. All randomness comes from one CPU generator seeded with ``seed``,
so data-parallel replicas given the same seed and (averaged) gradients pick identical masks.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..backends import make_backend
from ..sparsity.distributions import check_density, densities_for_shapes
from ..sparsity.masks import validate_masks
from ..sparsity.schedules import drop_fraction, is_update_step
from ..sparsity.selection import drop_and_grow
from ..sparsity.targets import Target, partition
from .registry import register_method


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_optimizer(optimizer: Any, params: Iterable[torch.Tensor], names: list[str]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(names, params) if id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"the optimizer does not update the sparsified weights {missing}; build the "
            "optimizer from model.parameters() of the same model, or keep those weights dense "
            "with dense_layers"
        )


def _distribution_config(distribution: str | Mapping[str, float]) -> str | dict[str, float]:
    """The distribution as a plain value for a state_dict (a custom map as a dict of floats)."""
    if isinstance(distribution, Mapping):
        return {str(k): float(v) for k, v in distribution.items()}
    return distribution


class DynamicSparsifier:
    """Base of the fixed-budget sparse training methods; on its own it is Static.

    Use it in place of ``optimizer.step()``::

        sparsifier = st.RigL(model, opt, density=0.1, total_steps=len(loader) * epochs)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            sparsifier.step()

    Arguments (keywords): ``density`` in (0, 1], the fraction of the sparsified weights kept;
    ``distribution`` ``"uniform"``, ``"er"``, ``"erk"`` or a dict name -> density;
    ``total_steps`` the number of ``step()`` calls planned; ``delta_t`` steps between topology
    updates; ``alpha`` the initial drop fraction; ``drop_fraction_decay`` ``"cosine"``,
    ``"linear"`` or ``"constant"``; ``t_end`` the last step that may update (default
    ``0.75 * total_steps``); ``t_start`` updates come after it; ``dense_layers`` names or glob
    patterns of weights kept dense; ``masks`` a dict name -> bool tensor that replaces the
    random initial masks (then the layer densities are those of the masks); ``seed`` for all
    randomness; ``backend`` ``"masked"`` (dense weights times masks, any layer) or ``"csr"``
    (every sparsified ``nn.Linear`` converted in place to a ``CSRLinear`` whose time and memory
    scale with its density; Static, SET and RigL); ``allow_regrowth`` whether a weight dropped by an
    update may be grown back by the same update (the reference code's behaviour; it then keeps
    its value); ``optimizer_step_on_update`` whether an update step also applies the
    optimizer step (default: the method's, as in the reference code: RigL and SNFS replace it,
    SET applies it first).
    """

    method_name = "static"
    fixed_budget = True  # every layer keeps its number of active weights from start to end
    updates_topology = False
    #: How a compact (CSR) layer grows: "random", "gradient", or None (no growth).
    compact_grow: str | None = None
    supports_compact = True  # whether backend="csr" can run this method
    default_optimizer_step_on_update = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        distribution: str | Mapping[str, float] = "erk",
        total_steps: int,
        delta_t: int = 100,
        alpha: float = 0.3,
        drop_fraction_decay: str = "cosine",
        t_end: int | None = None,
        dense_layers: Iterable[str] | str = (),
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str = "masked",
        t_start: int = 0,
        erk_power_scale: float = 1.0,
        allow_regrowth: bool = True,
        optimizer_step_on_update: bool | None = None,
    ):
        self.density = check_density(density)
        self.total_steps = _positive_int(total_steps, "total_steps")
        self.delta_t = _positive_int(delta_t, "delta_t")
        if not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (the initial drop fraction) must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        drop_fraction(0, alpha=self.alpha, t_end=1, decay=drop_fraction_decay)  # validates
        self.drop_fraction_decay = drop_fraction_decay
        self.t_end = (
            int(0.75 * self.total_steps) if t_end is None else _positive_int(t_end, "t_end")
        )
        if isinstance(t_start, bool) or not isinstance(t_start, numbers.Integral) or t_start < 0:
            raise ValueError(f"t_start must be a non-negative integer, got {t_start!r}")
        self.t_start = int(t_start)
        self.allow_regrowth = bool(allow_regrowth)
        self.optimizer_step_on_update = (
            self.default_optimizer_step_on_update
            if optimizer_step_on_update is None
            else bool(optimizer_step_on_update)
        )
        sparse = self._bind(model, optimizer, distribution, dense_layers, seed)
        self._check_backend(backend)
        densities = None
        if masks is None:
            densities = densities_for_shapes(
                {t.name: tuple(t.shape) for t in sparse},
                self.density,
                distribution,
                erk_power_scale=erk_power_scale,
            )
        else:
            masks = validate_masks(masks, sparse, self.density)
        self.backend = make_backend(backend, sparse, masks, optimizer, model=model,
                                    densities=densities, generator=self.generator)
        self.step_count = 0
        self._init_method_state()
        self._prepare_next_step()

    def _bind(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              distribution: str | Mapping[str, float], dense_layers: Iterable[str] | str,
              seed: int) -> list[Target]:
        """Check and keep the model, optimizer, distribution, dense layers and seed (with the
        generator seeded from it); return the weights to sparsify."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.distribution = distribution
        self.dense_layers = (
            (dense_layers,) if isinstance(dense_layers, str) else tuple(dense_layers)
        )
        self.model = model
        self.optimizer = optimizer
        sparse, dense = partition(model, self.dense_layers)
        self._dense_names = [t.name for t in dense]
        _check_optimizer(optimizer, [t.param for t in sparse], [t.name for t in sparse])
        self.generator = torch.Generator().manual_seed(self.seed)
        return sparse

    def _check_backend(self, backend: str) -> None:
        if backend == "csr" and not self.supports_compact:
            raise ValueError(
                f"{type(self).__name__} is not available on backend='csr' (it needs dense "
                "per-weight state that a CSR layer does not keep); use backend='masked', or "
                "Static, SET or RigL on 'csr'"
            )

    # --- what the subclasses override -----------------------------------------------------
    def _init_method_state(self) -> None:
        """Create method-specific state (called at the end of ``__init__``)."""

    def _observe_gradients(self) -> None:
        """Called every step with the dense gradients in place, before they are masked."""

    def grow_scores(self, name: str) -> torch.Tensor:
        """Score of every position of weight ``name``; the inactive ones with the largest grow."""
        raise NotImplementedError(f"{type(self).__name__} does not grow connections")

    def drop_scores(self, name: str) -> torch.Tensor:
        """Score of every position of weight ``name``; the active ones with the smallest drop."""
        return self.backend.weight_magnitudes(name)

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        pass

    # --- public interface -----------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name (as in ``model.named_parameters()``) -> bool mask of its shape."""
        return self.backend.masks

    def layer_densities(self) -> dict[str, float]:
        """Current density of every sparsified weight, and 1.0 for those kept dense."""
        b = self.backend
        result = {n: b.n_active(n) / b.numel(n) for n in b.names}
        result.update({n: 1.0 for n in self._dense_names})
        return result

    def overall_density(self) -> float:
        """Active weights over all sparsified weights (those in ``masks``)."""
        b = self.backend
        return sum(b.n_active(n) for n in b.names) / sum(b.numel(n) for n in b.names)

    def mask_fingerprint(self) -> torch.Tensor:
        """A cheap summary of every layer's active set (int64, one row ``(count, hash)`` per
        sparsified weight): equal on replicas that hold the same masks, and all but surely
        different where they do not. Under data parallelism compare it across ranks."""
        rows = []
        for name in self.backend.names:
            if self.backend.is_compact(name):
                positions = self.backend.positions(name)
            else:
                positions = self.backend.masks[name].reshape(-1).nonzero().squeeze(1)
            positions = positions.to(device="cpu", dtype=torch.int64)
            # a sum of a mixing function of each position: order-free, wraps around in int64
            mixed = (positions + 1) * 0x9E3779B1 ^ (positions >> 7) * 0x85EBCA77
            rows.append(torch.stack([torch.tensor(positions.numel()), mixed.sum()]))
        return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)

    def is_update_step(self, t: int) -> bool:
        """Whether the ``t``-th call of ``step()`` updates the topology."""
        return self.updates_topology and is_update_step(
            t, delta_t=self.delta_t, t_start=self.t_start, t_end=self.t_end
        )

    def drop_fraction(self, t: int) -> float:
        """Fraction of each layer's active weights that an update at step ``t`` drops."""
        return drop_fraction(t, alpha=self.alpha, t_end=self.t_end, decay=self.drop_fraction_decay)

    def step(self, closure=None):
        """The optimizer step, with the masks kept and the topology updated on schedule.

        Returns what ``optimizer.step`` returns, or ``None`` on an update step that replaces it.
        """
        self.step_count += 1
        t = self.step_count
        self._observe_gradients()
        update = self.is_update_step(t)
        grow = None
        if update:
            grow = {name: self.grow_scores(name) for name in self.backend.names
                    if not self.backend.is_compact(name)}
        loss = None
        if not update or self.optimizer_step_on_update:
            self.backend.mask_gradients()
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
            self.backend.mask_weights()
        if update:
            self._update_topology(t, grow)
        self._prepare_next_step()
        return loss

    def _prepare_next_step(self) -> None:
        """Tell the backend whether the coming step's gradients feed a topology update."""
        self.backend.prepare_step(self.compact_grow == "gradient"
                                  and self.is_update_step(self.step_count + 1))

    def mask_gradients(self) -> None:
        """Zero the gradients of inactive weights now (e.g. before clipping gradients).

        ``step()`` does this itself; call it earlier only for methods that do not read the
        dense gradient (RigL reads it at update steps).
        """
        self.backend.mask_gradients()

    def _update_topology(self, t: int, grow: Mapping[str, torch.Tensor]) -> None:
        fraction = self.drop_fraction(t)
        backend = self.backend
        for name in backend.names:
            n_drop = math.floor(fraction * backend.n_active(name))
            if n_drop == 0:
                continue
            if backend.is_compact(name):
                if not backend.finite(name):
                    self._warn_not_finite(name, t)
                    continue
                backend.compact_update(name, n_drop, self.compact_grow, self.generator,
                                       allow_regrowth=self.allow_regrowth)
                continue
            drop = self.drop_scores(name)
            if not (torch.isfinite(drop).all() and torch.isfinite(grow[name]).all()):
                self._warn_not_finite(name, t)
                continue
            new_mask = drop_and_grow(
                backend.masks[name], drop, grow[name], n_drop, self.generator,
                allow_regrowth=self.allow_regrowth,
            )
            backend.replace_active(name, new_mask)

    def _warn_not_finite(self, name: str, t: int) -> None:
        warnings.warn(
            f"{type(self).__name__}: weight {name!r} has NaN or infinite weights or "
            f"gradients at step {t}; its topology update is skipped. Lower the "
            "learning rate or clip gradients.",
            RuntimeWarning,
            stacklevel=4,
        )

    # --- checkpointing --------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "distribution": _distribution_config(self.distribution),
            "total_steps": self.total_steps,
            "delta_t": self.delta_t,
            "alpha": self.alpha,
            "drop_fraction_decay": self.drop_fraction_decay,
            "t_end": self.t_end,
            "t_start": self.t_start,
            "dense_layers": list(self.dense_layers),
            "seed": self.seed,
            "backend": self.backend.name,
            "allow_regrowth": self.allow_regrowth,
            "optimizer_step_on_update": self.optimizer_step_on_update,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, masks, RNG state, method state.

        Holds only tensors, numbers, strings, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``.
        """
        b = self.backend
        return {
            "method": self.method_name,
            "step_count": self.step_count,
            "masks": {n: b.masks[n].detach().cpu().clone() for n in b.names
                      if not b.is_compact(n)},
            "positions": {n: b.positions(n).cpu() for n in b.names if b.is_compact(n)},
            "generator": self.generator.get_state(),
            "config": self._config(),
            "method_state": self._method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the weights and optimizer state are restored separately."""
        if not isinstance(state, Mapping) or not {"method", "step_count", "masks"} <= set(state):
            raise ValueError(
                "not a sparsetrain sparsifier state_dict (expected the keys 'method', "
                "'step_count', 'masks', ...)"
            )
        if state["method"] != self.method_name:
            raise ValueError(
                f"the state_dict is of method {state['method']!r}, but this sparsifier is "
                f"{self.method_name!r}"
            )
        masks = self._saved_masks(state)
        self.step_count = int(state["step_count"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        config = self._config()
        changed = sorted(k for k, v in state.get("config", {}).items() if config.get(k) != v)
        if changed:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the saved run had other settings for "
                f"{changed}; continuing with this sparsifier's settings",
                stacklevel=2,
            )
        for name, active in masks.items():
            if torch.is_tensor(active) and active.dtype == torch.int64 and active.dim() == 1:
                self.backend.set_positions(name, active)
            else:
                self.backend.set_mask(name, active)
        self.backend.apply_masks()
        self._load_method_state(state.get("method_state", {}))

    def _saved_masks(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The saved active sets by name: bool masks, or sorted flat positions for CSR layers
        (a state saved on either backend loads on either)."""
        b = self.backend
        saved = dict(state["masks"])
        positions = state.get("positions") or {}
        if not isinstance(saved, dict) or not isinstance(positions, Mapping):
            raise ValueError("the state_dict's 'masks' and 'positions' must be dicts")
        unknown = sorted((set(saved) | set(positions)) - set(b.names))
        missing = [n for n in b.names if n not in saved and n not in positions]
        if unknown or missing:
            raise ValueError(
                "the state_dict's masks do not match this sparsifier's weights; unknown "
                f"names: {unknown}, missing names: {missing}"
            )
        for name, pos in positions.items():
            if b.is_compact(name):
                saved[name] = pos
                continue
            if not torch.is_tensor(pos) or pos.dim() != 1:
                raise ValueError(f"positions[{name!r}] must be a 1-D tensor")
            mask = torch.zeros(b.numel(name), dtype=torch.bool)
            mask[pos.long()] = True
            saved[name] = mask.view(b.masks[name].shape)
        dense = [Target(n, b.params[n]) for n in b.names if not b.is_compact(n)]
        result = validate_masks({n: saved[n] for n in saved if not b.is_compact(n)}, dense, None)
        result.update({n: saved[n] for n in saved if b.is_compact(n)})
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(density={self.density}, distribution={self.distribution!r}, "
            f"layers={len(self.masks)}, step={self.step_count}/{self.total_steps})"
        )


@register_method("static")
class Static(DynamicSparsifier):
    """Sparse training with the initial mask fixed throughout (RigL paper, "Static")."""


@register_method("set")
class SET(DynamicSparsifier):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop by magnitude, grow at random."""

    updates_topology = True
    default_optimizer_step_on_update = True
    compact_grow = "random"

    def grow_scores(self, name: str) -> torch.Tensor:
        mask = self.masks[name]
        return torch.rand(mask.shape, generator=self.generator).to(mask.device)


@register_method("snfs")
class SNFS(SET):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): grow by ``|EMA(0.9) of the gradient|``.

    The moving average of the dense gradient is updated at every step. As in the RigL paper's
    comparison, the layer densities stay fixed (no redistribution between layers).
    """

    default_optimizer_step_on_update = False
    grad_momentum = 0.9
    supports_compact = False

    def _init_method_state(self) -> None:
        self.gradient_ema: dict[str, torch.Tensor] = {}

    def _observe_gradients(self) -> None:
        for name in self.masks:
            grad = self.backend.dense_gradient(name)
            if grad is None:
                continue
            ema = self.gradient_ema.get(name)
            if ema is None:
                self.gradient_ema[name] = (1 - self.grad_momentum) * grad.clone()
            else:
                ema.mul_(self.grad_momentum).add_(grad, alpha=1 - self.grad_momentum)

    def grow_scores(self, name: str) -> torch.Tensor:
        ema = self.gradient_ema.get(name)
        if ema is None:
            return torch.zeros_like(self.masks[name], dtype=torch.float32)
        return ema.abs()

    def _method_state(self) -> dict[str, Any]:
        return {"gradient_ema": {n: e.detach().cpu().clone() for n, e in self.gradient_ema.items()}}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        params = self.backend.params
        self.gradient_ema = {
            n: e.to(device=params[n].device, dtype=params[n].dtype)
            for n, e in state.get("gradient_ema", {}).items()
            if n in params
        }


@register_method("rigl")
class RigL(SET):
    """RigL (Evci et al. 2020): grow the inactive connections with the largest ``|dense grad|``.

    The dense gradient is that of the current batch w.r.t. the effective weight ``W * M``,
    read at update steps only; under DistributedDataParallel it is the gradient averaged over
    replicas. As in the reference code the update replaces that step's optimizer step.
    """

    default_optimizer_step_on_update = False
    compact_grow = "gradient"

    def grow_scores(self, name: str) -> torch.Tensor:
        grad = self.backend.dense_gradient(name)
        if grad is None:
            return torch.zeros_like(self.masks[name], dtype=torch.float32)
        return grad.abs()
