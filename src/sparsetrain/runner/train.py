"""One training run: data, model, optimizer, sparsifier, the loop, metrics and checkpoints.

The run folder holds ``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one JSON
object per line: training averages every ``log_every`` steps, a test evaluation every epoch),
``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps, at every epoch end and
at the end) and ``summary.json`` when the run is finished.

Exact resume: everything random is either saved (model, optimizer, sparsifier with its
generator, torch's global RNG) or derived from the seed and the step (the order of the training
examples in an epoch, the augmentation of each batch), so a run interrupted at any step and
resumed ends with the same weights and masks, bit for bit, as one that ran straight through.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import load_dataset
from ..methods import get_method, make_sparsifier
from ..methods.dst import Static
from ..models import build_model
from ..flops import flops, training_flops_per_example
from ..pruning import prune_at_init, small_dense_width
from ..sparsity.targets import find_targets, partition
from .config import PRUNE_AT_INIT_METHODS, ConfigError, TrainConfig, save_yaml
from .distributed import Distributed

SMALL_DENSE = "small-dense"
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FORMAT = "sparsetrain-run"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device here; "
                          "use --device cpu")
    return device


def check_method(method: str) -> None:
    if method in ("dense", SMALL_DENSE) or method in PRUNE_AT_INIT_METHODS:
        return
    try:
        get_method(method)
    except ValueError as exc:
        raise ConfigError(f"{exc}; or 'dense', 'small-dense', or pruning at initialisation: "
                          f"{', '.join(PRUNE_AT_INIT_METHODS)}") from None


def _derived_seed(seed: int, *parts: int) -> int:
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``, a function of seed and epoch only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_derived_seed(seed, 1, epoch)))


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the augmentation of the batch of ``step``."""
    return torch.Generator().manual_seed(_derived_seed(seed, 2, step))


