"""GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy, Wang and Mocanu, "Sparse Training via
Boosting Pruning Plasticity with Neuroregeneration", NeurIPS 2021; the authors' code is
VITA-Group/GraNet (``CIFAR/sparselearning/core.py``, ``Masking.step``, ``pruning`` and
``truncate_weights``; ``ImageNet/core.py`` does the same). Training starts dense (or sparse, at
random) and global magnitude pruning brings it to the target density on the cubic schedule of
gradual pruning; right after every pruning, each layer also replaces a fraction of its weakest
weights by the inactive connections of largest gradient ("neuroregeneration"), so the pruning
schedule alone decides how many weights are active.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import VARIABLE_COUNT, Block
from ..flops import rigl_training_flops
from ..sparsity.distributions import densities_for_shapes
from ..sparsity.masks import active_count
from ..sparsity.positions import merge_sorted
from ..sparsity import schedules
from ..sparsity.schedules import (gradual_density, gradual_steps, is_pruning_step,
                                  last_pruning_step)
from ..sparsity.selection import select_global
from . import scores as checked
from .base import Sparsifier
from .registry import register_method
from .update import grow_largest, keep_largest, warn_if_blind, warn_not_finite


@register_method("granet")
class GraNet(Sparsifier):
    """GraNet (Liu et al., NeurIPS 2021), used like the other sparsifiers::

        sparsifier = st.GraNet(model, opt, density=0.1, total_steps=len(loader) * epochs)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            sparsifier.step()

    The rule, at step ``t`` (the ``t``-th call of ``step()``):

    - Start: every sparsified weight is dense with the default ``initial_density=1.0``;
      otherwise each layer holds ``active_count(N_l, d_l)`` random positions (seeded), with
      ``d_l`` from ``distribution`` at ``initial_density`` (ERK by default, as the code's
      ``--sparse-init ERK``; a dict name -> density gives the initial layer densities itself).
      ``T_0`` is the number of weights active then, over the ``N`` sparsified weights.
    - Pruning, at ``start_step + frequency``, ``start_step + 2 * frequency``, ... up to
      ``end_step``, and at ``end_step`` itself: the ``T(t)`` active weights of largest ``|W|``
      over *all* sparsified layers together are kept (global magnitude pruning, as the
      paper's GraNet; ties by a seeded random order; no layer is left empty), with
      ``T(t) = round(N * d(t))`` on the cubic of Zhu & Gupta,
      ``d(t) = d_f + (d_0 - d_f) * (1 - (t - start_step) / (end_step - start_step)) ** 3``,
      ``d_0 = T_0 / N`` and ``d_f = T_f / N``, ``T_f = round(density * N)``. So after the
      pruning at ``end_step`` exactly ``T_f`` weights are active, and how they are spread over
      the layers is decided by the weights.
    - Neuroregeneration, right after every pruning and, once pruning has ended, every
      ``frequency`` steps up to ``t_end`` (the authors' code keeps calling
      ``truncate_weights`` at the same period until training ends): each layer with
      ``n_l`` active weights drops its ``ceil(r(t) * n_l)`` weakest (``|W|``) and grows as many
      inactive positions of largest ``|dense gradient|`` (of this step's batch, taken before the
      optimizer step), so every layer keeps its count. A just-dropped weight may be grown back
      (it then keeps its value, as in the code); a newly grown weight, and one the pruning of
      the same step removed, starts at zero with zero optimizer state. ``r(t)`` is
      ``drop_fraction(t)``: the cosine ``alpha / 2 * (1 + cos(pi * t / t_end))`` by default.
    - On an update step, ``step()`` first applies the optimizer step (to the active weights;
      the dense gradient is kept for the growth), then prunes, then regenerates, the order of
      the code's ``Masking.step`` (``optimizer.step()``, ``pruning``, ``truncate_weights``).
      Between updates the active sets do not change and inactive weights stay at zero.

    Arguments (keywords): ``density`` the final fraction of the sparsified weights kept, in
    (0, 1]; ``total_steps`` the number of ``step()`` calls planned; ``initial_density`` in
    [``density``, 1]; ``distribution`` ``"uniform"``, ``"er"``, ``"erk"`` or a dict name ->
    density (the initial layer densities only: the final ones come from global pruning);
    ``start_step``, ``end_step`` the pruning schedule's first and last step; ``frequency`` the
    steps between updates (``delta_t`` is accepted for it too, the name the other methods use);
    ``alpha`` the initial regeneration fraction ``r(0)``; ``drop_fraction_decay``
    ``"cosine"``, ``"linear"`` or ``"constant"``; ``t_end`` the step where ``r`` reaches zero
    and regeneration ends; ``dense_layers`` names or glob patterns of weights kept dense;
    ``seed`` for every random choice; ``backend`` one that can change the number of active
    weights (``"masked"``); ``erk_power_scale``, ``sparsify_embeddings`` as for the other
    methods. Unstructured only: global pruning decides every layer's count, which a structure
    would fix.

    Defaults, from the authors' code and README (CIFAR, 160 epochs): ``initial_density=1.0``
    (the paper's dense-to-sparse GraNet; its sparse-to-sparse runs use 0.5, the code's
    argument default), ``start_step=0`` (``--init-prune-epoch 0``), ``end_step =
    11 * total_steps // 16`` (``--final-prune-epoch 110`` of 160), ``frequency=100``
    (``--update-frequency``' default; the README runs use 1000 on CIFAR, 4000 on ImageNet),
    ``alpha=0.5`` (``--prune-rate``), a cosine decay of ``r`` over the whole run, so
    ``t_end=total_steps`` (``CosineDecay`` over all steps), and ``distribution="erk"``. (The
    runner passes its own ``--delta-t``, ``--alpha`` and ``--t-end`` to every method taking
    them: pass ``--alpha 0.5 --t-end 1`` there for these defaults.)

    Differences from the code, all small: the code's cosine bottoms out at 0.005
    (``eta_min``), here at 0, so regeneration stops at ``t_end``; the code's last pruning comes
    one period before the end of its schedule and stops a hair above the target density
    (``d_f + (d_0 - d_f) / K ** 3`` after ``K`` prunings), here the pruning at ``end_step``
    reaches it exactly; counts round to nearest where the code truncates; ties are broken by
    the seeded order (the code's thresholds keep or drop every tied weight together); global
    pruning never empties a layer.
    """

    fixed_budget = False
    grows = True
    requires = frozenset({VARIABLE_COUNT})  # the number of active weights goes down
    update_reads_gradient = True  # the growth reads the dense gradient of the update step
    optimizer_step_on_update = True  # the code steps the optimizer, then prunes and regrows
    structures = frozenset({"unstructured"})

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "erk",
                 dense_layers: Iterable[str] | str = (), seed: int = 0,
                 backend: str = "masked", initial_density: float = 1.0,
                 start_step: int | None = None, end_step: int | None = None,
                 frequency: int | None = None, delta_t: int | None = None, alpha: float = 0.5,
                 drop_fraction_decay: str = "cosine", t_end: int | None = None,
                 erk_power_scale: float = 1.0, sparsify_embeddings: bool = False,
                 structure: str | None = None):
        steps = checks.positive_int(total_steps, "total_steps")
        self.initial_density, self.frequency, self.start_step, self.end_step = gradual_steps(
            density, initial_density, steps, start_step, end_step, frequency, delta_t,
            default_start=0, default_end=max(1, 11 * steps // 16),
            default_end_text="11 * total_steps // 16")
        self.delta_t = self.frequency  # the update period, as the FLOPs rule reads it
        self.alpha = checks.real_in_range(alpha, "alpha", 0.0, 1.0,
                                          meaning="the initial regeneration fraction")
        schedules.drop_fraction(0, alpha=self.alpha, t_end=1, decay=drop_fraction_decay)
        self.drop_fraction_decay = drop_fraction_decay
        self.t_end = steps if t_end is None else checks.positive_int(t_end, "t_end")
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense_layers, seed=seed,
                         backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        """The distribution at ``initial_density`` (a dict distribution: as given)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        shapes = {n: tuple(params[n].shape) for n in final}
        if isinstance(self.distribution, Mapping):
            initial = dict(final)
        else:
            initial = densities_for_shapes(shapes, self.initial_density, self.distribution,
                                           erk_power_scale=self.erk_power_scale)
        numel = sum(math.prod(s) for s in shapes.values())
        start = sum(active_count(math.prod(shapes[n]), d) for n, d in initial.items())
        end = max(len(shapes), active_count(numel, self.density))
        if end > start and isinstance(self.distribution, Mapping):
            raise ValueError(
                f"the distribution's initial layer densities keep {start} weights, fewer than "
                f"density={self.density} asks for at the end ({end}); GraNet's pruning only "
                "removes weights, so give denser initial densities")
        self._numel, self._initial_total, self._final_total = numel, start, min(end, start)
        return initial

    # --- the schedule ---------------------------------------------------------------------
    def target_total(self, t: int) -> int:
        """Active weights of all the layers together that the pruning at step ``t`` keeps:
        ``round(N * d(t))`` on the cubic, from ``T_0`` up to ``start_step`` to ``T_f`` from
        ``end_step`` on, never increasing."""
        if t <= self.start_step:
            return self._initial_total
        if t >= self.end_step:
            return self._final_total
        density = gradual_density(t, initial=self._initial_total / self._numel,
                                  final=self._final_total / self._numel,
                                  start_step=self.start_step, end_step=self.end_step)
        return min(max(active_count(self._numel, density), self._final_total),
                   self._initial_total)

    def scheduled_counts(self, t: int) -> None:
        """None: global pruning lets the weights decide each layer's count."""
        return None

    def scheduled_total(self, t: int) -> int:
        """``target_total`` of the last pruning step up to ``t`` (regeneration keeps every
        layer's count)."""
        return self.target_total(last_pruning_step(
            t, start_step=self.start_step, end_step=self.end_step, frequency=self.frequency))

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """Each layer's count at the start until the first pruning; then from 1 (global
        pruning never empties a layer) up to that count."""
        first = min(self.start_step + self.frequency, self.end_step)
        return {n: (c if t < first else 1, c) for n, c in self._start_counts.items()}

    def allowed_total(self, t: int) -> tuple[int, int]:
        """From ``scheduled_total(t)`` up to ``T_0`` (a pruning skipped on non-finite weights
        keeps more)."""
        return self.scheduled_total(t), self._initial_total

    def drop_fraction(self, t: int) -> float:
        """``r(t)``: the fraction of each layer's active weights regenerated at step ``t``."""
        return schedules.drop_fraction(t, alpha=self.alpha, t_end=self.t_end,
                                       decay=self.drop_fraction_decay)

    def is_update_step(self, t: int) -> bool:
        """A pruning step, or a step ``start_step + k * frequency`` up to ``t_end`` at which
        ``r(t) > 0``."""
        if is_pruning_step(t, start_step=self.start_step, end_step=self.end_step,
                           frequency=self.frequency):
            return True
        return (schedules.is_update_step(t, delta_t=self.frequency, t_start=self.start_step,
                                         t_end=self.t_end) and self.drop_fraction(t) > 0)

    # --- the update -----------------------------------------------------------------------
    def grow_scores(self, block: Block) -> torch.Tensor:
        return block.gradient().abs_()  # the block's scratch buffer: no new tensor

    def update_topology(self, t: int) -> None:
        before = None  # the active sets before this update, where pruning changes them
        if is_pruning_step(t, start_step=self.start_step, end_step=self.end_step,
                           frequency=self.frequency):
            before = {n: self.backend.active_positions(n).clone() for n in self.names}
            self._prune_globally(t)
        fraction = self.drop_fraction(t)
        if fraction > 0:
            best = [self._regenerate(n, fraction, t, None if before is None else before[n])
                    for n in self.names]
            warn_if_blind(self, best, t)

    def _prune_globally(self, t: int) -> None:
        """Keep the ``target_total(t)`` active weights of largest drop score over all layers."""
        b = self.backend
        counts = self.active_counts()
        n_keep = min(sum(counts.values()), self.target_total(t))
        if n_keep == sum(counts.values()):
            return
        scores = {}
        for name in b.names:
            scores[name] = checked.drop_scores(self, name, counts[name])
            if scores[name] is None:  # skipped: the next pruning step catches up
                warn_not_finite(self, name, t)
                return
        keep = select_global(scores, n_keep, self.seed, t, stacklevel=5)
        for name in b.names:
            if not bool(keep[name].all()):
                active = b.active_positions(name)
                b.set_active(name, active[keep[name].to(active.device)])

    def _regenerate(self, name: str, fraction: float, t: int,
                    before: torch.Tensor | None) -> float | None:
        """Replace the ``ceil(fraction * n_active)`` weakest weights of ``name`` by as many
        grown by ``|dense gradient|``; returns the largest grow score of a position grown from
        outside ``before`` (the active set before the update; the current one if None), for
        ``warn_if_blind``, or None."""
        b = self.backend
        active = b.active_positions(name)
        n_active = active.numel()
        n_drop = min(n_active, math.ceil(fraction * n_active))
        if n_drop == 0 or n_active == b.numel(name):  # a full layer would grow back the same
            return None
        kept = keep_largest(self, name, n_active - n_drop, t, active)
        inactive_of = active if before is None else before
        grown, best = (None, None) if kept is None else grow_largest(self, name, n_drop, kept,
                                                                     t, inactive_of)
        if grown is None:
            warn_not_finite(self, name, t)
            return None
        b.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])
        return best

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """RigL's rule with the masks of the moment: ``(3 f_S delta_t + 2 f_S + f_D) /
        (delta_t + 1)``, ``f_S`` the forward FLOPs of the current active sets (which the runner
        passes every step), ``delta_t`` the update period: ``3 f_S`` per step, and the dense
        gradient at an update every ``delta_t`` steps (counted so throughout the run, as for
        RigL, also after the last update)."""
        return rigl_training_flops(f_dense, f_sparse, delta_t)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "initial_density": self.initial_density,
                "start_step": self.start_step, "end_step": self.end_step,
                "frequency": self.frequency, "alpha": self.alpha,
                "drop_fraction_decay": self.drop_fraction_decay, "t_end": self.t_end}
