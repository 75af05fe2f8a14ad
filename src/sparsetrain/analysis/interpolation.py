"""The loss on the straight line between two sets of weights.

``loss_along_line(model, start, end, batches, ...)`` loads ``(1 - a) * start + a * end`` into
``model`` for each ``a`` of ``alphas`` (0 to 1, and beyond to extrapolate) and returns the mean
loss and accuracy over ``batches``; the model's own weights are restored afterwards. ``start``
and ``end`` are state dicts of the same model (for instance the weights at initialisation and
at the end of training, or the final weights of two runs): every floating-point entry is
interpolated (BatchNorm's running statistics too); scalar counters are taken from ``end``,
and any other non-floating entry must be equal in both (it is structure: a model on the CSR
backend stores its active positions so, and two CSR states with different active sets are
refused; convert them with ``st.backends.to_masked`` first). The model is evaluated in eval
mode, so BatchNorm uses the interpolated statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LinePoint:
    alpha: float
    loss: float
    accuracy: float  # nan where the targets are not class indices


def interpolate_states(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` entry by entry (non-floating entries: ``end``'s)."""
    if start.keys() != end.keys():
        missing = sorted(set(start) ^ set(end))
        raise ValueError(f"the two states hold different entries ({', '.join(missing[:5])}); "
                         "give two states of the same model")
    mixed = {}
    for name, b in end.items():
        a = start[name]
        if a.shape != b.shape:
            raise ValueError(f"{name!r} has shape {tuple(a.shape)} in one state and "
                             f"{tuple(b.shape)} in the other; give two states of the same model")
        if b.is_floating_point():
            mixed[name] = torch.lerp(a, b.to(a.dtype), alpha)
        elif b.dim() == 0 or torch.equal(a, b):
            mixed[name] = b
        else:
            raise ValueError(f"{name!r} (not floating point) differs between the two states: "
                             "they have different structure (on the CSR backend, different "
                             "active sets); interpolate dense weights: convert the model with "
                             "st.backends.to_masked first")
    return mixed


def flatten_predictions(output: torch.Tensor, target: torch.Tensor) -> Batch:
    """Sequence outputs (batch, positions, classes) as one prediction per position."""
    if output.dim() == 3 and target.dim() == 2:
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    return output, target


@torch.no_grad()
def loss_along_line(model: nn.Module, start: Mapping[str, torch.Tensor],
                    end: Mapping[str, torch.Tensor], batches: Iterable[Batch], *,
                    alphas: Sequence[float] | None = None,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> list[LinePoint]:
    """Mean loss and accuracy over ``batches`` of ``(inputs, targets)`` at each ``alpha``
    (default 0, 0.1, ..., 1) on the line from ``start`` to ``end``. ``loss_fn(outputs,
    targets)`` returns the loss summed over the batch's predictions (default: cross-entropy);
    the mean is over every prediction (one per example, or per position of a sequence)."""
    alphas = [i / 10 for i in range(11)] if alphas is None else [float(a) for a in alphas]
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    batches = list(batches)
    if not batches:
        raise ValueError("loss_along_line needs at least one batch of (inputs, targets)")
    own = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    model.eval()
    points = []
    try:
        for alpha in alphas:
            model.load_state_dict(interpolate_states(start, end, alpha))
            total, correct, count, classes = 0.0, 0, 0, True
            for x, y in batches:
                out, target = flatten_predictions(model(x), y)
                total += float(loss_fn(out, target))
                classes &= out.dim() == 2 and target.dim() == 1 and not target.is_floating_point()
                if classes:
                    correct += int((out.argmax(1) == target).sum())
                count += len(target)
            points.append(LinePoint(alpha, total / count,
                                    correct / count if classes else math.nan))
    finally:
        model.load_state_dict(own)
        model.train(training)
    return points
