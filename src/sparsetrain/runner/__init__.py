"""The experiment runner: settings, the training loop, checkpoints and exact resume."""

from .config import ConfigError, TrainConfig, load_yaml, make_config
from .folder import run_folder
from .train import Trainer, TrainingError

__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingError", "load_yaml", "make_config",
           "run_folder"]
