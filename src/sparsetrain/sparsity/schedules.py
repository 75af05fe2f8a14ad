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
