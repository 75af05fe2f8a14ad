"""Saliency scores for pruning at initialisation: Random, Magnitude, SNIP, GraSP, SynFlow.

``shared/spec/algorithms.md``, "Pruning at initialisation". Every function here returns a dict
parameter name -> score tensor of the weight's shape, for every sparsifiable weight of the model
(``find_targets``), where a *higher* score means *keep*:

- ``random``: uniform random numbers from a seeded generator.
- ``magnitude``: ``|W|``.
- ``snip`` (Lee et al. 2019): ``|g * W|``, ``g`` the gradient of the loss on ``data``.
- ``grasp`` (Wang et al. 2020): the paper's score is ``S = -W * Hg``, with ``g`` the gradient of
  the loss and ``Hg`` the Hessian-gradient product (double backpropagation, restricted to the
  sparsifiable weights as in the authors' code); the weights with the *largest* ``S`` are
  removed, so the keep-score returned is ``-S = W * Hg``. The logits are divided by
  ``temperature`` (200) in both passes, and ``samples_per_class`` (10) examples of each class
  are drawn from ``data`` and split into two halves in class order, as the authors' code does.
- ``synflow`` (Tanaka et al. 2020): every parameter and buffer replaced by its absolute value,
  an all-ones input in double precision, ``R = sum(model(ones))``; score ``|W * dR/dW|``. No data:
  the input's shape is ``input_shape``, else that of ``data``'s first batch, else
  ``(in_features,)`` when the model's first layer with a sparsifiable weight (in
  ``model.modules()`` order) is an ``nn.Linear``.

Scores are computed on a deep copy of the model, so its weights, buffers (BatchNorm statistics),
gradients and train/eval mode are untouched. ``masks`` (name -> bool tensor) zero the pruned
weights of the copy first, which is how iterative pruning rescores the surviving network.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..sparsity.targets import Target, find_targets

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

# Modules through which SynFlow's all-ones input and linearised network are meaningless or
# impossible: integer inputs, recurrent gating and attention's softmax.
_SYNFLOW_UNSUPPORTED = (nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention,
                        nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _targets(model: nn.Module) -> list[Target]:
    targets = find_targets(model)
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no weight that sparsetrain can prune "
            "(Linear, Conv, Embedding, RNN/LSTM/GRU or MultiheadAttention weights)"
        )
    return targets


def _scoring_copy(model: nn.Module, masks: Mapping[str, torch.Tensor] | None,
                  train: bool) -> tuple[nn.Module, list[Target]]:
    """A deep copy of ``model`` in the given mode, pruned weights zeroed, no gradients."""
    clone = copy.deepcopy(model)
    clone.train(train)
    for p in clone.parameters():
        p.grad = None
        p.requires_grad_(True)
    targets = find_targets(clone)
    if masks:
        with torch.no_grad():
            for t in targets:
                if t.name in masks:
                    t.param.masked_fill_(~masks[t.name].to(t.param.device, torch.bool), 0)
    return clone, targets


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(data: Iterable | None, method: str) -> list[Batch]:
    """``data`` as a list of (inputs, targets) batches; a clear error when there is none."""
    if data is None:
        raise ValueError(
            f"pruning method {method!r} needs data: pass data=an iterable of (inputs, targets) "
            "batches, e.g. a few batches of the training set"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}"
        ) from None
    batches = []
    for i, batch in enumerate(iterator):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not (
            torch.is_tensor(batch[0]) and torch.is_tensor(batch[1])
        ):
            raise ValueError(
                f"data must yield (inputs, targets) pairs of tensors; item {i} is "
                f"{type(batch).__name__}"
            )
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ValueError(f"data yielded no batch; pruning method {method!r} needs at least one")
    return batches


def _loss(loss_fn: LossFn | None) -> LossFn:
    return nn.functional.cross_entropy if loss_fn is None else loss_fn


def _check_finite(scores: Mapping[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    for name, score in scores.items():
        if not bool(torch.isfinite(score).all()):
            raise ValueError(
                f"{method} scores of weight {name!r} contain NaN or infinite values; check the "
                "model's initialisation and the scoring data (for GraSP a lower temperature, "
                "for SynFlow fewer or smaller layers, may help)"
            )
    return dict(scores)


def _accumulated_gradients(model: nn.Module, targets: list[Target], batches: list[Batch],
                           loss_fn: LossFn, temperature: float = 1.0) -> list[torch.Tensor]:
    """Sum over batches of the gradient of the loss (mean over each batch) w.r.t. the targets."""
    device = _device(model)
    params = [t.param for t in targets]
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x.to(device)) / temperature, y.to(device))
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g)
    return total


def random_scores(model: nn.Module, data=None, *, loss_fn: LossFn | None = None, seed: int = 0,
                  masks=None) -> dict[str, torch.Tensor]:
    """Uniform random scores in [0, 1) from a CPU generator seeded with ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    generator = torch.Generator().manual_seed(int(seed))
    scores = {}
    for t in _targets(model):
        score = torch.rand(t.shape, generator=generator).to(t.param.device)
        if masks and t.name in masks:
            score.masked_fill_(~masks[t.name].to(score.device, torch.bool), 0)
        scores[t.name] = score
    return scores


