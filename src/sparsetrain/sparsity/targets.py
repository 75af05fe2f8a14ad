"""Which tensors of a model are sparsified.

Sparsified (RigL paper, Section 3; ``shared/spec/algorithms.md``, "What is sparsified"): the
weights of ``Linear``, ``Conv1d/2d/3d`` (grouped and depthwise too) and their transposed forms,
``Embedding``/``EmbeddingBag``, the weight matrices of ``RNN``/``LSTM``/``GRU`` (``weight_ih_*``,
``weight_hh_*``), the input projections of ``MultiheadAttention`` (its output projection is a
``Linear``), and the weights of every module type declared with :func:`register_weight_layout`
(Hugging Face ``transformers``' ``Conv1D``, GPT-2's projections, is declared here by name, so
transformers is never imported). Never biases, never normalisation parameters.

Position embeddings (an ``Embedding`` named like ``wpe``, ``position_embeddings``,
``pos_emb``...) stay dense unless ``sparsify_embeddings=True``: they are small, and most users
keep them dense.

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
#: Last parts of module names that mark an ``Embedding`` as a position embedding.
POSITION_EMBEDDINGS = ("wpe", "pos_emb", "pos_embed", "pos_embedding", "position_embedding",
                       "position_embeddings", "embed_positions", "positional_embedding")


@dataclass(frozen=True)
class WeightLayout:
    """How a module type holds its weights: the attribute names of the weights sparsetrain
    sparsifies, and which dimension of each indexes the inputs (``nn.Linear``: 1, transformers'
    ``Conv1D``, which stores ``in x out``: 0). ``linear`` marks ``y = x W`` (or ``x W^T``) with
    one use of every weight per output row, which the FLOPs count uses."""

    attrs: tuple[str, ...] = ("weight",)
    in_dim: int = 1
    linear: bool = True


_LAYOUTS: dict[str, WeightLayout] = {}


def _type_key(module_type: type | str) -> str:
    if isinstance(module_type, str):
        return module_type
    return f"{module_type.__module__}.{module_type.__qualname__}"


def register_weight_layout(module_type: type | str, attrs: Sequence[str] = ("weight",), *,
                           in_dim: int = 1, linear: bool = True) -> None:
    """Declare that modules of ``module_type`` (a class, or its dotted name
    ``"package.module.Class"`` so that the package need not be imported) hold sparsifiable
    weights in ``attrs``, with the inputs along dimension ``in_dim``. Subclasses are included."""
    if isinstance(attrs, str):
        attrs = (attrs,)
    if not attrs or not all(isinstance(a, str) and a for a in attrs):
        raise ValueError(f"attrs must name the weight attributes, got {attrs!r}")
    if in_dim not in (0, 1):
        raise ValueError(f"in_dim must be 0 or 1 (the dimension of a 2-D weight that indexes "
                         f"the inputs), got {in_dim!r}")
    _LAYOUTS[_type_key(module_type)] = WeightLayout(tuple(attrs), int(in_dim), bool(linear))


def weight_layout(module: nn.Module) -> WeightLayout | None:
    """The declared layout of ``module``'s type (or of a base class), or ``None``."""
    for cls in type(module).__mro__:
        layout = _LAYOUTS.get(_type_key(cls))
        if layout is not None:
            return layout
    return None


register_weight_layout("transformers.pytorch_utils.Conv1D", ("weight",), in_dim=0)


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
    layout = weight_layout(module)
    if layout is not None:
        for attr in layout.attrs:
            p = getattr(module, attr, None)
            if isinstance(p, torch.Tensor):
                yield p
    elif isinstance(module, _WEIGHT_MODULES):
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


def position_embeddings(model: nn.Module) -> set[int]:
    """ids of the weights of ``model``'s position embeddings (see ``POSITION_EMBEDDINGS``)."""
    found = set()
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) and last in POSITION_EMBEDDINGS:
            found.add(id(module.weight))
    return found


def partition(
    model: nn.Module, dense_layers: Iterable[str] | str = (), *,
    sparsify_embeddings: bool = False,
) -> tuple[list[Target], list[Target]]:
    """The (sparsified, kept-dense) weights of ``model``: position embeddings and
    ``dense_layers`` are kept dense (the former unless ``sparsify_embeddings``).

    Raises ``ValueError`` when the model has nothing to sparsify, or ``dense_layers`` keeps
    every sparsifiable weight dense.
    """
    targets = find_targets(model)
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no weight that sparsetrain can sparsify "
            "(Linear, Conv, Embedding, RNN/LSTM/GRU or MultiheadAttention weights, or a module "
            "declared with register_weight_layout)"
        )
    sparse, dense = split_dense(targets, dense_layers)
    if not sparsify_embeddings:
        positional = position_embeddings(model)
        dense += [t for t in sparse if id(t.param) in positional]
        sparse = [t for t in sparse if id(t.param) not in positional]
    if not sparse:
        raise ValueError(
            "dense_layers (with the position embeddings, kept dense by default) keeps every "
            "sparsifiable weight dense, so nothing is left to sparsify; remove some patterns "
            "from dense_layers or set sparsify_embeddings"
        )
    return sparse, dense
