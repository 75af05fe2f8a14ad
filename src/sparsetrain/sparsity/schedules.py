"""Schedules of dynamic sparse training, as plain functions of the training step.

RigL paper, Section 3 and Algorithm 1: the topology is updated every ``delta_t`` steps between
``t_start`` and ``t_end``; the fraction of active weights dropped at step ``t`` decays from
``alpha`` to zero at ``t_end``. The paper's default is the cosine decay
``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))``.
"""

from __future__ import annotations

import math

DROP_FRACTION_DECAYS = ("cosine", "linear", "constant")


def drop_fraction(t: int, *, alpha: float, t_end: int, decay: str = "cosine") -> float:
    """Fraction of the active weights of each layer dropped by an update at step ``t``."""
    if decay not in DROP_FRACTION_DECAYS:
        raise ValueError(
            f"drop_fraction_decay must be one of {', '.join(map(repr, DROP_FRACTION_DECAYS))}, "
            f"got {decay!r}"
        )
    if decay == "constant":
        return alpha
    progress = min(max(t / t_end, 0.0), 1.0) if t_end > 0 else 1.0
    if decay == "linear":
        return alpha * (1.0 - progress)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * progress))


def is_update_step(t: int, *, delta_t: int, t_start: int = 0, t_end: int) -> bool:
    """Whether step ``t`` (1-based count of ``step()`` calls) updates the topology.

    Updates happen at ``t_start + delta_t, t_start + 2 * delta_t, ...`` up to ``t_end``; none
    after ``t_end``.
    """
    return t_start < t <= t_end and (t - t_start) % delta_t == 0


def gradual_density(t: int, *, initial: float, final: float, start_step: int,
                    end_step: int) -> float:
    """The cubic density schedule of gradual magnitude pruning (Zhu & Gupta 2017) at step ``t``:

        d(t) = final + (initial - final) * (1 - (t - start_step) / (end_step - start_step))^3

    ``initial`` up to ``start_step``, ``final`` from ``end_step`` on.
    """
    progress = min(max((t - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(t: int, *, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether step ``t`` of gradual pruning prunes: ``start_step + frequency``,
    ``start_step + 2 * frequency``, ... up to ``end_step``, and ``end_step`` itself."""
    if not start_step < t <= end_step:
        return False
    return t == end_step or (t - start_step) % frequency == 0
