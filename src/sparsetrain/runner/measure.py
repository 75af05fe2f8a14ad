"""What a run measures of its model: test loss and accuracy, densities, FLOPs, exploration.

``sparsifier`` is ``None`` for runs without one (dense and small-dense training), whose
sparsifiable weights all count as active.

Loss and accuracy are per prediction: one per example for a classifier, one per position for a
sequence model (outputs ``(batch, positions, classes)``, targets ``(batch, positions)``), so on
byte-level text the loss is in nats per byte and the accuracy is that of the next byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..analysis.interpolation import flatten_predictions as flat_predictions
from ..data import Dataset
from ..flops import dense_training_flops, flops
from ..sparsity.targets import find_targets
from .distributed import Distributed

#: Examples per evaluation batch, and at most this many predictions (sequence positions).
EVAL_BATCH = 1000
EVAL_PREDICTIONS = 1 << 15


def bits(nats: float) -> float:
    """A loss in nats as bits (nats / ln 2)."""
    return nats / math.log(2)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, dist: Distributed,
             device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy per prediction over the whole test set, in eval mode (train mode
    after). Each process evaluates its share; the sums are added over the processes."""
    model.eval()
    n = len(data.test_y)
    per_example = math.prod(data.test_y.shape[1:])
    batch = max(1, min(EVAL_BATCH, EVAL_PREDICTIONS // per_example))
    share = dist.share(n)
    correct, loss_sum = 0, 0.0
    for i in range(share.start, share.stop, batch):
        j = min(i + batch, share.stop)
        x = data.prepare(data.test_x[i:j], train=False).to(device)
        out, y = flat_predictions(model(x), data.prepare_targets(data.test_y[i:j]).to(device))
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train()
    loss_sum, correct = dist.sum([loss_sum, correct])
    return loss_sum / (n * per_example), correct / (n * per_example)


def layer_densities(model: nn.Module, sparsifier: Any | None) -> dict[str, float]:
    """The density of every sparsifiable weight by name."""
    if sparsifier is None:
        return {t.name: 1.0 for t in find_targets(model)}
    return sparsifier.layer_densities()


def gradient_norms(model: nn.Module, sparsifier: Any | None) -> dict[str, float]:
    """The 2-norm of the gradient each sparsifiable weight now holds, at its active positions
    (a weight kept dense: all of it), and ``"overall"`` over all of them: the gradient flow of
    the last step."""
    sparse = set(sparsifier.backend.names) if sparsifier is not None else set()
    norms = {}
    for t in find_targets(model):
        if t.name in sparse:
            grad = sparsifier.backend.active_gradient(t.name)
        else:
            grad = t.param.grad
        norms[t.name] = 0.0 if grad is None else float(grad.detach().double().norm())
    for name in sparse - set(norms):  # CSR layers, whose weight is no parameter of the model
        norms[name] = float(sparsifier.backend.active_gradient(name).detach().double().norm())
    norms["overall"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def density(model: nn.Module, sparsifier: Any | None) -> float:
    """Fraction of the sparsifiable weights that are active (dense layers count fully)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    if sparsifier is not None:  # the CSR backend's weights have no dense parameter
        sizes.update({n: sparsifier.numel(n) for n in sparsifier.names})
    densities = layer_densities(model, sparsifier)
    total = sum(sizes[n] for n in densities)
    return sum(d * sizes[n] for n, d in densities.items()) / total


def inference_flops(model: nn.Module, example: torch.Tensor, sparsifier: Any | None) -> float:
    """FLOPs of the forward pass of one ``example`` with the current active sets."""
    return flops(model, example, {} if sparsifier is None else sparsifier.forward_counts()).total


def step_training_flops(sparsifier: Any | None, dense_flops: float, sparse_flops: float) -> float:
    """Training FLOPs per example of one step (RigL paper, Appendix H): the method's own rule,
    with ``sparse_flops`` the forward cost with the active sets of the moment."""
    if sparsifier is None:
        return dense_training_flops(sparse_flops)
    return sparsifier.training_flops_per_example(dense_flops, sparse_flops)


def ever_active_fraction(sparsifier: Any | None) -> float:
    """Fraction of the sparsified weights that have been active at some point."""
    return 1.0 if sparsifier is None else sparsifier.ever_active_fraction()
