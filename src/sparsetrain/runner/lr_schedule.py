"""The learning rate of every optimizer step of a run."""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig


class LRSchedule:
    """Learning rate of every step: linear warm-up, then cosine, step, multi-step or constant.

    ``step`` and ``multistep`` count in epochs (``lr_step_epochs``; ``lr_milestones`` as
    fractions of training when all are <= 1, else as epochs); cosine decays to 0 at the end.

    The training length (``config.length``, k) stretches the whole schedule k times, as the
    RigL paper's longer runs do (google-research/rigl, ``imagenet_train_eval.py``,
    ``set_lr_schedule``: ``training_steps_multiplier`` multiplies every epoch of its schedule,
    the end of the warm-up included): epochs given in the settings (``warmup_epochs``,
    ``lr_step_epochs``, milestones in epochs) are epochs of the run at length 1 and are
    multiplied by k; fractions of training, and cosine, span the trained steps already. The
    warm-up is stretched too, so that a run at length k is the run at length 1 slowed down k
    times, not one with another beginning. Epochs become steps as ``round(epochs * k *
    steps_per_epoch)``, exact for a whole k: the factor of step k * t is then the length-1
    factor of step t, but for the warm-up, whose ramp gives a step the value of its end
    ((t + 1) / warmup_steps), reached at length k by step k * t + k - 1.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int, total_steps: int):
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        k = config.length
        self.warmup_steps = int(round(config.warmup_epochs * k * steps_per_epoch))
        self.step_steps = max(1, int(round(config.lr_step_epochs * k * steps_per_epoch)))
        milestones = list(config.lr_milestones)
        if milestones and all(m <= 1 for m in milestones):
            milestones = [m * config.trained_epochs() for m in milestones]
        else:
            milestones = [m * k for m in milestones]
        self.milestone_steps = sorted(int(round(m * steps_per_epoch)) for m in milestones)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for the optimizer step ``step`` (0-based)."""
        c = self.config
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if c.lr_schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        if c.lr_schedule == "step":
            return c.lr_gamma ** (step // self.step_steps)
        if c.lr_schedule == "multistep":
            return c.lr_gamma ** sum(step >= m for m in self.milestone_steps)
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint records of the schedule (for reading; it is rebuilt from the
        settings on resume)."""
        return {"kind": self.config.lr_schedule, "warmup_steps": self.warmup_steps,
                "milestone_steps": self.milestone_steps, "total_steps": self.total_steps}
