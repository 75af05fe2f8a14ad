"""What a run checkpoint holds, and putting it back.

Everything random in a run is either saved here (model, optimizer, sparsifier, torch's
global RNG) or derived from the seed and the step (``data_order``), so a
run resumed from any checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .folder import FORMAT
from .lr_schedule import LRSchedule


@dataclass
class RunState:
    """The progress of a run: what the loop counts, saved in every checkpoint."""

    step: int = 0            # optimizer steps done
    best_test_accuracy: float = 0.0
    wall_time_s: float = 0.0
    finished: bool = False
    # sums over the steps since the last training-metrics line, so a resumed run logs the same
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_flops: float = 0.0  # training FLOPs so far (RigL paper, Appendix H)
    examples: int = 0         # training examples seen


def checkpoint_content(config: TrainConfig, state: RunState, model: nn.Module,
                       optimizer: torch.optim.Optimizer, sparsifier: Any | None,
                       schedule: LRSchedule, data_info: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The checkpoint of the run as it stands (plain tensors and values: loads with
    ``weights_only=True``); ``data_info`` is the data set's ``info`` (what identifies it)."""
    return {
        "format": FORMAT,
        "version": 1,
        "config": config.semantic_dict(),
        "data": dict(data_info or {}),
        "run": dataclasses.asdict(state),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sparsifier": None if sparsifier is None else sparsifier.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
    }


#: The settings a resumed run may change (``sparsetrain train --resume D --override KEY=VALUE``):
#: those of the learning rate, which the checkpoint does not depend on.
CHANGEABLE_ON_RESUME = ("lr", "lr_schedule", "lr_milestones", "lr_gamma", "lr_step_epochs",
                        "warmup_epochs")


def check_changes(changed: Iterable[str], resume: bool) -> tuple[str, ...]:
    """``changed`` as a tuple, checked: only on resume, only ``CHANGEABLE_ON_RESUME``."""
    changed = tuple(changed)
    if changed and not resume:
        raise ConfigError("settings can be overridden only when resuming a run (--resume)")
    other = sorted(set(changed) - set(CHANGEABLE_ON_RESUME))
    if other:
        raise ConfigError(f"a resumed run can change only its learning-rate settings "
                          f"({', '.join(CHANGEABLE_ON_RESUME)}), not {', '.join(other)}; start "
                          "a new run for other settings")
    return changed


#: What a run checkpoint must hold (``"sparsifier"`` is ``None`` for dense runs).
REQUIRED = ("config", "run", "model", "optimizer", "sparsifier", "torch_rng")


def run_state(saved: Any, total_steps: int) -> RunState:
    """The ``"run"`` entry of a checkpoint as a ``RunState``, checked: every field present with
    a finite, non-negative value of its type, and the step within the run's ``total_steps``
    (``ValueError`` naming what is wrong otherwise)."""
    if not isinstance(saved, dict):
        raise ValueError("its 'run' entry is not a mapping")
    missing = [f.name for f in dataclasses.fields(RunState) if f.name not in saved]
    if missing:
        raise ValueError(f"its 'run' entry lacks {missing}")
    values = {}
    for f in dataclasses.fields(RunState):
        value, kind = saved[f.name], type(getattr(RunState(), f.name))
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value >= 0)
        if not ok:
            raise ValueError(f"its 'run' entry has {f.name} = {value!r}, not a finite, "
                             f"non-negative {kind.__name__}")
        values[f.name] = kind(value)
    state = RunState(**values)
    if state.step > total_steps:
        raise ValueError(f"its step {state.step} is beyond the end of this run "
                         f"({total_steps} steps)")
    if state.finished and state.step != total_steps:
        raise ValueError(f"it is marked finished at step {state.step} of {total_steps}")
    return state


def check_same_data(checkpoint: dict[str, Any], data_info: dict[str, Any], where: Path) -> None:
    """``ConfigError`` when the checkpoint records another corpus (SHA-256) than the data set
    loaded now: a resumed run goes on with the data it started with."""
    saved = checkpoint.get("data")
    before = saved.get("sha256") if isinstance(saved, dict) else None
    now = data_info.get("sha256")
    if before is not None and now is not None and before != now:
        raise ConfigError(
            f"the run in {where} was trained on data with SHA-256 {before} ({saved.get('source')}"
            f"), but the data loaded now has {now} ({data_info.get('source')}); resume with the "
            "run's own data (--data-dir, and the same Python for the default corpus) or start a "
            "new run folder")


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            sparsifier: Any | None, where: Path, total_steps: int) -> RunState:
    """Load ``checkpoint`` into the model, optimizer, sparsifier and torch's RNG; return the
    run state. A checkpoint that does not fit (or whose entries are missing or out of range)
    raises ``ConfigError`` naming the run folder ``where``."""
    try:
        missing = [k for k in REQUIRED if k not in checkpoint]
        if missing:
            raise ValueError(f"it lacks the entries {missing}")
        state = run_state(checkpoint["run"], total_steps)
        if (sparsifier is None) != (checkpoint["sparsifier"] is None):
            raise ValueError("it is of a run " + ("without" if sparsifier is not None
                                                  else "with") + " a sparsifier")
        model_state = dict(checkpoint["model"])
        # a state saved from a DistributedDataParallel wrapper names weights "module.*"
        nn.modules.utils.consume_prefix_in_state_dict_if_present(model_state, "module.")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if sparsifier is not None:
            sparsifier.load_state_dict(checkpoint["sparsifier"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ConfigError(f"the checkpoint in {where} does not fit this run: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
    return state
