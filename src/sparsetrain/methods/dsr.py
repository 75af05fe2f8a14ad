"""Dynamic Sparse Reparameterization, DSR (Mostafa & Wang, "Parameter Efficient Training of Deep
Convolutional Neural Networks by Dynamic Sparse Reparameterization", ICML 2019, Algorithm 1).

The total number of active weights is fixed; how they are spread over the layers changes. Every
``delta_t`` steps from ``t_start`` up to ``t_end`` (after that step's optimizer step):

1. prune, in every sparsified layer, the active weights with ``|W| < H``, one global adaptive
   threshold ``H``; ``k_l`` are pruned in layer l, ``r_l`` survive, ``K = sum k_l``. A layer
   whose every active weight is below ``H`` keeps its largest (ties by the seeded order), as in
   the authors' code, so no layer is cut off;
2. adapt ``H`` with this update's ``K`` (for the next update): ``H <- 2H`` if
   ``K < (1 - tolerance) N_p``, ``H <- H / 2`` if ``K > (1 + tolerance) N_p``, else unchanged
   (``H`` stays a positive finite float: a halving to 0 or a doubling to inf is not made);
3. regrow the ``K`` weights: layer l gets ``G_l`` of them in proportion to its survivors
   ``r_l``, rounded by largest remainders (ties: the earlier layer) so that they sum to ``K``
   exactly, and at most its free positions; what a full layer cannot take is split again over
   the others, in the same proportion. (If no layer that can grow has a survivor, the split is
   in proportion to the free positions.) Each layer grows its ``G_l`` at uniformly random free
   positions: the first free ones of the seeded random order of (seed, step, layer), at zero
   with zero optimizer state.

Sources of the rule and defaults: the paper's Algorithm 1 (prune by ``H``, adapt ``H`` by the
``K`` of the same update, regrow ``K`` in proportion to the survivors); the authors' code
(Intel, Apache-2.0, ``parameterized_tensors.py`` and ``main.py``, as redistributed in
TimDettmers/sparse_learning ``imagenet/dynamic-reparameterization``: initial ``H = 1e-3``,
tolerance 10%, the last weight of a layer kept, and a pruned weight not grown back by the same
update); the second author's ``dst`` package (``reparameterization.py``, ``train_cifar_wrn.py``:
``N_p`` as 1% of the parameters, a base period of 100 iterations, a uniform initial sparsity).

Deviations: the authors round the shares with ``round`` and put the discrepancy on a random
layer; here largest remainders (deterministic, every rank alike). The period is constant and ends
at ``t_end`` as for the other methods (the ``dst`` script doubles it during training and stops at
80% of it). Where the positions never active before the update cannot hold ``K`` (a dense-ish
model without ``allow_regrowth``), the update allows regrowth, so that the total stays exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import VARIABLE_COUNT
from ..flops import sparse_training_flops
from ..sparsity.distributions import check_density
from ..sparsity.permutation import DROP, GROW, RandomOrder
from ..sparsity.positions import contains, merge_sorted
from ..sparsity.schedules import is_update_step
from ..sparsity.selection import first_free, order_keys, top_k
from ..sparsity.targets import partition
from . import scores as checked
from .base import Sparsifier
from .registry import register_method
from .update import warn_not_finite


def largest_remainders(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to the non-negative integer ``weights`` (not all zero unless
    ``total`` is 0): floors of the exact shares, plus one for the largest remainders (ties: the
    earlier entry), so the parts sum to ``total``."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    ranked = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in ranked[:total - sum(parts)]:
        parts[i] += 1
    return parts


def proportional_split(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """``total`` split by :func:`largest_remainders` in proportion to ``weights`` with part i at
    most ``caps[i]``: the parts over their cap are set to it and the rest is split again over the
    others; where those others all have weight 0, in proportion to their caps."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} weights in {sum(caps)} free positions")
    parts = [0] * len(weights)
    capped: set[int] = set()
    while True:
        open_ = [i for i in range(len(weights)) if i not in capped and caps[i] > 0]
        left = total - sum(parts[i] for i in capped)
        shares = [weights[i] for i in open_]
        if sum(shares) == 0:
            shares = [caps[i] for i in open_]
        split = largest_remainders(left, shares)
        over = [i for i, s in zip(open_, split) if s > caps[i]]
        if not over:
            for i, s in zip(open_, split):
                parts[i] = s
            return parts
        for i in over:
            parts[i] = caps[i]
            capped.add(i)


