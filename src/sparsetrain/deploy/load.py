"""Loading a sparse model file as a module ready for inference.

``load_sparse(path)`` builds the zoo model the file's recipe names (or fills the module given
as ``model=``), loads the weights exactly as they were exported, and returns it in eval mode
with every parameter's ``requires_grad`` off. With ``backend="csr"`` (the default) each sparse
weight of a plain ``nn.Linear`` becomes a ``CSRLinear`` running the compiled kernels (a ReLU
that follows it in an ``nn.Sequential`` fused into it; block-structured weights on the block
kernels); other sparse weights (convolutions, embeddings) stay dense tensors with zeros. With
``backend="dense"`` every layer is the plain PyTorch one, holding zeros where the weights were
pruned: what ``torch.onnx.export`` and other tools take.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backends.csr import CSRLinear
from ..backends.conversion import to_csr
from ..backends.csr_ops import DTYPES
from .format import SparseFileError, SparseModel
from .read import load

#: What ``load_sparse``'s ``backend`` may be.
BACKENDS = ("csr", "dense")


def read_sparse(path: str | Path) -> SparseModel:
    """The content of a sparse model file (tensors, recipe, info), checked; ``SparseFileError``
    otherwise."""
    return load(path)


def build_recipe(content: SparseModel, where: str = "the file") -> nn.Module:
    """The zoo model of ``content``'s recipe (initialised without touching torch's global
    random state)."""
    from ..models import available_models, build_model

    recipe = content.recipe
    if recipe is None:
        raise SparseFileError(f"{where} holds no zoo recipe (it was exported from a model "
                              "outside the zoo); build the module yourself and pass it: "
                              "load_sparse(path, model=MyNet())")
    if recipe.get("model") not in available_models():
        raise SparseFileError(f"{where} names the model {recipe.get('model')!r}, which this "
                              f"sparsetrain does not have (models: {', '.join(available_models())})"
                              "; pass the module: load_sparse(path, model=...)")
    with torch.random.fork_rng(devices=[]):
        return build_model(recipe["model"], num_classes=recipe["num_classes"],
                           input_shape=tuple(recipe["input_shape"]), width=recipe["width"])


def check_fits(content: SparseModel, model: nn.Module, where: str = "the file") -> None:
    """``SparseFileError`` unless ``model``'s state has exactly the file's tensors and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = content.shapes()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k} {saved[k]} in the file, {expected[k]} in the module"
              for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"the module has {', '.join(missing[:4])}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                         + " that the file lacks")
        if unexpected:
            parts.append(f"the file has {', '.join(unexpected[:4])}"
                         + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else "")
                         + " that the module lacks")
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:3]))
        hint = (f" (the file is for {content.recipe['model']} with {content.recipe['num_classes']}"
                f" classes, input {tuple(content.recipe['input_shape'])}, width "
                f"{content.recipe['width']:g})" if content.recipe else "")
        raise SparseFileError(f"{where} is for another model{hint}: {'; '.join(parts)}; pass "
                              "the module it was exported from")


def materialise(content: SparseModel, model: nn.Module | None = None, *,
                backend: str = "csr", where: str = "the file") -> nn.Module:
    """The module holding ``content`` (see :func:`load_sparse`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if model is None:
        model = build_recipe(content, where)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, CSRLinear) for m in model.modules()):
        raise ValueError("load_sparse fills a plain module (nn.Linear layers); this one holds "
                         "CSRLinear layers already: pass a freshly built module")
    check_fits(content, model, where)
    with torch.no_grad():
        model.load_state_dict(content.state_dict(), strict=True)
    if backend == "csr":
        params = dict(model.named_parameters(remove_duplicate=False))
        masks = {n: w.mask() for n, w in content.sparse.items()
                 if n in params and params[n].dim() == 2 and params[n].dtype in DTYPES}
        layers = to_csr(model, masks)
        for name, layer in layers.items():
            block = content.sparse[name].block
            if block is not None:
                layer.set_block_shape(block)
    model.requires_grad_(False)
    return model.eval()


def load_sparse(path: str | Path, model: nn.Module | None = None, *, backend: str = "csr",
                device: str | torch.device = "cpu") -> nn.Module:
    """The model in the sparse model file at ``path``, in eval mode, for inference.

    ``model``: the module to fill (one built as the exported one was); by default the zoo model
    the file's recipe names. ``backend``: ``"csr"`` (sparse ``nn.Linear`` weights as
    ``CSRLinear`` layers on the compiled kernels) or ``"dense"`` (plain layers, zeros where
    pruned). The weights are those exported, bit for bit (in the module's dtype where it
    differs from the file's). ``SparseFileError`` (a ValueError) for a file that is missing,
    truncated, changed since export, of a newer format, or for another model.
    """
    content = read_sparse(path)
    return materialise(content, model, backend=backend, where=str(path)).to(device)
