"""Exporting a trained sparse model: its weights, compactly, in a safetensors file.

``export_sparse(model, sparsifier, path, metadata={...})`` writes the model as the forward pass
uses it: each sparsified weight as the values at ``sparsifier.forward_positions(name)`` (the
active set; Top-KAST's forward set), every other tensor of the model's state dense. A mapping
of weight name -> bool mask may stand in for the sparsifier. The model may be on any backend:
its state is read as the masked backend holds it (``dense_state_dict``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..backends.conversion import dense_state_dict
from .format import SparseModel, SparseWeight
from .write import save

#: The keys of a construction recipe (:func:`sparsetrain.models.build_model`'s arguments).
RECIPE_KEYS = ("model", "num_classes", "input_shape", "width")


def check_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` with its keys checked and its values made plain (``ValueError``)."""
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if missing or unknown:
        raise ValueError(f"a model recipe has the keys {', '.join(RECIPE_KEYS)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    return {"model": str(recipe["model"]), "num_classes": int(recipe["num_classes"]),
            "input_shape": [int(s) for s in recipe["input_shape"]],
            "width": float(recipe["width"])}


def _positions(sparsity: Any, names: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    """name -> sorted flat positions of the weights the model keeps, and their structure."""
    if sparsity is None:
        return {}, "unstructured"
    if hasattr(sparsity, "forward_positions") and hasattr(sparsity, "names"):
        structure = str(getattr(sparsity, "structure", "unstructured"))
        return ({n: sparsity.forward_positions(n).detach().cpu().to(torch.int64)
                 for n in sparsity.names}, structure)
    if isinstance(sparsity, Mapping):
        result = {}
        for name, mask in sparsity.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"the mask of {name!r} must be a bool tensor, got "
                                 f"{type(mask).__name__}"
                                 + (f" of {mask.dtype}" if isinstance(mask, torch.Tensor) else ""))
            result[name] = mask.detach().cpu().reshape(-1).nonzero().view(-1)
        return result, "unstructured"
    raise TypeError(f"export_sparse takes a sparsifier, a dict of weight name -> bool mask, or "
                    f"None (every weight dense), not a {type(sparsity).__name__}")


def pack(model: nn.Module, sparsity: Any = None, *, recipe: Mapping[str, Any] | None = None,
         metadata: Mapping[str, Any] | None = None) -> SparseModel:
    """The :class:`SparseModel` that :func:`export_sparse` writes (see there)."""
    from .. import __version__

    state = {k: v.detach().cpu() for k, v in dense_state_dict(model).items()}
    positions, structure = _positions(sparsity, list(state))
    block = None
    if structure.startswith("block:"):
        block = tuple(int(s) for s in structure.split(":", 1)[1].split("x"))
    sparse = {}
    for name, pos in positions.items():
        if name not in state:
            raise ValueError(f"{name!r} is not a tensor of the model (its state holds "
                             f"{', '.join(list(state)[:5])}...); give masks by the names "
                             "of model.named_parameters()")
        weight = state.pop(name)
        flat = weight.reshape(-1)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= flat.numel()):
            raise ValueError(f"the positions of {name!r} lie outside its {flat.numel()} weights")
        pos = torch.unique(pos)  # sorted
        outside = flat.clone()
        outside[pos] = 0
        if bool(outside.ne(0).any()):
            raise ValueError(
                f"{name!r} has {int(outside.ne(0).sum())} non-zero weights outside its mask, "
                "which the export would drop; zero them first (weight.data.mul_(mask)), or export "
                "right after sparsifier.step(), which keeps them zero")
        sparse[name] = SparseWeight(tuple(weight.shape), pos, flat[pos].clone(), structure,
                                    block if weight.dim() == 2 else None)
    if recipe is None:
        recipe = getattr(model, "sparsetrain_recipe", None)
    info = dict(metadata or {})
    for key, value in info.items():
        if isinstance(value, float) and not math.isfinite(value):
            info[key] = str(value)
    return SparseModel(state, sparse, None if recipe is None else check_recipe(recipe), info,
                       __version__)


def export_sparse(model: nn.Module, sparsifier: Any, path: str | Path, *,
                  metadata: Mapping[str, Any] | None = None,
                  recipe: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` as a sparse model file (safetensors, see
    :mod:`sparsetrain.deploy.format`) and return the path.

    ``sparsifier``: the model's sparsifier (its ``forward_positions`` are kept), a dict of
    weight name -> bool mask, or None (every tensor dense). A weight that is non-zero outside
    its mask is refused (ValueError): the export would change the model. ``metadata``: what to
    record about the model (JSON values: method, data set, accuracy...), returned by
    :func:`read_sparse` as ``info``. ``recipe``: how to build the module again
    (``model``, ``num_classes``, ``input_shape``, ``width``: a zoo model), by default the one
    :func:`sparsetrain.models.build_model` attached to it; without one, the file loads only
    into a module the caller builds (``load_sparse(path, model=...)``).
    """
    return save(pack(model, sparsifier, recipe=recipe, metadata=metadata), path)