@register_method("dsr")
class DSR(Sparsifier):
    """Dynamic Sparse Reparameterization (Mostafa & Wang 2019); see the module docstring.

    Arguments (keywords), beyond those of every method (``density``, ``total_steps``,
    ``dense_layers``, ``masks``, ``seed``, ``backend``, ``erk_power_scale``,
    ``sparsify_embeddings``): ``distribution`` of the initial active sets (default
    ``"uniform"``, the ``dst`` package's one sparsity for all layers); ``delta_t`` steps between
    updates (default 100, the ``dst`` script's base period); ``t_end`` the last step that may
    update (default ``int(0.75 * total_steps)``, as the other methods); ``t_start`` updates come
    after it (0); ``initial_threshold`` the first ``H`` (0.001, paper and code);
    ``tolerance`` delta (0.1, the authors' code); ``N_p`` the number of weights an update aims to
    prune, as ``n_prune`` (a count, as the paper gives it) or ``prune_fraction`` (a fraction of
    all the sparsified weights, active or not; default 0.01, the ``dst`` package's setting),
    not both; it must be below the number of active weights; ``allow_regrowth`` whether a weight
    pruned by an update may be grown back by it, at zero (default False, the authors' code).

    ``threshold`` is the current ``H`` (saved in the state_dict), ``last_pruned`` the ``K`` of the
    last update. Needs a backend whose layers can change their number of active weights
    (capability ``"variable_count"``).
    """

    fixed_budget = False
    grows = True
    requires = frozenset({VARIABLE_COUNT})
    structures = frozenset({"unstructured"})

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "uniform",
                 delta_t: int = 100, t_end: int | None = None, t_start: int = 0,
                 initial_threshold: float = 1e-3, tolerance: float = 0.1,
                 n_prune: int | None = None, prune_fraction: float | None = None,
                 allow_regrowth: bool = False, dense_layers: Iterable[str] | str = (),
                 masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 backend: str = "masked", erk_power_scale: float = 1.0,
                 sparsify_embeddings: bool = False, structure: str | None = None):
        self.delta_t = checks.positive_int(delta_t, "delta_t")
        steps = checks.positive_int(total_steps, "total_steps")
        self.t_end = (max(1, int(0.75 * steps)) if t_end is None
                      else checks.positive_int(t_end, "t_end"))
        self.t_start = checks.non_negative_int(t_start, "t_start")
        self.initial_threshold = checks.positive_real(initial_threshold, "initial_threshold")
        self.tolerance = checks.real_in_range(tolerance, "tolerance", 0.0, 1.0, high_open=True,
                                              meaning="the relative tolerance delta on N_p")
        self.allow_regrowth = checks.boolean(allow_regrowth, "allow_regrowth")
        if n_prune is not None and prune_fraction is not None:
            raise ValueError(f"n_prune ({n_prune!r}) and prune_fraction ({prune_fraction!r}) "
                             "both set N_p, the weights an update aims to prune; give one")
        sparse, _ = partition(model, (dense_layers,) if isinstance(dense_layers, str)
                              else tuple(dense_layers), sparsify_embeddings=sparsify_embeddings)
        numel = sum(t.param.numel() for t in sparse)
        if n_prune is not None:
            self.n_prune = checks.positive_int(n_prune, "n_prune")
        else:
            fraction = checks.fraction(0.01 if prune_fraction is None else prune_fraction,
                                       "prune_fraction", meaning="N_p over the sparsified weights")
            self.n_prune = max(1, round(fraction * numel))
        active = round(check_density(density) * numel)
        if masks is None and self.n_prune >= active:
            raise ValueError(f"N_p ({self.n_prune}) must be below the number of active weights "
                             f"(about density x {numel} = {active}); give a smaller n_prune or "
                             "prune_fraction")
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense_layers, masks=masks,
                         seed=seed, backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    def init_method_state(self) -> None:
        self.threshold = self.initial_threshold
        self.last_pruned = 0
        self._total = sum(self._start_counts.values())
        if self.n_prune >= self._total:
            raise ValueError(f"N_p ({self.n_prune}) must be below the number of active weights "
                             f"({self._total}); give a smaller n_prune or prune_fraction")

    # --- the counts -------------------------------------------------------------------------
    def scheduled_counts(self, t: int) -> None:
        return None  # the data decide the layers' shares

    def scheduled_total(self, t: int) -> int:
        return self._total

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """Any count from 1 (an update never empties a layer) up to the layer's size."""
        return {n: (1, self.backend.numel(n)) for n in self.backend.names}

    # --- the update -------------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        return is_update_step(t, delta_t=self.delta_t, t_start=self.t_start, t_end=self.t_end)

    def grow_order(self, name: str, t: int) -> RandomOrder:
        """The random order in which the update at step ``t`` grows ``name``'s free positions."""
        return self.order(name, GROW, t)

    def adapt_threshold(self, n_pruned: int) -> None:
        """Double ``H`` if fewer than ``(1 - tolerance) N_p`` were pruned, halve it if more
        than ``(1 + tolerance) N_p`` were."""
        if n_pruned < (1 - self.tolerance) * self.n_prune:
            doubled = self.threshold * 2.0
            self.threshold = doubled if math.isfinite(doubled) else self.threshold
        elif n_pruned > (1 + self.tolerance) * self.n_prune:
            halved = self.threshold / 2.0
            self.threshold = halved if halved > 0 else self.threshold

    def _prune(self, name: str, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(active, kept, pruned)`` positions of ``name`` under the threshold, or None where
        its scores are not finite."""
        active = self.backend.active_positions(name)
        scores = checked.drop_scores(self, name, active.numel())
        if scores is None:
            return None
        below = scores.to(torch.float64) < self.threshold
        if bool(below.all()):  # the layer keeps its largest weight
            below[top_k(scores, 1, order_keys(self.order(name, DROP, t), active))] = False
        return active, active[~below], active[below]

    def update_topology(self, t: int) -> None:
        b = self.backend
        pruned = {}
        for name in b.names:
            pruned[name] = self._prune(name, t)
            if pruned[name] is None:
                warn_not_finite(self, name, t)
        live = [n for n in b.names if pruned[n] is not None]
        n_pruned = sum(pruned[n][2].numel() for n in live)
        self.last_pruned = n_pruned
        self.adapt_threshold(n_pruned)
        survivors = [pruned[n][1].numel() for n in live]
        free = [b.numel(n) - pruned[n][1].numel() for n in live]
        regrow = self.allow_regrowth or (
            sum(f - pruned[n][2].numel() for f, n in zip(free, live)) < n_pruned)
        if not regrow:
            free = [f - pruned[n][2].numel() for f, n in zip(free, live)]
        for name, n_grow in zip(live, proportional_split(n_pruned, survivors, free)):
            active, kept, dropped = pruned[name]
            if n_grow == 0 and dropped.numel() == 0:
                continue
            grown = first_free(self.grow_order(name, t), n_grow, kept if regrow else active)
            grown = grown.to(kept.device)
            if regrow and dropped.numel() and bool(contains(dropped, grown).any()):
                b.set_active(name, kept)  # pruned first: a weight grown back starts at zero
            b.set_active(name, merge_sorted(kept, grown)[0])

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``3 f_S``: no dense gradient (random growth), ``f_S`` of the counts of the moment."""
        return sparse_training_flops(f_sparse)

    # --- state ------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        checks.positive_real(state.get("threshold"), "method_state['threshold']",
                             fix="pass the method_state that state_dict() returned")

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self.threshold = float(state["threshold"])

    def allowed_total(self, t: int) -> tuple[int, int]:
        """The total is fixed: only the layers' shares of it move."""
        return self._total, self._total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "delta_t": self.delta_t, "t_end": self.t_end,
                "t_start": self.t_start, "initial_threshold": self.initial_threshold,
                "tolerance": self.tolerance, "n_prune": self.n_prune,
                "allow_regrowth": self.allow_regrowth}