class LRSchedule:
    """Learning rate of every step: linear warm-up, then cosine, step, multi-step or constant.

    ``step`` and ``multistep`` count in epochs (``lr_step_epochs``; ``lr_milestones`` as
    fractions of training when all are <= 1, else as epochs); cosine decays to 0 at the end.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int, total_steps: int):
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
        milestones = list(config.lr_milestones)
        if milestones and all(m <= 1 for m in milestones):
            milestones = [m * config.epochs for m in milestones]
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
            return c.lr_gamma ** (step // (c.lr_step_epochs * self.steps_per_epoch))
        if c.lr_schedule == "multistep":
            return c.lr_gamma ** sum(step >= m for m in self.milestone_steps)
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.config.lr_schedule, "warmup_steps": self.warmup_steps,
                "milestone_steps": self.milestone_steps, "total_steps": self.total_steps}


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class RunState:
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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Trainer:
    """Builds a run from a ``TrainConfig`` and trains it, resuming from ``out`` if asked."""

    def __init__(self, config: TrainConfig, out: Path, *, resume: bool = False,
                 log: Callable[[str], None] | None = None,
                 distributed: Distributed | None = None):
        self.config = config
        self.out = Path(out)
        self.dist = distributed or Distributed.from_environment(config.device)
        say = log or (lambda message: print(message, flush=True))
        self.log = say if self.dist.is_main else (lambda message: None)  # rank 0 speaks
        check_method(config.method)
        self.device = self.dist.device(resolve_device(config.device))
        if config.batch_size < self.dist.world:
            raise ConfigError(f"batch_size {config.batch_size} is the total batch over all "
                              f"{self.dist.world} processes, so it must be at least that")
        self.data = load_dataset(config.data, config.data_dir, **config.data_options)
        n_train = len(self.data.train_y)
        if config.train_size is not None:
            n_train = min(n_train, config.train_size)
        self.n_train = n_train
        self.steps_per_epoch = math.ceil(n_train / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.width = self._small_dense_width() if config.method == SMALL_DENSE else config.width
        torch.manual_seed(config.seed)
        self.model = self._build(self.width)
        self.model.to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.schedule = LRSchedule(config, self.steps_per_epoch, self.total_steps)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.state = RunState()
        self._stop_requested = False
        checkpoint = self._load_checkpoint() if resume else None
        self._example = self.data.prepare(self.data.train_x[:1], train=False).to(self.device)
        # before the sparsifier: on the CSR backend it replaces the dense layers
        reference = self.model if config.method != SMALL_DENSE else self._build(config.width)
        self.dense_flops = flops(reference.to(self.device), self._example).total
        self.sparsifier = self._make_sparsifier(checkpoint)
        self.net = self.model  # what the training steps run: the model, or its DDP wrapper
        if self.dist.active:
            # after the sparsifier: it names weights as the model does, and the CSR backend
            # replaces layers, which DDP must see in their final form
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            torch.manual_seed(config.seed * 1000 + self.dist.rank)  # dropout differs per rank
        self.ever_active = {n: m.clone() for n, m in self._masks().items()}
        if checkpoint is not None:
            self._restore(checkpoint)
        self.sparse_flops = self._current_flops()

    def _build(self, width: float) -> nn.Module:
        c = self.config
        return build_model(c.model, num_classes=self.data.num_classes,
                           input_shape=tuple(self.data.input_shape), width=width)

    def _small_dense_width(self) -> float:
        """The width at which the dense model has as many weights as the sparse one keeps."""
        c = self.config
        model = self._build(c.width)
        sparse, dense = partition(model, list(c.dense_layers))
        target = round(c.density * sum(t.numel for t in sparse)) + sum(t.numel for t in dense)
        result = small_dense_width(self._build, target, low=0.01 * c.width, high=c.width)
        self.log(f"small-dense: width {result.width:.4g} has {result.params} sparsifiable "
                 f"weights (the sparse model keeps {target})")
        return result.width

    def _masks(self) -> dict[str, torch.Tensor]:
        return {} if self.sparsifier is None else self.sparsifier.masks

    def _current_flops(self) -> float:
        return flops(self.model, self._example, self._masks()).total

    def _step_flops(self) -> float:
        """Training FLOPs per example of the step just taken (RigL paper, Appendix H)."""
        c = self.config
        if self.sparsifier is None:
            return training_flops_per_example("dense", self.sparse_flops, self.sparse_flops)
        if c.method == "gmp":  # its density changes: the cost of the masks of the moment
            return 3 * self.sparse_flops
        return training_flops_per_example(c.method, self.dense_flops, self.sparse_flops,
                                          delta_t=c.delta_t)

    def ever_active_fraction(self) -> float:
        """Fraction of the sparsified weights that have been active at some point."""
        if not self.ever_active:
            return 1.0
        return (sum(int(m.sum()) for m in self.ever_active.values())
                / sum(m.numel() for m in self.ever_active.values()))

    # --- building -------------------------------------------------------------------------
    def _make_sparsifier(self, checkpoint: dict[str, Any] | None):
        c = self.config
        common = dict(density=c.density, total_steps=self.total_steps,
                      dense_layers=list(c.dense_layers), seed=c.seed, backend=c.backend)
        if c.method in ("dense", SMALL_DENSE):
            return None
        if c.method in PRUNE_AT_INIT_METHODS:
            # on resume the checkpoint holds the masks (their per-layer counts are the
            # pruning's, which a CSR layer must have before the weights are loaded)
            masks = (self._prune_at_init() if checkpoint is None
                     else self._saved_masks(checkpoint.get("sparsifier") or {}))
            return Static(self.model, self.optimizer, distribution=c.distribution, masks=masks,
                          **common)
        options: dict[str, Any] = dict(distribution=c.distribution, delta_t=c.delta_t)
        if get_method(c.method).fixed_budget:
            options.update(alpha=c.alpha, drop_fraction_decay=c.drop_fraction_decay,
                           t_end=max(1, int(c.t_end * self.total_steps)))
        options.update(c.method_options)
        try:
            return make_sparsifier(c.method, self.model, self.optimizer, **common, **options)
        except TypeError as exc:
            raise ConfigError(f"method {c.method!r} does not take these method_options: "
                              f"{exc}") from None

    def _saved_masks(self, state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The masks of a saved sparsifier state (bool masks, or CSR layers' positions)."""
        if not isinstance(state.get("masks"), dict):
            return None
        masks = dict(state["masks"])
        params = dict(self.model.named_parameters())
        for name, positions in (state.get("positions") or {}).items():
            if name not in params or not torch.is_tensor(positions):
                return None  # left to the sparsifier's own checks when it loads the state
            mask = torch.zeros(params[name].numel(), dtype=torch.bool)
            mask[positions.long()] = True
            masks[name] = mask.view(params[name].shape).to(params[name].device)
        return masks

    def _prune_at_init(self):
        c = self.config
        order = epoch_order(self.n_train, c.seed, -1)
        batches = []
        for i in range(min(c.prune_batches, self.steps_per_epoch)):
            idx = order[i * c.batch_size:(i + 1) * c.batch_size]
            x = self.data.prepare(self.data.train_x[idx], train=False)
            batches.append((x.to(self.device), self.data.train_y[idx].to(self.device)))
        iterations = c.prune_iterations or (100 if c.method == "synflow" else 1)
        start = time.perf_counter()
        masks = prune_at_init(
            self.model, c.method, c.density, data=batches, scope=c.prune_scope,
            iterations=iterations,
            distribution=c.distribution if c.prune_scope == "layer" else None,
            dense_layers=list(c.dense_layers), seed=c.seed,
        )
        self.log(f"{c.method}: pruned at initialisation to density {c.density} "
                 f"({iterations} round(s), {time.perf_counter() - start:.1f} s)")
        # every rank scored the same batches; rank 0's masks are the run's all the same
        return {n: self.dist.broadcast(m) for n, m in masks.items()}

    # --- checkpoints ----------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "config": self.config.semantic_dict(),
            "run": dataclasses.asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparsifier": None if self.sparsifier is None else self.sparsifier.state_dict(),
            "ever_active": {n: m.cpu() for n, m in self.ever_active.items()},
            "lr_schedule": self.schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0 only; the other ranks wait until it is written)."""
        if self.dist.is_main:
            _atomic_save(self._checkpoint(), self.out / CHECKPOINT)
        self.dist.barrier()

    def _load_checkpoint(self) -> dict[str, Any]:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"nothing to resume in {self.out}: it has no {CHECKPOINT}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for damaged files
            raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be "
                              "truncated or not a sparsetrain checkpoint") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a sparsetrain run checkpoint")
        saved = checkpoint.get("config", {})
        differs = sorted(k for k, v in self.config.semantic_dict().items() if saved.get(k) != v)
        if differs:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {getattr(self.config, k)!r}"
                                for k in differs)
            raise ConfigError(f"{path} is from a different configuration ({details}); resume "
                              "with the run's own settings or start a new run folder")
        return checkpoint

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        try:
            model_state = dict(checkpoint["model"])
            # a state saved from a DistributedDataParallel wrapper names weights "module.*"
            nn.modules.utils.consume_prefix_in_state_dict_if_present(model_state, "module.")
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.sparsifier is not None:
                self.sparsifier.load_state_dict(checkpoint["sparsifier"])
            run = checkpoint["run"]
            defaults = RunState()
            self.state = RunState(**{f.name: type(getattr(defaults, f.name))(run[f.name])
                                     for f in dataclasses.fields(RunState)})
            self.ever_active = {n: m.to(self.device)
                                for n, m in checkpoint.get("ever_active", {}).items()}
            torch.set_rng_state(checkpoint["torch_rng"])
            if checkpoint.get("cuda_rng") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError(f"checkpoint in {self.out} does not fit this run: {exc}") from None
        self._truncate_metrics(self.state.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop the metrics lines logged after the checkpoint (they will be logged again)."""
        path = self.out / METRICS
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        path.write_text("".join(k + "\n" for k in kept))

    # --- measuring ------------------------------------------------------------------------
    def layer_densities(self) -> dict[str, float]:
        if self.sparsifier is None:
            return {t.name: 1.0 for t in find_targets(self.model)}
        return self.sparsifier.layer_densities()

    def density(self) -> float:
        """Fraction of the sparsifiable weights that are active (dense layers count fully)."""
        sizes = {n: p.numel() for n, p in self.model.named_parameters()}
        if self.sparsifier is not None:  # CSR layers have no dense weight parameter
            backend = self.sparsifier.backend
            sizes.update({n: backend.numel(n) for n in backend.names})
        densities = self.layer_densities()
        total = sum(sizes[n] for n in densities)
        return sum(d * sizes[n] for n, d in densities.items()) / total

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy."""
        self.model.eval()
        n = len(self.data.test_y)
        share = self.dist.share(n)  # each process evaluates its share; the sums are added
        correct, loss_sum = 0, 0.0
        for i in range(share.start, share.stop, 1000):
            j = min(i + 1000, share.stop)
            x = self.data.prepare(self.data.test_x[i:j], train=False).to(self.device)
            y = self.data.test_y[i:j].to(self.device)
            out = self.model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        self.model.train()
        loss_sum, correct = self.dist.sum([loss_sum, correct])
        return loss_sum / n, correct / n

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- training -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current step, with a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True

    @contextmanager
    def _interrupt_handler(self):
        """Ctrl-C finishes the current step and checkpoints; a second Ctrl-C stops at once."""
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self._stop_requested:
                    signal.signal(signal.SIGINT, previous)
                    raise KeyboardInterrupt
                self._stop_requested = True
                self.log("\ninterrupted: finishing this step and writing a checkpoint "
                         "(Ctrl-C again to stop at once)")

            signal.signal(signal.SIGINT, handler)
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, previous)
        else:
            yield

    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> dict[str, Any] | None:
        """Train to the end; return the summary, or ``None`` if stopped early (checkpointed)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            save_yaml(self.config, self.out / CONFIG)
        if self.state.finished:
            self.log(f"{self.out} is already finished; nothing to do")
            if (self.out / SUMMARY).is_file():
                return json.loads((self.out / SUMMARY).read_text())
            return self._finish()  # the summary was lost: write it again from the final state
        with self._interrupt_handler():
            stopped = self._loop(on_step)
        if stopped:
            self.save_checkpoint()
            self.log(f"stopped at step {self.state.step} of {self.total_steps}; checkpoint "
                     f"written, continue with: sparsetrain train --resume {self.out}")
            return None
        return self._finish()

    def _loop(self, on_step) -> bool:
        c = self.config
        progress = _progress_bar(c.progress and self.dist.is_main)
        s = self.state
        start = time.perf_counter() - self.state.wall_time_s
        while self.state.step < self.total_steps:
            epoch, offset = divmod(self.state.step, self.steps_per_epoch)
            order = epoch_order(self.n_train, c.seed, epoch)
            bar = progress(total=self.steps_per_epoch, initial=offset,
                           desc=f"epoch {epoch + 1}/{c.epochs}")
            for i in range(offset, self.steps_per_epoch):
                idx = order[i * c.batch_size:(i + 1) * c.batch_size]
                # the whole step's batch, prepared alike everywhere; this process's share
                x = self.data.prepare(self.data.train_x[idx], train=True, augment=c.augment,
                                      generator=batch_generator(c.seed, self.state.step))
                share = self.dist.share(len(idx))
                x, y = x[share].to(self.device), self.data.train_y[idx][share].to(self.device)
                lr = c.lr * self.schedule.factor(self.state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                out = self.net(x)
                loss = self.loss_fn(out, y)
                # the whole batch's loss and accuracy, and whether every share's loss is finite
                loss_sum, correct, bad = self.dist.sum([
                    float(loss.detach()) * len(y), int((out.argmax(1) == y).sum()),
                    0.0 if torch.isfinite(loss) else 1.0])
                if bad:
                    bar.close()
                    raise TrainingError(
                        f"the training loss became {float(loss.detach())} at step "
                        f"{self.state.step + 1} (epoch {epoch + 1}); lower the learning rate "
                        f"(now {lr:.4g}) or add warm-up (--warmup-epochs); the last good "
                        f"checkpoint is in {self.out}")
                # DDP averages the shares' gradients: weighting each share's mean loss by its
                # size makes that average the gradient of the whole batch's mean loss
                (loss * (len(y) * self.dist.world / len(idx))).backward()
                (self.sparsifier or self.optimizer).step()
                self.state.step += 1
                s.train_flops += self._step_flops() * len(idx)
                s.examples += len(idx)
                if self.sparsifier is not None and self.sparsifier.is_update_step(s.step):
                    self._check_masks_agree()
                    self.sparse_flops = self._current_flops()
                    for name, mask in self.sparsifier.masks.items():
                        self.ever_active[name] |= mask
                s.loss_sum += loss_sum
                s.correct += int(correct)
                s.seen += len(idx)
                self.state.wall_time_s = time.perf_counter() - start
                bar.update(1)
                if self.state.step % c.log_every == 0:
                    self._append_metrics({
                        "kind": "train", "step": self.state.step,
                        "epoch": self.state.step / self.steps_per_epoch,
                        "loss": s.loss_sum / s.seen, "accuracy": s.correct / s.seen,
                        "lr": lr, "density": self.density(),
                        "wall_time_s": round(self.state.wall_time_s, 3),
                    })
                    bar.set_postfix(loss=f"{s.loss_sum / s.seen:.3f}")
                    s.loss_sum, s.correct, s.seen = 0.0, 0, 0
                if on_step is not None:
                    on_step(self)
                epoch_end = i == self.steps_per_epoch - 1
                if epoch_end:
                    self._end_epoch(epoch)
                if self.dist.active:  # all stop at the same step, or none does
                    self._stop_requested = bool(self.dist.sum([self._stop_requested])[0])
                if self._stop_requested and self.state.step < self.total_steps:
                    bar.close()
                    return True
                if epoch_end or (c.checkpoint_every and self.state.step % c.checkpoint_every == 0):
                    self.save_checkpoint()
            bar.close()
        return False

    def _check_masks_agree(self) -> None:
        """After a topology update: every process must hold the same masks (a fingerprint of
        each layer's active set is compared); a difference stops the run at once."""
        if not (self.dist.active and self.config.check_masks):
            return
        fingerprints = self.dist.gather(self.sparsifier.mask_fingerprint())
        names = self.sparsifier.backend.names
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
            "wall_time_s": round(self.state.wall_time_s, 3),
        }
        self._append_metrics(record)
        self.log(f"epoch {epoch + 1}/{self.config.epochs}: test accuracy {test_acc:.4f}, "
                 f"test loss {test_loss:.4f}, density {record['density']:.4f}")

    def _finish(self) -> dict[str, Any]:
        s = self.state
        test_loss, test_acc = self.evaluate()
        self.state.finished = True
        summary = {
            "test_accuracy": test_acc,
            "best_test_accuracy": max(self.state.best_test_accuracy, test_acc),
            "test_loss": test_loss,
            "density": self.density(),
            "method": self.config.method,
            "model": self.config.model,
            "data": self.config.data,
            "epochs": self.config.epochs,
            "steps": self.state.step,
            "wall_time_s": round(self.state.wall_time_s, 3),
            "layer_densities": self.layer_densities(),
            "width": self.width,
            "train_flops": s.train_flops,
            "train_flops_vs_dense": s.train_flops / (3 * self.dense_flops * max(1, s.examples)),
            "inference_flops": self.sparse_flops,
            "inference_flops_vs_dense": self.sparse_flops / self.dense_flops,
            "ever_active_fraction": self.ever_active_fraction(),
            "flops_note": "a multiply-add counts as 2 FLOPs; per example",
            "config": self.config.to_dict(),
        }
        if self.dist.is_main:
            _write_json(summary, self.out / SUMMARY)
        self.save_checkpoint()
        self.log(f"done: test accuracy {test_acc:.4f} (best {summary['best_test_accuracy']:.4f})"
                 f", density {summary['density']:.4f}, {summary['wall_time_s']:.1f} s; "
                 f"results in {self.out}")
        return summary


class _NoBar:
    def __init__(self, **_: Any):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return _NoBar
    from tqdm import tqdm

    def make(**kwargs):
        return tqdm(leave=False, dynamic_ncols=True, **kwargs)

    return make


def run_folder(config: TrainConfig) -> Path:
    """Where a run writes: ``out`` if given, else ``runs_dir / config.run_name()``."""
    return Path(config.out) if config.out else Path(config.runs_dir) / config.run_name()
