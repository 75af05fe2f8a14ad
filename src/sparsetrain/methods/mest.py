"""MEST: memory-economic sparse training with elastic mutation (Yuan et al., NeurIPS 2021).

"MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the Edge", G. Yuan,
X. Ma, W. Niu et al., NeurIPS 2021; the authors' code is ``boone891214/MEST`` on GitHub
(``prune_utils/retrain.py``, ``prune_utils/utils_pr.py`` and the scripts under
``scripts/resnet32``). SET's drop and grow, with two changes:

- the drop score of an active weight is ``|w| + lambda * |g|``, ``g`` its gradient on the batch
  of the update step: the gradient of the active weights only, which every backend has, so
  MEST needs no dense gradient;
- elastic mutation: the fraction of each layer mutated decays in steps, ``alpha`` up to
  ``decay_step``, ``alpha / 2`` from there to ``t_end``, and nothing after.

With ``soft_memory_bound=True`` (MEST+EM&S) each update first drops the extra weights the
previous update grew (the weakest of all active weights by the same score, so an undo of a
poor mutation), then grows ``floor(f(t) * budget)`` new ones at random: between updates a
layer holds its budget plus the weights grown at the last update, and the last update before
``t_end`` only drops, so training ends at the budget. Not implemented: the paper's data
efficiency (leaving out the training examples that are never forgotten); that is a matter of
the data loader, not of the sparsifier.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends import get_backend
from ..backends.base import VARIABLE_COUNT, missing_reason
from ..flops import sparse_training_flops
from ..sparsity.positions import merge_sorted
from ..sparsity.schedules import DROP_FRACTION_DECAYS
from ..sparsity.structure import parse_structure
from .dst import SET
from .registry import register_method
from .update import grow_largest, keep_largest, warn_not_finite

#: The mutation schedules: the authors' step decay and the shared ones of ``drop_fraction``.
DECAYS = ("step", *DROP_FRACTION_DECAYS)


@register_method("mest")
class MEST(SET):
    """MEST (Yuan et al. 2021): SET whose drop score adds the gradient, ``|w| + lambda |g|``.

    Every ``delta_t`` steps up to ``t_end`` each sparsified layer drops the
    ``floor(f(t) * n_active)`` active weights of lowest ``|w| + gradient_coefficient * |g|``
    (``w`` as the update finds it, after the step's optimizer step unless
    ``optimizer_step_on_update=False``; ``g`` the step's gradient of the active weights, read
    before it is masked; ties by the seeded random order) and grows as many at uniformly
    random positions that were inactive before the update (SET's seeded order); grown weights
    start at zero with zero optimizer state. ``f(t)`` is ``alpha`` before ``decay_step``,
    ``alpha / 2`` from it until ``t_end`` and 0 from ``t_end`` on (``drop_fraction_decay=
    "step"``), or one of the shared decays ``"cosine"``, ``"linear"``, ``"constant"``.

    ``soft_memory_bound=True`` (MEST+EM&S): an update at step ``t`` drops the layer back to its
    budget (the ``n_active - budget`` weakest by the score, the weights grown at the previous
    update among them), then grows ``k = floor(f(t) * budget)`` new ones at random (none at
    the last update step up to ``t_end``), so a layer holds between its budget and budget + k.
    It needs a backend that can change the count (capability ``"variable_count"``, e.g.
    ``"masked"``), no structure, and grows only positions inactive before the update; ``k`` is
    at most half the layer's inactive weights, so that the grown ones always fit.

    Defaults and their sources (keywords as for :class:`~sparsetrain.SET`):

    - ``gradient_coefficient=1.0``, the paper's lambda: the value of the reimplementation of
      the MEST criterion by Nowak et al. ("Fantastic Weights and How to Find Them", NeurIPS
      2023, ``--gamma`` default 1.0). The authors' code reads it as ``--sp-lmd``, default 0,
      which its released scripts do not set (their runs drop by ``|w|`` alone); 0 gives that.
    - ``alpha=0.2`` (``0.5`` with ``soft_memory_bound``): the authors' scripts at 90% sparsity
      (``LOWER_BOUND="0.92-0.91-0.9"``: 2% then 1% of all weights, i.e. 20% then 10% of the
      active ones; EM&S ``UPPER_BOUND="0.85-0.875-0.9"``: 50% then 25% grown above the budget).
    - ``drop_fraction_decay="step"``, ``decay_step=int(0.75 * t_end)`` and ``t_end=int(0.75 *
      total_steps)``: the scripts' ``MASK_UPDATE_DECAY_EPOCH="90-120"`` of 160 epochs.
    - ``delta_t=max(1, total_steps // 32)``: the scripts update every 5 of 160 epochs
      (``SP_MASK_UPDATE_FREQ=5``); the authors' first update is at the start of training, the
      first here after ``delta_t`` steps.
    - ``allow_regrowth=False``: the authors' code grows new weights at zero; here a weight
      dropped by an update is not grown back by it (with ``True`` it could be, keeping its
      value, as in SET).
    - ``optimizer_step_on_update=True`` (SET's): the authors update between epochs, after the
      last batch's optimizer step.

    Training FLOPs: ``3 f_S`` per example and step; reading the active gradient costs nothing
    extra, and with ``soft_memory_bound`` ``f_S`` is that of the counts of the moment.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "erk",
                 delta_t: int | None = None, alpha: float | None = None,
                 drop_fraction_decay: str = "step", decay_step: int | None = None,
                 t_end: int | None = None, gradient_coefficient: float = 1.0,
                 soft_memory_bound: bool = False, dense_layers: Iterable[str] | str = (),
                 masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 backend: str = "masked", t_start: int = 0, erk_power_scale: float = 1.0,
                 allow_regrowth: bool = False, optimizer_step_on_update: bool | None = None,
                 sparsify_embeddings: bool = False, structure: str | None = None):
        self.soft_memory_bound = checks.boolean(soft_memory_bound, "soft_memory_bound")
        self.gradient_coefficient = checks.real_in_range(
            gradient_coefficient, "gradient_coefficient", 0.0,
            meaning="lambda, the weight of |gradient| in the drop score")
        steps = checks.positive_int(total_steps, "total_steps")
        if delta_t is None:
            delta_t = max(1, steps // 32)
        if alpha is None:
            alpha = 0.5 if self.soft_memory_bound else 0.2
        decay = checks.choice(drop_fraction_decay, "drop_fraction_decay", DECAYS)
        end = int(0.75 * steps) if t_end is None else checks.positive_int(t_end, "t_end")
        if decay_step is not None and decay != "step":
            raise ValueError(f"decay_step is the step at which the 'step' decay halves alpha; "
                             f"drop_fraction_decay={decay!r} does not read it, so leave it out "
                             "or use drop_fraction_decay='step'")
        self.decay_step = (int(0.75 * end) if decay_step is None
                           else checks.positive_int(decay_step, "decay_step", high=end,
                                                    fix=f"give a step up to t_end ({end})"))
        if self.soft_memory_bound:
            self._check_soft(backend, structure, allow_regrowth)
            self.fixed_budget = False  # budget + the weights grown at the last update
            self.requires = frozenset({VARIABLE_COUNT})
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, delta_t=delta_t, alpha=alpha,
                         drop_fraction_decay="constant" if decay == "step" else decay,
                         t_end=t_end, dense_layers=dense_layers, masks=masks, seed=seed,
                         backend=backend, t_start=t_start, erk_power_scale=erk_power_scale,
                         allow_regrowth=allow_regrowth,
                         optimizer_step_on_update=optimizer_step_on_update,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)
        self.drop_fraction_decay = decay

    @staticmethod
    def _check_soft(backend: str, structure: str | None, allow_regrowth: bool) -> None:
        backend_class = get_backend(backend)
        if VARIABLE_COUNT not in backend_class.capabilities:
            why = missing_reason(backend_class, VARIABLE_COUNT)
            raise ValueError(f"soft_memory_bound=True changes the number of active weights, "
                             f"which backend={backend!r} cannot{f' ({why})' if why else ''}; "
                             "use backend='masked', or soft_memory_bound=False")
        if parse_structure(structure).kind != "unstructured":
            raise ValueError(f"soft_memory_bound=True grows and drops single weights, not "
                             f"within structure={structure!r}; leave structure unset or use "
                             "soft_memory_bound=False")
        if checks.boolean(allow_regrowth, "allow_regrowth"):
            raise ValueError("soft_memory_bound=True grows only positions inactive before the "
                             "update; leave allow_regrowth=False")

    def init_method_state(self) -> None:
        self._gradients: dict[str, torch.Tensor] = {}  # |g| of the active weights, this update

    # --- the score --------------------------------------------------------------------------
    def observe_gradients(self) -> None:
        """At an update step, keep ``|g|`` of the active weights before they are masked (an
        update that replaces the optimizer step may clear the gradients)."""
        if self.gradient_coefficient and self.is_update_step(self.step_count):
            for name in self.backend.names:
                self._gradients[name] = self.backend.active_gradient(name).detach().abs()

    def drop_scores(self, name: str) -> torch.Tensor:
        """``|w| + gradient_coefficient * |g|`` of the active weights, in their order."""
        scores = self.backend.active_values(name).detach().abs()
        if self.gradient_coefficient:
            grad = self._gradients.get(name)
            if grad is None:  # an update run outside step()
                grad = self.backend.active_gradient(name).detach().abs()
            scores = scores + self.gradient_coefficient * grad.to(scores.dtype)
        return scores

    # --- the schedule -----------------------------------------------------------------------
    def drop_fraction(self, t: int) -> float:
        """Fraction of each layer mutated at step ``t``: the step decay, or a shared one."""
        if self.drop_fraction_decay != "step":
            return super().drop_fraction(t)
        if t >= self.t_end:
            return 0.0
        return self.alpha if t < self.decay_step else self.alpha / 2

    def _last_update(self, t: int) -> int | None:
        """The last update step up to ``t`` (None before the first)."""
        periods = (min(t, self.t_end) - self.t_start) // self.delta_t
        return self.t_start + periods * self.delta_t if periods > 0 else None

    def grown_above_budget(self, name: str, t: int) -> int:
        """``k``: the weights of ``name`` a soft update at step ``t`` grows above the budget
        (none at the last update step; at most half the layer's inactive weights)."""
        if self._last_update(self.t_end) == t:
            return 0
        budget = self._start_counts[name]
        return min(math.floor(self.drop_fraction(t) * budget), (self.numel(name) - budget) // 2)

    def scheduled_counts(self, t: int) -> dict[str, int] | None:
        if not self.soft_memory_bound:
            return super().scheduled_counts(t)
        last = self._last_update(t)
        return {n: b + (0 if last is None else self.grown_above_budget(n, last))
                for n, b in self._start_counts.items()}

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """The budget; with ``soft_memory_bound``, after the first update, up to the most an
        update grows above it (an update skipped on non-finite scores keeps what it had)."""
        if not self.soft_memory_bound or self._last_update(t) is None:
            return super().allowed_counts(t)
        return {n: (b, b + min(math.floor(self.alpha * b), (self.numel(n) - b) // 2))
                for n, b in self._start_counts.items()}

    # --- the update -------------------------------------------------------------------------
    def update_topology(self, t: int) -> None:
        try:
            if not self.soft_memory_bound:
                super().update_topology(t)
                return
            for name in self.backend.names:
                self._drop_to_budget_and_grow(name, self.grown_above_budget(name, t), t)
        finally:
            self._gradients.clear()

    def _drop_to_budget_and_grow(self, name: str, k: int, t: int) -> None:
        """Keep the budget's count of the weights of highest score, then grow ``k`` at
        random positions that were inactive before the update (they start at zero)."""
        backend, budget = self.backend, self._start_counts[name]
        active = backend.active_positions(name)
        if active.numel() <= budget and k == 0:
            return
        kept = active
        if active.numel() > budget:
            kept = keep_largest(self, name, budget, t, active)
        grown = None
        if kept is not None:
            grown, _ = grow_largest(self, name, k, active, t)
        if grown is None:
            warn_not_finite(self, name, t)
            return
        backend.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``3 f_S``: no dense gradient is ever computed."""
        return sparse_training_flops(f_sparse)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gradient_coefficient": self.gradient_coefficient,
                "soft_memory_bound": self.soft_memory_bound, "decay_step": self.decay_step}
