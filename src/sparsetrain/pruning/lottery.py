"""Lottery tickets: iterative magnitude pruning with rewinding to step k.

``shared/spec/algorithms.md``, "Dense-to-sparse baselines": train, prune a fraction ``p`` of the
*remaining* weights by ``|W|``, rewind the kept weights to their values at step ``k`` of the
first training run, repeat ("The Lottery Ticket Hypothesis", Frankle & Carbin 2019, with
``k = 0``; "Linear Mode Connectivity and the Lottery Ticket Hypothesis", Frankle et al. 2020,
for ``k > 0``).

``LotteryTicket`` keeps the state between rounds (the current masks, the weights at step ``k``,
the history of every round) and leaves the training to the caller, so a command-line tool can
drive it round by round and stop and resume between rounds::

    ticket = st.LotteryTicket(model, rounds=5, prune_fraction=0.2, rewind_step=k)
    for r in ticket.rounds_iter():
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = st.Static(model, opt, density=ticket.density, total_steps=T,
                               masks=ticket.masks)
        for step in range(ticket.start_step, T):      # 0 in round 0, k afterwards
            ...                                       # forward, backward
            sparsifier.step()
            ticket.observe_step(step + 1)             # keeps the weights after k steps
        ticket.end_round(accuracy=evaluate(model))    # prune, then rewind to step k

Round 0 trains the dense network; round ``r`` trains the ticket left after ``r`` prunings, at a
density of about ``(1 - p) ** r``. ``rounds`` is the number of prunings, so there are
``rounds + 1`` training runs; the last one trains the final ticket and its ``end_round`` only
records it (the model keeps its trained weights).

What rewinding restores: every tensor of ``model.state_dict()`` at step ``k``, parameters and
buffers alike (BatchNorm running statistics too), so round ``r`` starts from exactly the network
the first run had after ``k`` steps, with the pruned weights zero. The optimizer is not part of
it: build a fresh one for every round, and for ``k > 0`` resume the learning-rate schedule at
step ``k`` (``start_step``) and train to the same final step as round 0.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..methods.dst import Static
from ..sparsity.masks import validate_masks
from ..sparsity.permutation import PRUNE, RandomOrder
from ..sparsity.positions import mask_of
from ..sparsity.selection import order_keys, select_global, top_k_mask
from ..sparsity.targets import Target, partition

SCOPES = ("global", "layer")
_STATE_KIND = "lottery_ticket"


@dataclass(frozen=True)
class LotteryRound:
    """What one round of a ``LotteryTicket`` trained and how well.

    ``round``: its index (0 is the dense network); ``masks``: name -> bool mask (on the CPU) of
    every sparsified weight during that round; ``active`` and ``total``: the active and all
    sparsified weights; ``density``: ``active / total``; ``accuracy``: what the caller passed to
    ``end_round`` (``None`` if nothing).
    """

    round: int
    density: float
    active: int
    total: int
    masks: dict[str, torch.Tensor]
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain values and tensors (loadable with ``weights_only=True``)."""
        return {
            "round": self.round,
            "density": self.density,
            "active": self.active,
            "total": self.total,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "accuracy": self.accuracy,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "LotteryRound":
        """The inverse of ``to_dict``."""
        accuracy = record.get("accuracy")
        return cls(
            round=int(record["round"]),
            density=float(record["density"]),
            active=int(record["active"]),
            total=int(record["total"]),
            masks={str(n): m.detach().to("cpu", torch.bool).clone()
                   for n, m in record["masks"].items()},
            accuracy=None if accuracy is None else float(accuracy),
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_prune_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        0.0 < float(value) < 1.0
    ):
        raise ValueError(
            "prune_fraction must be a number strictly between 0 and 1 (the fraction of the "
            f"remaining weights removed each round, e.g. 0.2), got {value!r}"
        )
    return float(value)


def keep_count(active: int, prune_fraction: float) -> int:
    """Weights kept when ``prune_fraction`` of ``active`` weights are pruned: at least one.

    ``round(active * (1 - prune_fraction))`` (Python's rounding, as ``active_count``), at least
    one and at most ``active``.
    """
    return min(active, max(1, round(active * (1.0 - prune_fraction))))


class LotteryTicket:
    """Iterative magnitude pruning with rewinding, driven round by round by the caller.

    ``model``: the network, at its initial weights. Arguments (keywords): ``rounds`` the number
    of prunings (a positive integer; there are ``rounds + 1`` training runs, the first dense);
    ``prune_fraction`` the fraction of the remaining weights removed at each pruning, strictly
    between 0 and 1 (0.2 by default, the paper's rate for fully connected layers);
    ``rewind_step`` the step ``k`` whose weights every later round starts from (0, the default:
    the initial weights, captured here); ``scope`` ``"global"`` (default: the smallest ``|W|``
    over all sparsified weights at once) or ``"layer"`` (the same fraction in every layer);
    ``dense_layers`` names or glob patterns of weights never pruned (pass the same to the
    sparsifier); ``seed`` for breaking ties between equal magnitudes at random.

    Exact counts: with ``scope="layer"`` a layer with ``n`` active weights keeps
    ``keep_count(n, p) = max(1, round(n * (1 - p)))``; with ``scope="global"`` the ``R`` active
    weights over all layers become exactly ``max(L, round(R * (1 - p)))`` for ``L`` sparsified
    weights, the largest ``|W|``, every layer keeping at least one (a layer that would lose all
    keeps its largest weight, out of the same budget). A pruned weight is never active again.

    Each round: train from ``masks`` (e.g. ``st.Static(model, opt, density=ticket.density,
    masks=ticket.masks, ...)``), calling ``observe_step(t)`` after the ``t``-th optimizer step
    (or ``capture_rewind_point()`` once, after step ``k`` of round 0), then
    ``end_round(accuracy=...)``. ``history`` keeps every finished round's masks and accuracy;
    ``state_dict()`` and ``load_state_dict()`` carry everything between processes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int,
        prune_fraction: float = 0.2,
        rewind_step: int = 0,
        scope: str = "global",
        dense_layers: Iterable[str] | str = (),
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.rounds = _positive_int(rounds, "rounds")
        self.prune_fraction = _check_prune_fraction(prune_fraction)
        self.rewind_step = _non_negative_int(rewind_step, "rewind_step")
        if scope not in SCOPES:
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.scope = scope
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.dense_layers = (
            (dense_layers,) if isinstance(dense_layers, str) else tuple(dense_layers)
        )
        self.model = model
        sparse, dense = partition(model, self.dense_layers)
        self._targets: list[Target] = sparse
        self._dense_names = [t.name for t in dense]
        self._masks = {
            t.name: torch.ones(t.shape, dtype=torch.bool, device=t.param.device) for t in sparse
        }
        self._history: list[LotteryRound] = []
        self._rewind_point: dict[str, torch.Tensor] | None = None
        if self.rewind_step == 0:
            self.capture_rewind_point()

    # --- where the run stands -------------------------------------------------------------
    @property
    def round(self) -> int:
        """Index of the round being trained (``rounds + 1`` once all are done)."""
        return len(self._history)

    @property
    def done(self) -> bool:
        """Whether all ``rounds + 1`` rounds have ended."""
        return self.round > self.rounds

    @property
    def start_step(self) -> int:
        """The step the current round's training starts at: 0 in round 0, then ``rewind_step``.

        After a rewind the model holds the weights of step ``rewind_step``, so the training
        (and its learning-rate schedule) continues from there.
        """
        return 0 if self.round == 0 else self.rewind_step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Name -> bool mask of every sparsified weight for the current round (a copy).

        All ones in round 0. Weights kept dense by ``dense_layers`` have no mask, as for the
        sparsifiers, so the dict can be passed as ``masks=`` to one built with the same
        ``dense_layers``.
        """
        return {n: m.clone() for n, m in self._masks.items()}

    @property
    def active(self) -> int:
        """Active sparsified weights in the current round."""
        return sum(int(m.sum()) for m in self._masks.values())

    @property
    def total(self) -> int:
        """All sparsified weights (those with a mask)."""
        return sum(t.numel for t in self._targets)

    @property
    def density(self) -> float:
        """Active over all sparsified weights in the current round (1.0 in round 0)."""
        return self.active / self.total

    def layer_densities(self) -> dict[str, float]:
        """Current density of every sparsified weight, and 1.0 for those kept dense."""
        result = {n: float(m.sum()) / m.numel() for n, m in self._masks.items()}
        result.update({n: 1.0 for n in self._dense_names})
        return result

    @property
    def history(self) -> list[LotteryRound]:
        """One ``LotteryRound`` per finished round, in order."""
        return list(self._history)

    @property
    def has_rewind_point(self) -> bool:
        """Whether the weights of step ``rewind_step`` have been captured."""
        return self._rewind_point is not None

    def rounds_iter(self) -> Iterator[int]:
        """The indices of the rounds still to train, from the current one.

        Call ``end_round`` before asking for the next index; forgetting it raises
        ``RuntimeError`` rather than training the same round again.
        """
        while not self.done:
            current = self.round
            yield current
            if self.round == current:
                raise RuntimeError(
                    f"round {current} has not ended: call end_round() at the end of each round"
                )

    # --- the rewind point -----------------------------------------------------------------
    def capture_rewind_point(self) -> None:
        """Keep a copy (on the CPU) of every tensor of ``model.state_dict()`` as the rewind point.

        Called by the constructor when ``rewind_step`` is 0 and by ``observe_step`` after step
        ``rewind_step`` of round 0; call it yourself at that moment if you do not use
        ``observe_step``. Only round 0 may capture: later rounds rewind to it.
        """
        if self.round > 0:
            raise RuntimeError(
                "the rewind point is taken in round 0 (the dense run) only; this ticket is in "
                f"round {self.round}"
            )
        self._rewind_point = {
            key: value.detach().to("cpu", copy=True)
            for key, value in self.model.state_dict().items()
            if torch.is_tensor(value)
        }

    def observe_step(self, step: int) -> bool:
        """Report that ``step`` optimizer steps of the current round are done.

        Captures the rewind point when ``step == rewind_step`` in round 0 (once); returns
        whether it did. Cheap otherwise, so it can be called after every step of every round.
        """
        step = _non_negative_int(step, "step")
        if self.round == 0 and step == self.rewind_step and self._rewind_point is None:
            self.capture_rewind_point()
            return True
        return False

    def _require_rewind_point(self) -> None:
        if self._rewind_point is None:
            raise RuntimeError(
                f"no rewind point: rewind_step={self.rewind_step}, but the weights after that "
                "many steps of round 0 were never captured. Call observe_step(t) after every "
                "optimizer step of round 0 (t counting from 1), or capture_rewind_point() right "
                f"after step {self.rewind_step}"
            )

    @torch.no_grad()
    def rewind(self) -> None:
        """Set the model to the rewind point, with the weights pruned so far at zero.

        ``end_round`` does this itself. A program resuming between rounds from a
        ``state_dict()`` may call it on a freshly built model instead of saving the weights.
        """
        self._require_rewind_point()
        current = {k: v for k, v in self.model.state_dict().items() if torch.is_tensor(v)}
        if set(current) != set(self._rewind_point):
            missing = sorted(set(current) - set(self._rewind_point))
            unknown = sorted(set(self._rewind_point) - set(current))
            raise ValueError(
                "the model's state_dict does not match the rewind point; keys missing from the "
                f"rewind point: {missing}, keys the model lacks: {unknown}"
            )
        for key, tensor in current.items():
            saved = self._rewind_point[key]
            if tuple(saved.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{key!r} has shape {tuple(tensor.shape)} in the model but "
                    f"{tuple(saved.shape)} at the rewind point"
                )
            tensor.copy_(saved)
        for t in self._targets:
            # selecting, not multiplying: a NaN or inf outside the mask becomes 0 too
            keep = self._masks[t.name].to(device=t.param.device, dtype=torch.bool)
            t.param.masked_fill_(~keep, 0)

    # --- the end of a round ---------------------------------------------------------------
    def end_round(self, accuracy: float | None = None) -> LotteryRound:
        """Record the round just trained; then, unless it was the last, prune and rewind.

        Records the round's masks and ``accuracy`` (a number, or ``None``) in ``history``.
        Except after the last round, it then prunes ``prune_fraction`` of the remaining weights
        of smallest ``|W|`` (the trained weights now in the model), and rewinds the model to
        step ``rewind_step`` with the pruned weights zero. After the last round the model keeps
        its trained weights. Returns the round's record.
        """
        if self.done:
            raise RuntimeError(f"all {self.rounds + 1} rounds have already ended")
        if accuracy is not None and (
            isinstance(accuracy, bool) or not isinstance(accuracy, numbers.Real)
        ):
            raise ValueError(f"accuracy must be a number or None, got {accuracy!r}")
        if self.round < self.rounds:
            self._require_rewind_point()
        record = LotteryRound(
            round=self.round,
            density=self.density,
            active=self.active,
            total=self.total,
            masks={n: m.detach().to("cpu", copy=True) for n, m in self._masks.items()},
            accuracy=None if accuracy is None else float(accuracy),
        )
        if self.round < self.rounds:
            new_masks = self._prune()
            self._history.append(record)
            self._masks = new_masks
            self.rewind()
        else:
            self._history.append(record)
        return record

    def _prune(self) -> dict[str, torch.Tensor]:
        """The next masks: ``prune_fraction`` of the active weights of smallest ``|W|`` removed."""
        scores = {}
        for t in self._targets:
            mask = self._masks[t.name].to(t.param.device)
            magnitude = t.param.detach().abs().to(torch.float64)
            if not bool(torch.isfinite(magnitude[mask]).all()):
                raise ValueError(
                    f"weight {t.name!r} has NaN or infinite values after training; it cannot be "
                    "pruned by magnitude. Lower the learning rate or clip gradients"
                )
            scores[t.name] = magnitude.masked_fill(~mask, -math.inf)  # pruned stay pruned
        round_number = len(self._history)
        if self.scope == "layer":
            return {
                n: top_k_mask(s, keep_count(int(self._masks[n].sum()), self.prune_fraction),
                              order_keys(RandomOrder(s.numel(), PRUNE, self.seed,
                                                     round_number, i)))
                for i, (n, s) in enumerate(scores.items())
            }
        n_keep = max(len(scores), round(self.active * (1.0 - self.prune_fraction)))
        return select_global(scores, min(n_keep, self.active), self.seed, round_number,
                             stacklevel=4)

    # --- checkpointing --------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "prune_fraction": self.prune_fraction,
            "rewind_step": self.rewind_step,
            "scope": self.scope,
            "dense_layers": list(self.dense_layers),
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The current masks, the rewind point and the history.

        Holds only tensors, numbers, strings, ``None``, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``. The model's weights are not in it: save them
        separately, or after a finished round call ``rewind()`` on the fresh model.
        """
        return {
            "kind": _STATE_KIND,
            "config": self._config(),
            "masks": {n: m.detach().to("cpu", copy=True) for n, m in self._masks.items()},
            "rewind_point": None if self._rewind_point is None else {
                k: v.clone() for k, v in self._rewind_point.items()
            },
            "history": [record.to_dict() for record in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the model's weights are restored separately.

        Settings that differ from the saved run's are kept as this ticket's, with a warning.
        """
        if not isinstance(state, Mapping) or state.get("kind") != _STATE_KIND:
            raise ValueError(
                "not a sparsetrain LotteryTicket state_dict (expected kind 'lottery_ticket')"
            )
        history = [LotteryRound.from_dict(record) for record in state["history"]]
        if len(history) > self.rounds + 1:
            raise ValueError(
                f"the saved run has {len(history)} finished rounds, more than this ticket's "
                f"rounds + 1 = {self.rounds + 1}"
            )
        active = validate_masks(state["masks"], {t.name: t.shape for t in self._targets}, None)
        masks = {t.name: mask_of(active[t.name], t.shape, t.param.device) for t in self._targets}
        rewind_point = state.get("rewind_point")
        changed = sorted(
            k for k, v in state.get("config", {}).items() if self._config().get(k) != v
        )
        if changed:
            warnings.warn(
                f"LotteryTicket.load_state_dict: the saved run had other settings for {changed}; "
                "continuing with this ticket's settings",
                stacklevel=2,
            )
        self._history = history
        self._masks = masks
        self._rewind_point = None if rewind_point is None else {
            str(k): v.detach().to("cpu", copy=True) for k, v in rewind_point.items()
        }

    def __repr__(self) -> str:
        return (
            f"LotteryTicket(round={self.round}/{self.rounds}, density={self.density:.4f}, "
            f"prune_fraction={self.prune_fraction}, rewind_step={self.rewind_step}, "
            f"scope={self.scope!r})"
        )


def run_lottery_ticket(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    train_fn: Callable[..., float | None],
    *,
    rounds: int,
    total_steps: int,
    prune_fraction: float = 0.2,
    rewind_step: int = 0,
    scope: str = "global",
    dense_layers: Iterable[str] | str = (),
    seed: int = 0,
) -> LotteryTicket:
    """Run all ``rounds + 1`` rounds of a ``LotteryTicket`` with one training function.

    Each round builds ``optimizer = make_optimizer(model)`` and a ``st.Static`` sparsifier on
    the round's masks, then calls ``train_fn(model, optimizer, sparsifier, start_step,
    on_step)``, which trains from step ``start_step`` (0 in round 0, ``rewind_step`` later) to
    step ``total_steps``, calling ``sparsifier.step()`` in place of ``optimizer.step()`` and
    ``on_step(t)`` after the ``t``-th step, and returns the accuracy (or ``None``). Returns the
    finished ticket: ``ticket.history`` has every round's masks and accuracy, and the model
    holds the final ticket's trained weights.
    """
    total_steps = _positive_int(total_steps, "total_steps")
    rewind_step = _non_negative_int(rewind_step, "rewind_step")
    if rewind_step >= total_steps:
        raise ValueError(
            f"rewind_step ({rewind_step}) must be before total_steps ({total_steps}): later "
            "rounds train from rewind_step to total_steps"
        )
    if not callable(make_optimizer) or not callable(train_fn):
        raise ValueError("make_optimizer and train_fn must be callables")
    ticket = LotteryTicket(
        model, rounds=rounds, prune_fraction=prune_fraction, rewind_step=rewind_step,
        scope=scope, dense_layers=dense_layers, seed=seed,
    )
    for _ in ticket.rounds_iter():
        optimizer = make_optimizer(model)
        sparsifier = Static(
            model, optimizer, density=ticket.density, total_steps=total_steps,
            masks=ticket.masks, dense_layers=ticket.dense_layers, seed=seed,
        )
        accuracy = train_fn(model, optimizer, sparsifier, ticket.start_step, ticket.observe_step)
        ticket.end_round(accuracy=accuracy)
    return ticket
