"""Sparse training with Lightning: ``SparseTrainingCallback``.

::

    from sparsetrain.integrations.lightning import SparseTrainingCallback

    sparse = SparseTrainingCallback("rigl", density=0.1, delta_t=100)
    trainer = lightning.Trainer(max_steps=10_000, gradient_clip_val=1.0, callbacks=[sparse])
    trainer.fit(module, data)               # or trainer.fit(module, data, ckpt_path=...)
    sparse.sparsifier.layer_densities()

At ``on_fit_start`` (the module's weights are loaded by then, and its optimizer exists) the
callback builds the sparsifier on the module's optimizer, for ``trainer.estimated_stepping_batches``
optimizer steps (after ``accumulate_grad_batches``), and hooks it
(``Sparsifier.hook_optimizer``) so that every optimizer step Lightning makes is a sparse step.

Lightning steps the optimizer with a closure that runs the forward and backward pass *inside*
``optimizer.step``; the sparsifier's pre-hook runs that closure first, so the optimizer, the
sparsifier and the module see what they would see with ``closure()`` followed by
``optimizer.step()``. (Under fp16 Lightning runs the closure itself and steps through the
GradScaler without one; a step the scaler skips is then not counted.)

Clipping: with ``Trainer(gradient_clip_val=v)`` (clipping by norm), the callback clips by the norm
of the active gradients in ``on_before_optimizer_step`` (after Lightning's unscaling) and sets the
trainer's ``gradient_clip_val`` to ``None`` while fitting, so that Lightning does not clip again by
the norm of all gradients; it is set back when fitting ends. Clipping by value is left to
Lightning (it acts on each gradient alone).

Logging: ``sparsity/density`` and ``sparsity/ever_active`` through ``pl_module.log`` on every
training batch, so they reach the trainer's loggers. Checkpoints: the sparsifier state is the
callback's ``state_dict()``, saved in every Lightning checkpoint; ``fit(ckpt_path=...)``
restores it, so a resumed run continues exactly as an uninterrupted one (Lightning resumes
exactly at epoch ends; mid-epoch it does not skip the batches already seen, sparse or not).

Not supported: manual optimization, several optimizers, ``backend="csr"``, and strategies that
shard the weights or own the optimizer step (FSDP, DeepSpeed).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

try:
    from lightning.pytorch import Callback
except ImportError as _exc:  # one line that says what to do
    raise ImportError("sparsetrain.integrations.lightning needs Lightning: "
                      "pip install 'sparsetrain[lightning]'") from _exc

from ..methods.base import Sparsifier
from . import _common

__all__ = ["SparseTrainingCallback"]


class SparseTrainingCallback(Callback):
    """Trains the LightningModule sparse: ``SparseTrainingCallback("rigl", density=0.1, ...)``.

    ``method``: a registered method name (``"rigl"``, ``"set"``, ``"static"``, ``"snfs"``,
    ``"gmp"``), a ``Sparsifier`` class, or a function ``(model, optimizer, total_steps) ->
    Sparsifier``; ``method_kwargs``: the method's settings, but ``total_steps``, which comes from
    the trainer. ``self.sparsifier`` is the sparsifier of the last fit (``None`` before).
    """

    def __init__(self, method: str | type | Callable = "rigl", **method_kwargs: Any):
        self._factory = _common.make_factory(method, method_kwargs)
        self.sparsifier: Sparsifier | None = None
        self._loaded: Mapping[str, Any] | None = None
        self._handles: list = []
        self._max_norm: float | None = None
        self._statistics: dict[str, float] | None = None
        self._statistics_step = -1

    # --- building and hooking -------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("SparseTrainingCallback needs automatic optimization; with manual "
                             "optimization build the sparsifier yourself and call "
                             "sparsifier.step() in place of optimizer.step()")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseTrainingCallback needs exactly one optimizer, the module "
                             f"configures {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the number of optimizer steps is unknown (an iterable dataset "
                             "without max_steps); set Trainer(max_steps=...)")
        self._release(trainer)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            sparsifier = _common.restore(self._factory, pl_module, optimizer, int(total), state,
                                         str(trainer.ckpt_path))
        elif trainer.ckpt_path is not None:
            raise ValueError(f"the checkpoint {trainer.ckpt_path} holds no sparsifier state: it "
                             "was not saved with a SparseTrainingCallback; resume from a "
                             "checkpoint of a sparse run, or start a new run")
        else:
            sparsifier = _common.build(self._factory, pl_module, optimizer, int(total))
        self._handles = [sparsifier.hook_optimizer()]
        self.sparsifier = sparsifier
        self._statistics, self._statistics_step = None, -1
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if clip and (algorithm is None or str(algorithm) == "norm"):
            self._max_norm = float(clip)
            trainer.gradient_clip_val = None  # set back in teardown

    def _release(self, trainer) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._max_norm is not None:
            trainer.gradient_clip_val = self._max_norm
            self._max_norm = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release(trainer)

    # --- the step ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._max_norm is not None and self.sparsifier is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: unscaled by now
            self.sparsifier.clip_grad_norm_(self._max_norm, scaler=scaler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sparsifier is not None:
            pl_module.log_dict(self._current_statistics(), on_step=True, on_epoch=False,
                               batch_size=1)

    def _current_statistics(self) -> dict[str, float]:
        """The statistics, recomputed only after a step that may have changed the masks (the
        fraction ever active reads every weight's flag)."""
        sparsifier, step = self.sparsifier, self.sparsifier.step_count
        if self._statistics is None or any(sparsifier.is_update_step(t) for t in
                                           range(self._statistics_step + 1, step + 1)):
            self._statistics = _common.statistics(sparsifier)
        self._statistics_step = step
        return self._statistics

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sparsifier state (empty before the sparsifier is built)."""
        return {} if self.sparsifier is None else {"sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep a saved sparsifier state for ``on_fit_start``, which restores it."""
        self._loaded = state_dict.get("sparsifier")
