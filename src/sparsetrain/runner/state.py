"""What a run checkpoint holds, and putting it back.

Everything random in a run is either saved here (model, optimizer, sparsifier with its
generator, torch's global RNG) or derived from the seed and the step (``data_order``), so a
run resumed from any checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
                       schedule: LRSchedule) -> dict[str, Any]:
    """The checkpoint of the run as it stands (plain tensors and values: loads with
    ``weights_only=True``)."""
    return {
        "format": FORMAT,
        "version": 1,
        "config": config.semantic_dict(),
        "run": dataclasses.asdict(state),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sparsifier": None if sparsifier is None else sparsifier.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
    }


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            sparsifier: Any | None, where: Path) -> RunState:
    """Load ``checkpoint`` into the model, optimizer, sparsifier and torch's RNG; return the
    run state. A checkpoint that does not fit raises ``ConfigError`` naming the run folder
    ``where``."""
    try:
        model_state = dict(checkpoint["model"])
        # a state saved from a DistributedDataParallel wrapper names weights "module.*"
        nn.modules.utils.consume_prefix_in_state_dict_if_present(model_state, "module.")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if sparsifier is not None:
            sparsifier.load_state_dict(checkpoint["sparsifier"])
        run = checkpoint["run"]
        defaults = RunState()
        state = RunState(**{f.name: type(getattr(defaults, f.name))(run[f.name])
                            for f in dataclasses.fields(RunState)})
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"checkpoint in {where} does not fit this run: {exc}") from None
    return state