def magnitude_scores(model: nn.Module, data=None, *, loss_fn: LossFn | None = None,
                     masks=None) -> dict[str, torch.Tensor]:
    """``|W|``."""
    targets = _targets(model)
    scores = {}
    for t in targets:
        w = t.param.detach().abs().clone()
        if masks and t.name in masks:
            w.masked_fill_(~masks[t.name].to(w.device, torch.bool), 0)
        scores[t.name] = w
    return _check_finite(scores, "magnitude")


def snip_scores(model: nn.Module, data=None, *, loss_fn: LossFn | None = None, masks=None,
                train: bool = True) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|g * W|`` (gradient summed over the batches of ``data``)."""
    _targets(model)
    batches = _batches(data, "snip")
    clone, targets = _scoring_copy(model, masks, train)
    grads = _accumulated_gradients(clone, targets, batches, _loss(loss_fn))
    scores = {t.name: (g * t.param.detach()).abs() for t, g in zip(targets, grads)}
    return _check_finite(scores, "snip")


def balanced_sample(batches: list[Batch], samples_per_class: int, num_classes: int) -> list[Batch]:
    """Up to ``samples_per_class`` examples of each class, in class order, in two halves.

    As the GraSP authors' code draws its scoring data: the first examples of each class met in
    ``batches``, concatenated class by class and split into two halves, each scored as a batch.
    """
    per_class: dict[int, list[torch.Tensor]] = {c: [] for c in range(num_classes)}
    for x, y in batches:
        if y.dim() != 1 or y.dtype.is_floating_point:
            raise ValueError(
                "samples_per_class needs integer class labels (a 1-d tensor of class indices); "
                "pass samples_per_class=None to score on every example of data"
            )
        for i, label in enumerate(y.tolist()):
            if label in per_class and len(per_class[label]) < samples_per_class:
                per_class[label].append(x[i])
        if all(len(v) == samples_per_class for v in per_class.values()):
            break
    xs = [torch.stack(v) for v in per_class.values() if v]
    ys = [torch.full((len(v),), c, dtype=torch.long) for c, v in per_class.items() if v]
    x, y = torch.cat(xs), torch.cat(ys)
    half = len(y) // 2
    if half == 0:
        return [(x, y)]
    return [(x[:half], y[:half]), (x[half:], y[half:])]


def grasp_scores(model: nn.Module, data=None, *, loss_fn: LossFn | None = None, masks=None,
                 temperature: float = 200.0, samples_per_class: int | None = 10,
                 train: bool = True) -> dict[str, torch.Tensor]:
    """GraSP's keep-score ``W * Hg`` (the paper removes the largest ``-W * Hg``).

    ``g`` is the gradient of the loss summed over the scoring batches (no graph), ``Hg`` the
    gradient of ``sum_b g . grad L_b`` w.r.t. the sparsifiable weights, by double backprop.
    """
    _targets(model)
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    batches = _batches(data, "grasp")
    clone, targets = _scoring_copy(model, masks, train)
    if samples_per_class is not None:
        if isinstance(samples_per_class, bool) or not isinstance(
            samples_per_class, numbers.Integral
        ) or samples_per_class <= 0:
            raise ValueError(
                f"samples_per_class must be a positive integer or None, got {samples_per_class!r}"
            )
        device = _device(clone)
        with torch.no_grad():
            num_classes = clone(batches[0][0][:1].to(device)).shape[-1]
        batches = balanced_sample(batches, int(samples_per_class), int(num_classes))
    loss_fn = _loss(loss_fn)
    device = _device(clone)
    params = [t.param for t in targets]
    g = _accumulated_gradients(clone, targets, batches, loss_fn, float(temperature))
    hg = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(clone(x.to(device)) / temperature, y.to(device))
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        z = sum((gi * gf).sum() for gi, gf in zip(g, grads) if gf is not None)
        if not torch.is_tensor(z) or not z.requires_grad:
            continue
        for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
            if h is not None:
                acc.add_(h)
    scores = {t.name: (t.param.detach() * h).detach() for t, h in zip(targets, hg)}
    return _check_finite(scores, "grasp")


def _first_weight_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module, in ``model.modules()`` order, holding a sparsifiable weight itself."""
    weights = {id(t.param) for t in find_targets(model)}
    for name, module in model.named_modules():
        if any(id(p) in weights for p in module.parameters(recurse=False)):
            return name, module
    return None


