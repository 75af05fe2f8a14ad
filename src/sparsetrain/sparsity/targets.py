"""Which tensors of a model are sparsified.

Sparsified (RigL paper, Section 3; ``shared/spec/algorithms.md``, "What is sparsified"): the
weights of ``Linear``, ``Conv1d/2d/3d`` (grouped and depthwise too) and their transposed forms,
``Embedding``/``EmbeddingBag``, the weight matrices of ``RNN``/``LSTM``/``GRU`` (``weight_ih_*``,
``weight_hh_*``) and the input projections of ``MultiheadAttention`` (its output projection is a
``Linear``). Never biases, never normalisation parameters.

A parameter shared by several modules (tied weights) is one target, named as
``model.named_parameters()`` names it (the first name under which it is reached).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

_WEIGHT_MODULES = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Target:
    """One sparsifiable tensor: its name in ``model.named_parameters()`` and the tensor."""

    name: str
    param: nn.Parameter

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()


def _module_weights(module: nn.Module) -> Iterable[torch.Tensor]:
    if isinstance(module, _WEIGHT_MODULES):
        if getattr(module, "weight", None) is not None:
            yield module.weight
    elif isinstance(module, nn.RNNBase):
        for name, p in module.named_parameters(recurse=False):
            if name.startswith(("weight_ih", "weight_hh")):
                yield p
    elif isinstance(module, nn.MultiheadAttention):
        for name in _ATTENTION_WEIGHTS:
            p = getattr(module, name, None)
            if p is not None:
                yield p


def find_targets(model: nn.Module) -> list[Target]:
    """All sparsifiable weights of ``model``, in ``named_parameters()`` order, each once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = {id(p) for m in model.modules() for p in _module_weights(m)}
    return [Target(n, p) for n, p in model.named_parameters() if id(p) in wanted]


def _matches(name: str, pattern: str) -> bool:
    module_name = name.rsplit(".", 1)[0] if "." in name else name
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module_name, pattern)


def split_dense(
    targets: Sequence[Target], dense_layers: Iterable[str] | str = ()
) -> tuple[list[Target], list[Target]]:
    """Split targets into (sparse, dense) by ``dense_layers``.

    Each entry of ``dense_layers`` is a parameter name (``"fc1.weight"``), a module name
    (``"fc1"``) or a glob pattern over either (``"features.0*"``, ``"*.classifier"``). A pattern
    that matches no sparsifiable weight raises ``ValueError``: it is almost always a typo.
    """
    if isinstance(dense_layers, str):
        dense_layers = (dense_layers,)
    patterns = list(dense_layers or ())
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"dense_layers must hold parameter names or glob patterns (str), got {pattern!r}"
            )
        if not any(_matches(t.name, pattern) for t in targets):
            names = ", ".join(t.name for t in targets)
            raise ValueError(
                f"dense_layers pattern {pattern!r} matches none of the sparsifiable weights; "
                f"they are: {names}"
            )
    dense = [t for t in targets if any(_matches(t.name, p) for p in patterns)]
    dense_ids = {id(t.param) for t in dense}
    sparse = [t for t in targets if id(t.param) not in dense_ids]
    return sparse, dense


def partition(
    model: nn.Module, dense_layers: Iterable[str] | str = ()
) -> tuple[list[Target], list[Target]]:
    """The (sparsified, kept-dense) weights of ``model``.

    Raises ``ValueError`` when the model has nothing to sparsify, or ``dense_layers`` keeps
    every sparsifiable weight dense.
    """
    targets = find_targets(model)
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no weight that sparsetrain can sparsify "
            "(Linear, Conv, Embedding, RNN/LSTM/GRU or MultiheadAttention weights)"
        )
    sparse, dense = split_dense(targets, dense_layers)
    if not sparse:
        raise ValueError(
            "dense_layers keeps every sparsifiable weight dense, so nothing is left to sparsify; "
            "remove some patterns from dense_layers"
        )
    return sparse, dense
