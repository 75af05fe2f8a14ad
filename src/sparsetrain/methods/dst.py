"""Dynamic sparse training with a fixed number of non-zeros: Static, SET and RigL.

RigL paper ("Rigging the Lottery: Making All Tickets Winners", Evci et al. 2020), Algorithm 1,
and ``shared/spec/algorithms.md``. Every ``delta_t`` steps until ``t_end`` each sparse layer
drops the ``floor(f(t) * n_active)`` active weights of smallest magnitude and grows as many
inactive connections with the largest grow score; the methods differ only in that score:

- Static: no topology update at all.
- SET: uniformly random scores.
- RigL: ``|dense gradient|`` of the current batch w.r.t. the effective weight ``W * M``.

(SNFS, in ``snfs.py``, grows by a moving average of the gradient.) Grown weights start at zero
with zero optimizer state; inactive weights stay exactly zero through every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import Block
from ..flops import rigl_training_flops
from ..sparsity.permutation import GROW, RandomOrder
from ..sparsity.schedules import drop_fraction, is_update_step
from .base import Sparsifier
from .registry import register_method
from .update import descending_order, drop_and_grow, warn_if_blind


class DynamicSparsifier(Sparsifier):
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
    patterns of weights kept dense; ``sparsify_embeddings`` sparsify position embeddings too
    (kept dense by default); ``masks`` a dict name -> bool mask (or sorted flat
    positions) that replaces the random initial active sets (the layer densities are then
    those of the masks); ``seed`` for every random choice; ``backend`` ``"masked"`` (dense
    weights times masks, any layer) or ``"csr"`` (every sparsified ``nn.Linear`` converted in
    place to a ``CSRLinear`` whose time and memory scale with its density); ``allow_regrowth``
    whether a weight dropped by an update may be grown back by the same update (the reference
    code's behaviour; it then keeps its value); ``optimizer_step_on_update`` whether an update
    step also applies the optimizer step (default: the method's, as in the reference code:
    RigL and SNFS replace it, SET applies it first).

    A subclass changes the rules by overriding ``drop_scores(name)`` (one score per active
    weight, in ``sparsifier.active_positions(name)`` order; the lowest are dropped) and
    ``grow_scores(block)`` (a score for every position of a :class:`~sparsetrain.backends.Block`
    of rows, read through ``block.weight()`` and ``block.gradient()``; the highest outside the
    kept set grow). A score that reads ``block.gradient()`` needs
    ``update_reads_gradient = True``. Both run on every backend.
    """

    method_name = "static"
    updates_topology = False
    default_optimizer_step_on_update = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "erk",
                 delta_t: int = 100, alpha: float = 0.3, drop_fraction_decay: str = "cosine",
                 t_end: int | None = None, dense_layers: Iterable[str] | str = (),
                 masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 backend: str = "masked", t_start: int = 0, erk_power_scale: float = 1.0,
                 allow_regrowth: bool = True, optimizer_step_on_update: bool | None = None,
                 sparsify_embeddings: bool = False, structure: str | None = None):
        self.delta_t = checks.positive_int(delta_t, "delta_t")
        self.alpha = checks.real_in_range(alpha, "alpha", 0.0, 1.0,
                                          meaning="the initial drop fraction")
        drop_fraction(0, alpha=self.alpha, t_end=1, decay=drop_fraction_decay)  # validates
        self.drop_fraction_decay = drop_fraction_decay
        steps = checks.positive_int(total_steps, "total_steps")
        self.t_end = int(0.75 * steps) if t_end is None else checks.positive_int(t_end, "t_end")
        self.t_start = checks.non_negative_int(t_start, "t_start")
        self.allow_regrowth = bool(allow_regrowth)
        self.optimizer_step_on_update = (self.default_optimizer_step_on_update
                                         if optimizer_step_on_update is None
                                         else bool(optimizer_step_on_update))
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense_layers, masks=masks,
                         seed=seed, backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    # --- the rules --------------------------------------------------------------------------
    def grow_scores(self, block: Block) -> torch.Tensor:
        """A score of every position of ``block`` (the largest outside the kept set grow)."""
        raise NotImplementedError(f"{type(self).__name__} does not grow connections")

    # --- the schedule -----------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        return self.updates_topology and is_update_step(
            t, delta_t=self.delta_t, t_start=self.t_start, t_end=self.t_end)

    def drop_fraction(self, t: int) -> float:
        """Fraction of each layer's active weights that an update at step ``t`` drops."""
        return drop_fraction(t, alpha=self.alpha, t_end=self.t_end, decay=self.drop_fraction_decay)

    def update_topology(self, t: int) -> None:
        fraction = self.drop_fraction(t)
        best = []
        for name in self.backend.names:
            n_drop = math.floor(fraction * self.backend.n_active(name))
            best.append(drop_and_grow(self, name, n_drop, t, allow_regrowth=self.allow_regrowth))
        warn_if_blind(self, best, t)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "delta_t": self.delta_t, "alpha": self.alpha,
                "drop_fraction_decay": self.drop_fraction_decay, "t_end": self.t_end,
                "t_start": self.t_start, "allow_regrowth": self.allow_regrowth,
                "optimizer_step_on_update": self.optimizer_step_on_update}


@register_method("static")
class Static(DynamicSparsifier):
    """Sparse training with the initial mask fixed throughout (RigL paper, "Static")."""


@register_method("set")
class SET(DynamicSparsifier):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop by magnitude, grow at random."""

    updates_topology = True

    def grow_order(self, name: str) -> RandomOrder:
        """The random order in which this update grows ``name``'s free positions."""
        return self.order(name, GROW)

    @descending_order("grow_order")
    def grow_scores(self, block: Block) -> torch.Tensor:
        """Uniformly random: ``-rank`` of each position in this update's random order."""
        ranks = self.grow_order(block.name).rank(block.positions())
        return (-ranks).view(block.shape)


@register_method("rigl")
class RigL(SET):
    """RigL (Evci et al. 2020): grow the inactive connections with the largest ``|dense grad|``.

    The dense gradient is that of the current batch w.r.t. the effective weight ``W * M``,
    read at update steps only; under DistributedDataParallel it is the gradient averaged over
    replicas. As in the reference code the update replaces that step's optimizer step.
    """

    default_optimizer_step_on_update = False
    update_reads_gradient = True

    def grow_scores(self, block: Block) -> torch.Tensor:
        return block.gradient().abs_()  # the block's scratch buffer: no new tensor

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        return rigl_training_flops(f_dense, f_sparse, delta_t)
