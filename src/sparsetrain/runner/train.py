"""One training run: the loop over the steps, its metrics, checkpoints and summary.

The run is built by ``build.build_run``; its files are read and written by ``folder``
(``config.yaml``, ``metrics.jsonl`` with training averages every ``log_every`` steps and a test
evaluation every epoch, ``checkpoint.pt`` every ``checkpoint_every`` steps, at every epoch end
and at the end, ``summary.json`` when finished); with ``tensorboard``, the same metrics go to
TensorBoard event files too (``tensorboard.py``).

Losses and accuracies are per prediction (``measure``): per example on classification data,
per position on sequence data (``Dataset.kind``), where the loss is in nats per byte and the
summary adds it in bits per byte.

Exact resume: everything random is either saved (``state``) or derived from the seed and the
step (``data_order``), so a run interrupted at any step and resumed ends with the same weights
and masks, bit for bit, as one that ran straight through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import folder, measure, tensorboard
from ..backends import dense_state_dict
from .build import build_run
from .config import ConfigError, TrainConfig
from .data_order import batch_generator, epoch_order
from .distributed import Distributed
from .folder import run_folder
from .interrupt import StopRequest
from .lock import FolderLock
from .lr_schedule import LRSchedule
from .progress import progress_bar
from .state import RunState, check_changes, check_same_data, checkpoint_content, restore

__all__ = ["LRSchedule", "Trainer", "TrainingError", "run_folder"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


class Trainer:
    """Builds a run from a ``TrainConfig`` and trains it in ``out``, resuming from the
    checkpoint there if ``resume`` (starting from step 0 if the run was stopped before its first
    checkpoint). ``changed`` names the settings that ``config`` changes from the saved run on
    resume (learning-rate settings only, ``CHANGEABLE_ON_RESUME``). ``log`` receives the
    messages (rank 0's only; default: print); ``distributed`` defaults to what torchrun's
    environment describes.

    The process (rank 0) holds the folder's lock from here to the end of ``train()`` (or
    ``close()``): another Trainer on the same folder raises ``FolderInUse``. A caller that
    holds the lock already passes it as ``lock`` (the trainer then owns it).
    """

    def __init__(self, config: TrainConfig, out: Path, *, resume: bool = False,
                 changed: Iterable[str] = (), log: Callable[[str], None] | None = None,
                 distributed: Distributed | None = None, lock: FolderLock | None = None):
        self.config = config
        self.out = Path(out)
        self._lock = lock
        self.changed = check_changes(changed, resume)
        self.dist = distributed or Distributed.from_environment(config.device)
        say = log or (lambda message: print(message, flush=True))
        self.log = say if self.dist.is_main else (lambda message: None)  # rank 0 speaks
        if self._lock is None and self.dist.is_main and self.out.is_dir():
            self._lock = folder.claim(self.out)  # before anything in it is read
        self._board: tensorboard.TensorBoardLog | None = None
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool) -> None:
        config = self.config
        if config.tensorboard and self.dist.is_main:
            tensorboard.check_available()
        has_checkpoint = folder.has_checkpoint(self.out)
        if not resume and has_checkpoint:
            raise ConfigError(f"{self.out} already holds a run; continue it with --resume "
                              f"{self.out} (resume=True), or use another folder")
        if resume and not has_checkpoint:
            if not folder.config_path(self.out).is_file():
                raise ConfigError(f"nothing to resume in {self.out}: it has no "
                                  f"{folder.CHECKPOINT} and no {folder.CONFIG}")
            self.log(f"{self.out} has no checkpoint yet (the run stopped before its first): "
                     "starting from step 0")
        run = build_run(config, self.dist, self.log, self.out if has_checkpoint else None,
                        self.changed)
        self.device, self.data, self.n_train = run.device, run.data, run.n_train
        self.steps_per_epoch, self.total_steps = run.steps_per_epoch, run.total_steps
        self.width, self.model, self.optimizer = run.width, run.model, run.optimizer
        self.sparsifier, self.net = run.sparsifier, run.net
        self.dense_flops, self._example = run.dense_flops, run.example
        self.schedule = LRSchedule(config, self.steps_per_epoch, self.total_steps)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.state = RunState()
        self._stop = StopRequest(self.log)
        self.stopped_by: int | None = None  # the signal that stopped the run, if one did
        self._resumed = run.checkpoint is not None
        self._changes: dict[str, dict[str, Any]] = {}
        self._checkpoint_step: int | None = None
        if run.checkpoint is not None:
            check_same_data(run.checkpoint, self.data.info, self.out)
            self.state = restore(run.checkpoint, self.model, self.optimizer, self.sparsifier,
                                 self.out, self.total_steps)
            self._checkpoint_step = self.state.step
            saved = run.checkpoint["config"]
            self._changes = {k: {"from": saved.get(k), "to": getattr(config, k)}
                             for k in self.changed if saved.get(k) != getattr(config, k)}
        self.sparse_flops = measure.inference_flops(self.model, self._example, self.sparsifier)

    def close(self) -> None:
        """Close the TensorBoard files and give the folder's lock back (``train()`` does so
        when it returns)."""
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- measuring ------------------------------------------------------------------------
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy, per prediction."""
        return measure.evaluate(self.model, self.data, self.dist, self.device)

    def layer_densities(self) -> dict[str, float]:
        return measure.layer_densities(self.model, self.sparsifier)

    def density(self) -> float:
        """Fraction of the sparsifiable weights that are active (dense layers count fully)."""
        return measure.density(self.model, self.sparsifier)

    def ever_active_fraction(self) -> float:
        """Fraction of the sparsified weights that have been active at some point."""
        return measure.ever_active_fraction(self.sparsifier)

    # --- files ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0 only; the other ranks wait until it is written)."""
        if self.dist.is_main:
            folder.save_checkpoint(self.out, checkpoint_content(
                self.config, self.state, self.model, self.optimizer, self.sparsifier,
                self.schedule, self.data.info))
        self._checkpoint_step = self.state.step
        self.dist.barrier()

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            folder.append_metrics(self.out, record)

    def _open_board(self) -> None:
        if self.config.tensorboard and self.dist.is_main and self._board is None:
            self._board = tensorboard.TensorBoardLog(self.out, self.state.step)

    # --- training -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current step, with a checkpoint (what Ctrl-C and SIGTERM do)."""
        self._stop.request()

    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> dict[str, Any] | None:
        """Train to the end; return the summary, or ``None`` if stopped early (checkpointed;
        ``stopped_by`` names the signal that asked, if one did). ``on_step(trainer)`` is called
        after every step."""
        try:
            with self._stop.catching_signals():
                return self._train(on_step)
        finally:
            self.close()

    def _train(self, on_step) -> dict[str, Any] | None:
        if self.dist.is_main:
            if self._lock is None:
                self._lock = folder.claim(self.out)
            if self._resumed:
                folder.truncate_metrics(self.out, self.state.step)  # later lines come again
            else:
                folder.start_afresh(self.out)
            folder.save_config(self.out, self.config)
            if not self._resumed:  # the weights at step 0, for sparsetrain analyze
                folder.save_initial(self.out, dense_state_dict(self.model))
        if self._changes:
            self._append_metrics({"kind": "override", "step": self.state.step,
                                  "changes": self._changes})
            self.log("resuming with changed settings: " + ", ".join(
                f"{k} {v['from']!r} -> {v['to']!r}" for k, v in self._changes.items()))
            self.save_checkpoint()  # so that the run resumes with them from now on
        if self.state.finished:
            self.log(f"{self.out} is already finished; nothing to do")
            try:
                summary = folder.read_summary(self.out)
            except folder.RunFolderError:
                summary = None
            # a lost or broken summary is written again from the final state
            return summary if summary is not None else self._finish()
        self._open_board()
        stopped = self._loop(on_step)
        if stopped:
            self.save_checkpoint()
            self.stopped_by = self._stop.signum
            self.log(f"stopped at step {self.state.step} of {self.total_steps}; checkpoint "
                     f"written, continue with: sparsetrain train --resume {self.out}")
            return None
        return self._finish()

    def _loop(self, on_step) -> bool:
        """The remaining steps, epoch by epoch; ``True`` if stopped before the end."""
        c, s = self.config, self.state
        progress = progress_bar(c.progress and self.dist.is_main)
        start = time.perf_counter() - s.wall_time_s
        while s.step < self.total_steps:
            epoch, offset = divmod(s.step, self.steps_per_epoch)
            order = epoch_order(self.n_train, c.seed, epoch)
            bar = progress(total=self.steps_per_epoch, initial=offset,
                           desc=f"epoch {epoch + 1}/{c.trained_epochs()}")
            try:
                for i in range(offset, self.steps_per_epoch):
                    self._step(order[i * c.batch_size:(i + 1) * c.batch_size], epoch)
                    s.wall_time_s = time.perf_counter() - start
                    bar.update(1)
                    if s.step % c.log_every == 0:
                        bar.set_postfix(loss=f"{self._log_training():.3f}")
                    if on_step is not None:
                        on_step(self)
                    epoch_end = i == self.steps_per_epoch - 1
                    if epoch_end:
                        self._end_epoch(epoch)
                    if self._stop_agreed() and s.step < self.total_steps:
                        return True
                    if epoch_end or (c.checkpoint_every and s.step % c.checkpoint_every == 0):
                        self.save_checkpoint()
            finally:
                bar.close()
        return False

    def _step(self, idx: torch.Tensor, epoch: int) -> None:
        """One optimizer step on the training examples ``idx`` (this process's share)."""
        c, s = self.config, self.state
        # the whole step's batch, prepared alike everywhere; this process's share
        x = self.data.prepare(self.data.train_x[idx], train=True, augment=c.augment,
                              generator=batch_generator(c.seed, s.step))
        share = self.dist.share(len(idx))
        y = self.data.prepare_targets(self.data.train_y[idx][share])
        x, y = x[share].to(self.device), y.to(self.device)
        lr = c.lr * self.schedule.factor(s.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        out, target = measure.flat_predictions(self.net(x), y)
        loss = self.loss_fn(out, target)
        # the whole batch's loss, accuracy and predictions (examples, or sequence positions),
        # and whether every share's loss is finite
        loss_sum, correct, predictions, bad = self.dist.sum([
            float(loss.detach()) * len(target), int((out.argmax(1) == target).sum()),
            len(target), 0.0 if torch.isfinite(loss) else 1.0])
        if bad:
            raise TrainingError(
                f"the training loss became {float(loss.detach())} at step {s.step + 1} (epoch "
                f"{epoch + 1}) with the learning rate at {lr:.4g}; {self._way_back(lr)}")
        # DDP averages the shares' gradients: weighting each share's mean loss by its size
        # makes that average the gradient of the whole batch's mean loss
        (loss * (len(y) * self.dist.world / len(idx))).backward()
        if c.clip_grad_norm is not None:  # after DDP's all-reduce: the same norm on every rank
            if self.sparsifier is not None:
                self.sparsifier.clip_grad_norm_(c.clip_grad_norm)
            else:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad_norm)
        (self.sparsifier or self.optimizer).step()
        s.step += 1
        s.train_flops += measure.step_training_flops(self.sparsifier, self.dense_flops,
                                                     self.sparse_flops) * len(idx)
        s.examples += len(idx)
        if self.sparsifier is not None and self.sparsifier.is_update_step(s.step):
            self._check_masks_agree()
            self.sparse_flops = measure.inference_flops(self.model, self._example,
                                                        self.sparsifier)
        s.loss_sum += loss_sum
        s.correct += int(correct)
        s.seen += int(predictions)

    def _way_back(self, lr: float) -> str:
        """What to do after the loss diverged, truthful about the checkpoint there is."""
        lower = f"{self.config.lr / 10:.3g}"
        if self._checkpoint_step is None:
            return (f"no checkpoint was written yet; start again with a lower learning rate "
                    f"(--lr {lower}) or warm-up (--warmup-epochs)")
        return (f"the last checkpoint, of step {self._checkpoint_step}, is in {self.out}; "
                f"continue from it with a lower learning rate: sparsetrain train --resume "
                f"{self.out} --override lr={lower} (or add warm-up the same way)")

    def _log_training(self) -> float:
        """A training-metrics line of the averages since the last one, which are then reset;
        returns the average loss."""
        s = self.state
        loss = s.loss_sum / s.seen
        record = {
            "kind": "train", "step": s.step, "epoch": s.step / self.steps_per_epoch,
            "loss": loss, "accuracy": s.correct / s.seen,
            "lr": self.optimizer.param_groups[0]["lr"], "density": self.density(),
            "grad_norm": measure.gradient_norms(self.model, self.sparsifier),
            "wall_time_s": round(s.wall_time_s, 3),
        }
        self._append_metrics(record)
        if self._board is not None:
            self._board.scalars(s.step, {"train/loss": loss, "train/accuracy": record["accuracy"],
                                         "train/lr": record["lr"],
                                         "density/overall": record["density"]})
            self._board.densities(s.step, self.layer_densities())
        s.loss_sum, s.correct, s.seen = 0.0, 0, 0
        return loss

    def _stop_agreed(self) -> bool:
        """Whether to stop now: under torch.distributed all stop at the same step, or none (and
        all report the same signal)."""
        if not self.dist.active:
            return self._stop.requested
        # a signal may set the local flag during the collective: never reset it here
        if not self.dist.sum([self._stop.requested])[0]:
            return False
        signals = self.dist.gather(torch.tensor([self._stop.signum or 0]))
        self._stop.requested, self._stop.signum = True, max(int(t) for t in signals) or None
        return True

    def _check_masks_agree(self) -> None:
        """After a topology update: every process must hold the same masks (a fingerprint of
        each layer's active set is compared); a difference stops the run at once."""
        if not (self.dist.active and self.config.check_masks):
            return
        fingerprints = self.dist.gather(self.sparsifier.mask_fingerprint())
        names = self.sparsifier.names
        differ = sorted({names[i] for f in fingerprints[1:]
                         for i in (f != fingerprints[0]).any(1).nonzero().flatten().tolist()})
        if differ:
            raise TrainingError(
                f"the processes hold different masks after the update at step {self.state.step} "
                f"(layers {differ}): their sparsifiers must be built alike (same seed, same "
                f"settings) and see the same averaged gradients; the last good checkpoint is in "
                f"{self.out}")

    def _end_epoch(self, epoch: int) -> None:
        test_loss, test_acc = self.evaluate()
        self.state.best_test_accuracy = max(self.state.best_test_accuracy, test_acc)
        record = {
            "kind": "eval", "step": self.state.step, "epoch": epoch + 1,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "lr": self.optimizer.param_groups[0]["lr"], "density": self.density(),
            "ever_active": self.ever_active_fraction(),
            "layer_densities": self.layer_densities(),
            "wall_time_s": round(self.state.wall_time_s, 3),
        }
        self._append_metrics(record)
        if self._board is not None:
            sequence = self.data.kind == "sequence"
            self._board.scalars(self.state.step, {
                "eval/loss": test_loss, "eval/accuracy": test_acc,
                "eval/bits_per_byte": measure.bits(test_loss) if sequence else None,
                "density/overall": record["density"], "density/ever_active": record["ever_active"]})
        self.log(f"epoch {epoch + 1}/{self.config.trained_epochs()}: "
                 f"{self._results(test_loss, test_acc)}"
                 f", density {record['density']:.4f} of the sparsifiable weights")

    def _results(self, loss: float, accuracy: float) -> str:
        if self.data.kind == "sequence":
            return (f"validation loss {loss:.4f} nats/byte ({measure.bits(loss):.4f} bits/byte), "
                    f"next-byte accuracy {accuracy:.4f}")
        return f"test accuracy {accuracy:.4f}, test loss {loss:.4f}"

    def _finish(self) -> dict[str, Any]:
        """Evaluate, mark the run finished, write the summary and the last checkpoint."""
        s, c = self.state, self.config
        test_loss, test_acc = self.evaluate()
        s.finished = True
        summary = {
            "test_accuracy": test_acc,
            "best_test_accuracy": max(s.best_test_accuracy, test_acc),
            "test_loss": test_loss,
            "density": self.density(),
            "method": c.method,
            "model": c.model,
            "data": c.data,
            "epochs": c.trained_epochs(),  # epochs * length: those trained
            "length": c.length,
            "steps": s.step,
            "wall_time_s": round(s.wall_time_s, 3),
            "layer_densities": self.layer_densities(),
            "layer_active_counts": ({} if self.sparsifier is None
                                    else self.sparsifier.active_counts()),
            "width": self.width,
            "train_flops": s.train_flops,
            # relative to dense training of the same model and data at length 1 (3 f_D per
            # example, epochs * n_train examples): a run at length 5 costs about 5x its 1x run
            "train_flops_vs_dense": s.train_flops / (3 * self.dense_flops
                                                     * max(1, self.n_train * c.epochs)),
            "inference_flops": self.sparse_flops,
            "inference_flops_vs_dense": self.sparse_flops / self.dense_flops,
            "ever_active_fraction": self.ever_active_fraction(),
            "flops_note": "a multiply-add counts as 2 FLOPs; per example" + (
                f" (a sequence of {self.data.input_shape[0]} bytes)"
                if self.data.kind == "sequence" else "") + "; train_flops_vs_dense is relative "
            "to dense training at length 1 (epochs, not epochs * length)",
            "data_kind": self.data.kind,
            "config": c.to_dict(),
        }
        if self.data.kind == "sequence":
            summary["test_nats_per_byte"] = test_loss
            summary["test_bits_per_byte"] = measure.bits(test_loss)
        if self.data.info:
            summary["data_info"] = self.data.info
        if self.dist.is_main:
            folder.write_summary(self.out, summary)
        self.save_checkpoint()
        results = (self._results(test_loss, test_acc) if self.data.kind == "sequence" else
                   f"test accuracy {test_acc:.4f} (best {summary['best_test_accuracy']:.4f})")
        self.log(f"done: {results}, density {summary['density']:.4f} of the sparsifiable weights, "
                 f"{summary['wall_time_s']:.1f} s; results in {self.out}")
        return summary
