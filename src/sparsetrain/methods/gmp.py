"""Gradual magnitude pruning: dense-to-sparse training (Zhu & Gupta 2017).

"To prune, or not to prune: exploring the efficacy of pruning for model compression" and
``shared/spec/algorithms.md`` ("Dense-to-sparse baselines"). Training starts from a dense (or
denser) model and removes the active weights of smallest magnitude on a cubic schedule, from
``initial_density`` (d_i) at ``start_step`` to the final ``density`` (d_f) at ``end_step``:

    d(t) = d_f + (d_i - d_f) * (1 - (t - start_step) / (end_step - start_step)) ** 3

Unlike the dynamic sparse training methods the number of active weights is not fixed: it only
goes down, and a pruned weight never comes back.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import VARIABLE_COUNT
from ..sparsity.masks import active_count
from ..sparsity.schedules import (gradual_density, gradual_steps, is_pruning_step,
                                  last_pruning_step)
from ..sparsity.structure import count_for, fixed_count
from .base import Sparsifier
from .registry import register_method
from .structured import keep_within
from .update import keep_largest, warn_not_finite


@register_method("gmp")
class GMP(Sparsifier):
    """Gradual magnitude pruning (Zhu & Gupta 2017), used like the other sparsifiers::

        sparsifier = st.GMP(model, opt, density=0.1, total_steps=len(loader) * epochs)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            sparsifier.step()

    Each sparsified weight l has a final density ``d_l`` from ``distribution`` at ``density``
    (as for the other methods, so at ``end_step`` every layer has exactly
    ``active_count(N_l, d_l)`` active weights and the total is the distribution's budget). It
    starts with ``active_count(N_l, max(initial_density, d_l))`` active weights: all of them
    with the default ``initial_density=1.0``, otherwise at uniformly random positions (seeded).
    The schedule density of layer l at step t is the cubic

        d_l(t) = d_l + (d_l0 - d_l) * (1 - (t - start_step) / (end_step - start_step)) ** 3

    with ``d_l0 = max(initial_density, d_l)`` (a layer whose final density is above
    ``initial_density`` keeps its final density throughout). At steps
    ``start_step + frequency``, ``start_step + 2 * frequency``, ... up to ``end_step``, and
    always at ``end_step``, ``step()`` first applies the optimizer step and then keeps, in each
    layer, the ``active_count(N_l, d_l(t))`` active weights of largest ``|W|`` (ties broken by
    the seeded random order of the positions). At ``start_step`` itself the schedule is at its initial
    density, which the masks already have, so the first pruning comes ``frequency`` steps later.
    Pruned weights are zeroed with their optimizer state and stay zero. No pruning happens
    before ``start_step`` or after ``end_step``.

    Arguments (keywords): ``density`` the final fraction of the sparsified weights kept, in
    (0, 1]; ``total_steps`` the number of ``step()`` calls planned; ``distribution``
    ``"uniform"`` (default: one sparsity for every layer, as in the paper), ``"er"``, ``"erk"``
    or a dict name -> final density; ``dense_layers`` names or glob patterns of weights kept
    dense; ``seed`` for all randomness; ``backend`` one that can change the number of active weights
    (``"masked"``); ``initial_density`` the
    density at ``start_step``, in [``density``, 1]; ``start_step`` and ``end_step`` the
    schedule's first and last step; ``frequency`` steps between pruning steps (``delta_t`` is
    accepted for it too, the name the other methods use, so code that drives every method
    alike works); ``erk_power_scale`` as for the other methods.

    Defaults, from the reference code of the RigL paper's pruning baseline (google-research/rigl,
    CIFAR-10 WRN-22-2: pruning from step 20000 to 75000 of 97656, i.e. 0.20 and 0.77 of
    training; its LeNet-5 configuration prunes every 100 steps): ``start_step =
    int(0.2 * total_steps)``, ``end_step = int(0.75 * total_steps)`` (at least 1; the same
    end as the dynamic methods' ``t_end``, so the last quarter of training fine-tunes the final
    mask) and ``frequency = 100``.
    """

    fixed_budget = False
    grows = False
    requires = frozenset({VARIABLE_COUNT})  # the number of active weights goes down

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "uniform",
                 dense_layers: Iterable[str] | str = (), seed: int = 0,
                 backend: str = "masked", initial_density: float = 1.0,
                 start_step: int | None = None, end_step: int | None = None,
                 frequency: int | None = None, erk_power_scale: float = 1.0,
                 delta_t: int | None = None, sparsify_embeddings: bool = False,
                 structure: str | None = None):
        steps = checks.positive_int(total_steps, "total_steps")
        self.initial_density, self.frequency, self.start_step, self.end_step = gradual_steps(
            density, initial_density, steps, start_step, end_step, frequency, delta_t,
            default_start=int(0.2 * steps), default_end=max(1, int(0.75 * steps)),
            default_end_text="int(0.75 * total_steps)")
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense_layers, seed=seed,
                         backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        self._final_density = dict(final)
        self._initial_density = {n: max(self.initial_density, d) for n, d in final.items()}
        return self._initial_density

    def init_method_state(self) -> None:
        numel = {n: self.backend.numel(n) for n in self.backend.names}
        self._numels = numel
        self._final_counts = {n: self._rounded(n, active_count(numel[n], d), final=True)
                              for n, d in self._final_density.items()}
        self._initial_counts = {n: self._rounded(n, active_count(numel[n], d))
                                for n, d in self._initial_density.items()}

    def _rounded(self, name: str, count: int, final: bool = False) -> int:
        """``count`` rounded to what the structure holds in ``name`` (N:M ends at exactly N
        of every M; on the way it holds the same number, from M down, in every group)."""
        if self.structure.kind == "unstructured":
            return count
        shape = self.backend.shape(name)
        return (fixed_count if final else count_for)(self.structure, shape, count)

    # --- the schedule ---------------------------------------------------------------------
    def target_counts(self, t: int) -> dict[str, int]:
        """Number of active weights the schedule asks of each sparsified weight at step ``t``.

        ``active_count(N_l, d_l(t))`` for the cubic ``d_l(t)``: the initial count up to
        ``start_step``, the final one (the distribution's) from ``end_step`` on, never
        increasing in between. After the pruning at a step ``t`` the masks hold exactly these.
        """
        if t <= self.start_step:
            return dict(self._initial_counts)
        if t >= self.end_step:
            return dict(self._final_counts)
        counts = {}
        for name, final in self._final_density.items():
            density = gradual_density(t, initial=self._initial_density[name], final=final,
                                      start_step=self.start_step, end_step=self.end_step)
            count = self._rounded(name, active_count(self._numels[name], density))
            counts[name] = min(max(count, self._final_counts[name]), self._initial_counts[name])
        return counts

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """From the schedule's count at the last pruning step up to ``t`` (after which the
        masks hold it) up to the initial count (a pruning skipped on non-finite weights keeps
        more)."""
        low = self.scheduled_counts(t)
        return {n: (low[n], self._initial_counts[n]) for n in self.backend.names}

    def scheduled_counts(self, t: int) -> dict[str, int]:
        """``target_counts`` of the last pruning step up to ``t``, which the masks hold."""
        return self.target_counts(last_pruning_step(
            t, start_step=self.start_step, end_step=self.end_step, frequency=self.frequency))

    def density_at(self, t: int) -> float:
        """Overall density of the sparsified weights that the schedule asks for at step ``t``.

        The masks have this density right after the pruning at step ``t``, and keep it until
        the next pruning step.
        """
        return sum(self.target_counts(t).values()) / sum(self._numels.values())

    def is_update_step(self, t: int) -> bool:
        """Whether the ``t``-th call of ``step()`` prunes.

        ``start_step + frequency``, ``start_step + 2 * frequency``, ... up to ``end_step``, and
        ``end_step`` itself.
        """
        return is_pruning_step(t, start_step=self.start_step, end_step=self.end_step,
                               frequency=self.frequency)

    def drop_fraction(self, t: int) -> float:
        raise NotImplementedError(
            "GMP has no drop fraction: it prunes to a scheduled density; see density_at(t) and "
            "target_counts(t)"
        )

    # --- training -------------------------------------------------------------------------
    def update_topology(self, t: int) -> None:
        """Keep the ``target_counts(t)`` active weights of largest ``|W|`` in every layer."""
        targets = self.target_counts(t)
        for name in self.backend.names:
            n_active = self.backend.n_active(name)
            n_keep = min(n_active, targets[name])
            if n_keep == n_active:
                continue
            kept = (keep_largest(self, name, n_keep, t) if self.structure.kind == "unstructured"
                    else keep_within(self, name, n_keep, t))
            if kept is None:
                warn_not_finite(self, name, t)
                continue
            self.backend.set_active(name, kept)

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``3 f_S`` with ``f_S`` the FLOPs of the masks of the moment (they change)."""
        return super().training_flops(f_dense, f_sparse, delta_t=delta_t)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "initial_density": self.initial_density,
                "start_step": self.start_step, "end_step": self.end_step,
                "frequency": self.frequency}
