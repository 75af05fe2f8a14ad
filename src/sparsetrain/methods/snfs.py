"""Sparse momentum, SNFS (Dettmers & Zettlemoyer, "Sparse Networks from Scratch: Faster
Training without Losing Performance", arXiv:1907.04840, 2019): prune by magnitude, move the
pruned weights to the layers whose momentum is largest, grow them where it is largest.

The momentum is an exponential moving average of the dense gradient, ``m <- 0.9 m + 0.1 g``,
kept for every weight at every step (the paper's momentum 0.9), so the method needs a backend
that has the dense gradient of every step (capability ``"dense_gradient_every_step"``). The
updates follow the schedule of the other dynamic methods: every ``delta_t`` steps (default 100)
until ``t_end`` (default ``0.75 * total_steps``) with the fraction ``f(t)`` (``alpha = 0.3``,
cosine decay). An update at step ``t`` with ``redistribution="momentum"`` (the paper's
Algorithm 1 and the authors' code, TimDettmers/sparse_learning, ``sparselearning/core.py``):

1. every layer's share is ``s_l / sum_j s_j`` with ``s_l`` the mean ``|m|`` over its active
   weights before pruning (0 for a layer with none; where every ``s_l`` is 0, the shares are
   the pruned counts, so every layer regrows what it pruned);
2. every layer prunes ``k_l = floor(f(t) * n_l)`` of its ``n_l`` active weights, the smallest
   ``|W|`` (ties by the seeded drop order); without ``allow_regrowth`` at most its
   ``N_l - n_l`` free positions;
3. the total pruned ``P = sum k_l`` is regrown: layer ``l`` is given ``floor(P * share_l)``,
   and the ``P - sum floor(...)`` left go one each to the layers with the largest fractional
   parts (ties: the earlier layer), so the total is exactly ``P``. A layer given more than its
   free positions (``N_l - n_l + k_l``; ``N_l - n_l`` without ``allow_regrowth``) keeps as
   many as it can hold, and the excess is given in the same way to the layers that still have
   room, by their shares (by their room where those shares are 0), until none is left;
4. every layer grows its count at its free positions of largest ``|m|`` (ties by the seeded
   grow order). Grown weights start at zero with zero optimizer state; a weight pruned and
   grown back by the same update (``allow_regrowth``) keeps its value.

The layer counts move, their total stays that of the start. An update that meets a non-finite
weight or momentum is skipped for every layer, with a warning. ``redistribution="none"`` keeps
every layer's count: each layer regrows its own ``min(k_l, N_l - n_l)`` by ``|m|``, the rule of
the other dynamic methods and of the RigL paper's comparison. ``redistribution`` defaults to
``"momentum"``, and to ``"none"`` under a ``structure`` (which fixes each layer's count).

Differences from the authors' code: it reads the optimizer's momentum buffer (Adam:
``m / sqrt(v)``), prunes ``ceil(p * n_l)`` with ``p = 0.5`` decayed by a cosine to 0.005 over
all of training, updates once per epoch, caps a layer at 99% of its free positions and spreads
the excess equally over the layers, rounds with a running correction of the total, and lowers
the prune rate of nearly dense layers; here the total is exact at every update and the
schedule is the project's (set ``alpha``, ``delta_t``, ``t_end`` for the authors').
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import checks
from ..backends.base import DENSE_GRADIENT_EVERY_STEP, VARIABLE_COUNT, Block
from ..flops import snfs_training_flops
from ..sparsity.positions import merge_sorted
from ..sparsity.structure import parse_structure
from .dst import SET
from .registry import register_method
from .update import grow_largest, keep_largest

REDISTRIBUTIONS = ("momentum", "none")


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to the non-negative ``weights`` (positive sum): the floors
    of the exact quotas, then one more to each of the largest fractional parts (ties: the
    earlier entry)."""
    exact = [Fraction(w) for w in weights]
    whole = sum(exact)
    quotas = [total * w / whole for w in exact]
    counts = [math.floor(q) for q in quotas]
    by_fraction = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_fraction[:total - sum(counts)]:
        counts[i] += 1
    return counts


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """``total`` split by ``weights`` (see :func:`largest_remainder`), none above its cap: the
    excess of a capped entry goes to those with room, by their weights (by their room where
    those are all 0), until none is left. Needs ``total <= sum(caps)``."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} weights in {sum(caps)} free positions")
    counts = [0] * len(caps)
    room = [i for i in range(len(caps)) if caps[i] > 0]
    left = total
    while left > 0:
        shares = [weights[i] for i in room]
        if sum(shares) <= 0:
            shares = [caps[i] - counts[i] for i in room]
        given, left = largest_remainder(left, shares), 0
        for i, extra in zip(room, given):
            take = min(extra, caps[i] - counts[i])
            counts[i] += take
            left += extra - take
        room = [i for i in room if counts[i] < caps[i]]
    return counts


@register_method("snfs")
class SNFS(SET):
    """Sparse momentum: grow by ``|EMA(0.9) of the dense gradient|``, and with
    ``redistribution="momentum"`` move the pruned weights between layers by their mean
    momentum (see the module's description); ``"none"`` keeps every layer's count."""

    default_optimizer_step_on_update = False
    fixed_budget = False  # with redistribution="momentum"; True with "none"
    requires = frozenset({DENSE_GRADIENT_EVERY_STEP, VARIABLE_COUNT})
    grad_momentum = 0.9

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 redistribution: str | None = None, structure: str | None = None, **kwargs):
        """``redistribution``, and the keywords of :class:`~.dst.DynamicSparsifier`."""
        structured = parse_structure(structure).kind != "unstructured"
        if redistribution is None:
            redistribution = "none" if structured else "momentum"
        checks.choice(redistribution, "redistribution", REDISTRIBUTIONS)
        if redistribution == "momentum" and structured:
            raise ValueError(f"redistribution='momentum' moves weights between layers, which "
                             f"structure={structure!r} cannot follow (it fixes each layer's "
                             "count); use redistribution='none' with a structure")
        self.redistribution = redistribution
        if redistribution == "none":  # every layer keeps its count, as in the RigL paper
            self.fixed_budget = True
            self.requires = frozenset({DENSE_GRADIENT_EVERY_STEP})
        super().__init__(model, optimizer, structure=structure, **kwargs)

    def init_method_state(self) -> None:
        self.gradient_ema: dict[str, torch.Tensor] = {}

    def observe_gradients(self) -> None:
        for name in self.backend.names:
            grad = self.backend.dense_gradient(name)
            if grad is None:
                continue
            ema = self.gradient_ema.get(name)
            if ema is None:
                self.gradient_ema[name] = (1 - self.grad_momentum) * grad.clone()
            else:
                ema.mul_(self.grad_momentum).add_(grad, alpha=1 - self.grad_momentum)

    def grow_scores(self, block: Block) -> torch.Tensor:
        ema = self.gradient_ema.get(block.name)
        if ema is None:
            return torch.zeros(block.shape)
        return ema[block.rows].abs()

    # --- the counts -----------------------------------------------------------------------
    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        if self.redistribution == "none":
            return super().allowed_counts(t)
        return {n: (0, self.backend.numel(n)) for n in self.backend.names}

    def scheduled_total(self, t: int) -> int:
        return sum(self._start_counts.values())

    def allowed_total(self, t: int) -> tuple[int, int] | None:
        """With redistribution the layers' counts move and their total does not."""
        if self.redistribution == "none":
            return None
        total = self.scheduled_total(t)
        return total, total

    # --- the update -----------------------------------------------------------------------
    def layer_momentum(self, name: str, active: torch.Tensor) -> float:
        """Mean ``|EMA of the gradient|`` over the ``active`` positions of ``name`` (0 if none
        are active or no gradient was seen)."""
        ema = self.gradient_ema.get(name)
        if ema is None or active.numel() == 0:
            return 0.0
        values = ema.reshape(-1)[active.to(ema.device)]
        return float(values.abs().to(torch.float64).mean())

    def update_topology(self, t: int) -> None:
        if self.redistribution == "none":
            super().update_topology(t)
            return
        b, fraction = self.backend, self.drop_fraction(t)
        layers = []  # (name, active, kept, momentum)
        for name in b.names:
            active = b.active_positions(name)
            n_prune = math.floor(fraction * active.numel())
            if not self.allow_regrowth:
                n_prune = min(n_prune, b.numel(name) - active.numel())
            kept = (active if n_prune == 0
                    else keep_largest(self, name, active.numel() - n_prune, t, active))
            momentum = self.layer_momentum(name, active)
            if kept is None or not math.isfinite(momentum):
                return self._skip(name, t)
            layers.append((name, active, kept, momentum))
        pruned = [a.numel() - k.numel() for _, a, k, _ in layers]
        if sum(pruned) == 0:
            return
        free = [b.numel(n) - (k if self.allow_regrowth else a).numel() for n, a, k, _ in layers]
        momenta = [m for *_, m in layers]
        counts = apportion(sum(pruned), momenta if sum(momenta) > 0 else pruned, free)
        new = []
        for (name, active, kept, _), count in zip(layers, counts):
            grown = kept.new_empty(0)
            if count:
                closed = kept if self.allow_regrowth else active
                grown, _ = grow_largest(self, name, count, closed, t)
                if grown is None:
                    return self._skip(name, t)
            if grown.numel() or kept.numel() != active.numel():
                new.append((name, kept, grown))
        for name, kept, grown in new:  # nothing changes before every layer's choice is made
            b.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])

    def _skip(self, name: str, t: int) -> None:
        warnings.warn(f"{type(self).__name__}: weight {name!r} has NaN or infinite weights or "
                      f"momentum at step {t}; the update is skipped for every layer (their "
                      "shares depend on each other). Lower the learning rate or clip "
                      "gradients.", RuntimeWarning, stacklevel=5)

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        return snfs_training_flops(f_dense, f_sparse)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "redistribution": self.redistribution}

    # --- state ----------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {"gradient_ema": {n: e.detach().cpu().clone()
                                 for n, e in self.gradient_ema.items()}}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        ema = state.get("gradient_ema", {})
        if not isinstance(ema, Mapping):
            raise ValueError(f"method_state['gradient_ema'] must be a dict name -> tensor, got "
                             f"{type(ema).__name__}; pass what state_dict() returned")
        for name, e in ema.items():
            if not isinstance(name, str) or name not in self.backend.names:
                shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
                raise ValueError(f"method_state['gradient_ema'] names {shown}, which is not a "
                                 f"sparsified weight ({self.backend.names})")
            shape = self.backend.shape(name)
            if not torch.is_tensor(e) or not e.is_floating_point() or e.is_meta or (
                    e.layout != torch.strided or tuple(e.shape) != shape):
                got = (f"{e.dtype} of shape {tuple(e.shape)}" if torch.is_tensor(e)
                       else type(e).__name__)
                raise ValueError(f"method_state['gradient_ema'][{name!r}] must be a floating "
                                 f"tensor of the weight's shape {shape}, got {got}")

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        like = {n: self.backend.active_values(n) for n in self.backend.names}
        self.gradient_ema = {
            n: e.to(device=like[n].device, dtype=like[n].dtype)
            for n, e in state.get("gradient_ema", {}).items()
        }
