"""Sparse training with the Hugging Face ``transformers.Trainer``: ``SparseTrainer``.

::

    from sparsetrain.integrations.huggingface import SparseTrainer

    trainer = SparseTrainer(model=model, args=args, train_dataset=data,
                            sparsity={"method": "rigl", "density": 0.1, "delta_t": 100})
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.sparsifier.layer_densities()

It is a ``Trainer`` subclass (``SparseTrainerMixin`` for other ``Trainer`` subclasses, e.g.
``class SparseSeq2SeqTrainer(SparseTrainerMixin, Seq2SeqTrainer)``), not a callback, because
three of its guarantees are out of a callback's reach:

- resuming: a callback is never told which checkpoint ``train(resume_from_checkpoint=...)``
  resumes from, so it could not find the sparsifier state of that checkpoint;
- clipping: Trainer clips by the norm of *all* gradients before any callback event; a callback
  could only stop that by changing the user's ``args.max_grad_norm``;
- logging: callbacks see ``on_log`` after the reporting integrations (TensorBoard, W&B, ...), so
  statistics a callback adds never reach them; ``Trainer.log`` is the documented place.

What it does: when ``train()`` creates the optimizer, it builds the sparsifier on it (total steps:
``state.max_steps``, the optimizer steps after gradient accumulation) and hooks it
(``Sparsifier.hook_optimizer``), so every optimizer step Trainer makes, through accelerate's
wrapper and its GradScaler, is a sparse step; a step the GradScaler skips is not counted.
Trainer's clipping (``max_grad_norm``) clips by the norm of the active gradients, after unscaling
under fp16, and ``grad_norm`` in the logs is that norm. Every logged training step carries
``sparsity/density`` and ``sparsity/ever_active``. Every checkpoint gets ``sparsifier.pt``
(``torch.load(..., weights_only=True)`` reads it), and ``train(resume_from_checkpoint=...)``
restores it, so a resumed run continues exactly as an uninterrupted one.

It overrides two private Trainer methods, ``_clip_grad_norm`` and ``_get_grad_norm`` (Trainer has
no public hook between the backward pass and its clipping); it refuses to run on a transformers
that lacks them. Not supported: DeepSpeed and FSDP (they own the optimizer step and the
weights), ``backend="csr"``, and hyperparameter search with checkpoints.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as _exc:  # one line that says what to do
    raise ImportError("sparsetrain.integrations.huggingface needs transformers: "
                      "pip install 'sparsetrain[huggingface]'") from _exc

import torch

from ..methods.base import Sparsifier
from . import _common

__all__ = ["SPARSIFIER_NAME", "SparseTrainer", "SparseTrainerMixin"]

#: The file holding the sparsifier state in each ``checkpoint-N`` folder.
SPARSIFIER_NAME = "sparsifier.pt"

#: The private Trainer methods overridden (no public hook runs before Trainer's clipping).
_PRIVATE = ("_clip_grad_norm", "_get_grad_norm")


def _factory(sparsity: Mapping[str, Any] | Callable) -> _common.Factory:
    if isinstance(sparsity, Mapping):
        settings = dict(sparsity)
        if "method" not in settings:
            raise ValueError("sparsity needs a 'method' (e.g. {'method': 'rigl', 'density': "
                             "0.1}), or pass a function (model, optimizer, total_steps) -> "
                             "Sparsifier")
        return _common.make_factory(settings.pop("method"), settings)
    if callable(sparsity):
        return _common.make_factory(sparsity, {})
    raise ValueError(f"sparsity must be a dict such as {{'method': 'rigl', 'density': 0.1}} or a "
                     f"function (model, optimizer, total_steps) -> Sparsifier, got "
                     f"{type(sparsity).__name__}")


class SparseTrainerMixin:
    """Makes a ``transformers.Trainer`` (sub)class train sparse; put it first among the bases.

    ``sparsity`` (keyword, required): ``{"method": "rigl", "density": 0.1, ...}`` with the
    method's settings (``st.RigL``'s arguments but ``total_steps``, which comes from the
    Trainer), or a function ``(model, optimizer, total_steps) -> Sparsifier``.
    ``self.sparsifier`` is the sparsifier of the last ``train()`` (``None`` before).
    """

    def __init__(self, *args, sparsity: Mapping[str, Any] | Callable, **kwargs):
        for name in _PRIVATE:
            if not callable(getattr(super(), name, None)):
                raise RuntimeError(
                    f"{type(self).__name__} needs Trainer.{name}, which transformers "
                    f"{transformers.__version__} does not have; upgrade transformers "
                    "(pip install -U 'sparsetrain[huggingface]')")
        self._sparse_factory = _factory(sparsity)
        self.sparsifier: Sparsifier | None = None
        self._sparse_hooks = None
        self._sparse_resume: str | None = None
        self._sparse_training = False
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"{type(self).__name__} does not support DeepSpeed or FSDP: they own "
                             "the optimizer step and shard the weights; train without them")
        self.add_callback(_SaveSparsifier(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; the sparsifier is built when the optimizer is, and restored from
        ``resume_from_checkpoint`` (``True``: the last checkpoint in ``args.output_dir``)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory "
                                 f"({self.args.output_dir})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self._sparse_resume = resume_from_checkpoint
        self._sparse_training = True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._sparse_training = False
            self._unhook()

    def create_optimizer(self, *args, **kwargs):
        """``Trainer.create_optimizer``, then (inside ``train()``) the sparsifier on it."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._sparse_training:
            self._build_sparsifier(optimizer)
        return optimizer

    def _build_sparsifier(self, optimizer) -> None:
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer,
                                                                           "optimizer"):
            optimizer = optimizer.optimizer  # the torch optimizer inside a wrapper
        self._unhook()
        total = self.state.max_steps
        if self._sparse_resume is None:
            sparsifier = _common.build(self._sparse_factory, self.model, optimizer, total)
        else:
            where = str(self._sparse_resume)
            state = _common.load_state(os.path.join(where, SPARSIFIER_NAME), where)
            sparsifier = _common.restore(self._sparse_factory, self.model, optimizer, total,
                                         state, where)
        self._sparse_hooks = sparsifier.hook_optimizer()
        self.sparsifier = sparsifier

    def _unhook(self) -> None:
        if self._sparse_hooks is not None:
            self._sparse_hooks.remove()
            self._sparse_hooks = None

    def _sparse_scaler(self):
        # accelerate's AcceleratedOptimizer holds the GradScaler under fp16 (None otherwise)
        return getattr(self.optimizer, "scaler", None)

    # private Trainer method: the clipping of max_grad_norm, called after the backward pass
    def _clip_grad_norm(self, model):
        if self.sparsifier is None:
            return super()._clip_grad_norm(model)
        return self.sparsifier.clip_grad_norm_(self.args.max_grad_norm,
                                               scaler=self._sparse_scaler())

    # private Trainer method: the grad_norm logged when max_grad_norm is 0
    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.sparsifier is not None:
            grad_norm = self.sparsifier.clip_grad_norm_(math.inf, scaler=self._sparse_scaler())
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log``, with the sparsity statistics in every training-loss log."""
        if self.sparsifier is not None and "loss" in logs:
            logs.update(_common.statistics(self.sparsifier))
        return super().log(logs, *args, **kwargs)


class SparseTrainer(SparseTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains sparse: ``SparseTrainer(..., sparsity={"method":
    "rigl", "density": 0.1})``. See the module docstring for what it guarantees."""


class _SaveSparsifier(TrainerCallback):
    """Writes the sparsifier state into every checkpoint folder Trainer saves."""

    def __init__(self, trainer: SparseTrainerMixin):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        sparsifier = self.trainer.sparsifier
        if sparsifier is None or not self.trainer._sparse_training or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(f"the checkpoint Trainer just saved is not {folder}, so its "
                               "sparsifier state cannot go with it (hyperparameter search "
                               "saves elsewhere and is not supported); set save_strategy='no'")
        _common.save_state(sparsifier, os.path.join(folder, SPARSIFIER_NAME))