def _synflow_input_shape(model: nn.Module, data,
                         input_shape) -> tuple[tuple[int, ...], str | None]:
    """The shape of one input (without the batch dimension), and where it was read from when
    it was read from the model (``None`` when given or read from ``data``)."""
    if input_shape is not None:
        try:
            shape = tuple(int(s) for s in input_shape)
        except TypeError:
            raise ValueError(
                f"input_shape must be a sequence of ints (one example, without the batch "
                f"dimension), got {input_shape!r}"
            ) from None
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input_shape must hold positive sizes, got {input_shape!r}")
        return shape, None
    if data is not None:
        return tuple(_batches(data, "synflow")[0][0].shape[1:]), None
    first = _first_weight_layer(model)
    if first is not None and isinstance(first[1], nn.Linear) and first[1].in_features > 0:
        return (first[1].in_features,), f"the first Linear layer {first[0]!r}"
    what = "no layer with weights" if first is None else (
        f"its first layer with weights, {first[0]!r}, is a {type(first[1]).__name__}")
    raise ValueError(
        f"synflow needs the shape of one input and cannot read it from this model ({what}, "
        "not a Linear): pass input_shape=(channels, height, width) (without the batch "
        "dimension), or data to read it from"
    )


def synflow_scores(model: nn.Module, data=None, *, loss_fn: LossFn | None = None, masks=None,
                   input_shape=None) -> dict[str, torch.Tensor]:
    """SynFlow's ``|W * dR/dW|`` on the linearised network (``|θ|``, all-ones input)."""
    _targets(model)
    unsupported = sorted({type(m).__name__ for m in model.modules()
                          if isinstance(m, _SYNFLOW_UNSUPPORTED)})
    if unsupported:
        raise ValueError(
            f"synflow cannot score a model with {', '.join(unsupported)} layers: it feeds an "
            "all-ones input through the network with absolute-valued weights, which needs "
            "feed-forward Linear/Conv layers; use snip, grasp or magnitude for this model"
        )
    shape, read_from = _synflow_input_shape(model, data, input_shape)
    clone, targets = _scoring_copy(model, masks, train=False)
    clone.double()
    with torch.no_grad():
        for tensor in list(clone.parameters()) + list(clone.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    ones = torch.ones((1, *shape), dtype=torch.float64, device=_device(clone))
    try:
        output = clone(ones)
    except RuntimeError as exc:
        if read_from is None:
            raise
        raise ValueError(
            f"synflow read the input shape {shape} from {read_from}, but the model does not "
            f"take inputs of that shape ({str(exc).splitlines()[0]}); pass input_shape="
        ) from None
    if not torch.is_tensor(output):
        raise ValueError("synflow needs a model whose forward returns one tensor")
    params = [t.param for t in targets]
    grads = torch.autograd.grad(output.sum(), params, allow_unused=True)
    # Kept in double precision: the products of absolute weights over many layers are huge.
    scores = {
        t.name: torch.zeros_like(t.param.detach()) if g is None else (t.param.detach() * g).abs()
        for t, g in zip(targets, grads)
    }
    return _check_finite(scores, "synflow")


SCORE_FUNCTIONS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
}
PRUNING_METHODS = tuple(SCORE_FUNCTIONS)


def check_pruning_method(method: str) -> str:
    key = method.lower() if isinstance(method, str) else method
    if key not in SCORE_FUNCTIONS:
        raise ValueError(
            f"unknown pruning method {method!r}; choose one of {', '.join(PRUNING_METHODS)}"
        )
    return key


def pruning_scores(model: nn.Module, method: str, data: Iterable | None = None, *,
                   loss_fn: LossFn | None = None, **options: Any) -> dict[str, torch.Tensor]:
    """Score of every sparsifiable weight of ``model`` (name -> tensor; higher = keep).

    ``method``: ``"random"``, ``"magnitude"``, ``"snip"``, ``"grasp"`` or ``"synflow"``.
    ``data``: an iterable of ``(inputs, targets)`` batches (needed by SNIP and GraSP; SynFlow
    reads only the input shape from it, or takes ``input_shape=``, or without either reads
    ``(in_features,)`` from a first ``nn.Linear`` layer). ``loss_fn(outputs,
    targets)`` defaults to cross-entropy. Options: ``seed`` (random), ``temperature`` and
    ``samples_per_class`` (GraSP), ``input_shape`` (SynFlow), ``train`` (SNIP and GraSP score
    the copy in train mode unless ``train=False``), ``masks`` (zero these weights first).
    The model itself is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = check_pruning_method(method)
    fn = SCORE_FUNCTIONS[key]
    allowed = [n for n, p in inspect.signature(fn).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "loss_fn"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for pruning method {key!r}; its options are: "
            f"{', '.join(allowed)}"
        )
    return fn(model, data, loss_fn=loss_fn, **options)
