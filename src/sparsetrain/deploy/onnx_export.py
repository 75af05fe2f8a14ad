"""ONNX export of a trained sparse model, and a check of the exported file in onnxruntime.

:func:`export_onnx` writes a plain PyTorch module (``nn.Linear``, ``nn.Conv2d``, ... holding
dense weights with exact zeros at the pruned positions, as ``load_sparse(path,
backend="dense")`` or a model trained on the masked backend gives) to one ``.onnx`` file:

- through torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
  default since torch 2.9; it needs the ``onnxscript`` package). The TorchScript exporter
  (``dynamo=False``) is deprecated and warns; it is not used;
- in eval mode (the module's training flags are put back afterwards), with BatchNorm folded
  into the convolution before it by the exporter's optimizer (a zero weight stays zero);
- one input named ``"input"`` and the output ``"output"``, the batch dimension dynamic
  (``"batch"``) unless ``dynamic_batch=False``;
- as one self-contained file: the weights are stored in the ``.onnx`` file itself, not in an
  external-data side file. Only a model whose weights pass torch's large-model threshold (1.5
  GB, just under protobuf's 2 GB limit) gets its weights in ``<file name>.data`` beside it, as
  ONNX requires;
- atomically: the file is written under a temporary name in the same folder and renamed, so an
  existing file is replaced only by a complete one.

The zeros are stored as zeros: an ONNX file of a 95%-sparse model is as large as the dense
one, and compresses well (gzip). ONNX Runtime's MatMul, Gemm and Conv kernels are dense, so
the zeros do not make inference faster either.

:func:`check_onnx` runs the file in onnxruntime (CPU) and returns the largest absolute
difference to the module's own output.

``CSRLinear`` layers (the csr backend, ``load_sparse``'s default) compute with sparsetrain's
custom operators, which ONNX has no operator for: a model holding them is exported from a copy
with plain ``nn.Linear`` layers in their place (:func:`sparsetrain.backends.conversion.to_masked`),
the model itself left as it is.

Needs ``pip install 'sparsetrain[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..backends.conversion import to_masked
from ..backends.csr import CSRLinear

__all__ = ["OnnxDependencyError", "OnnxExportError", "check_onnx", "export_onnx"]

INSTALL = "pip install 'sparsetrain[onnx]'"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_AXIS = "batch"


class OnnxDependencyError(ImportError):
    """A package that ONNX export or checking needs (onnx, onnxscript, onnxruntime) is not
    installed; the message says how to install it."""


class OnnxExportError(ValueError):
    """torch.onnx could not export the model, or the exported file does not reproduce it."""


def _require(*packages: str, purpose: str) -> None:
    """Import ``packages``, or an :class:`OnnxDependencyError` saying what to install."""
    missing = []
    for package in packages:
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise OnnxDependencyError(
            f"{purpose} needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}: install sparsetrain[onnx] ({INSTALL})")


def _plain(model: nn.Module) -> nn.Module:
    """``model``, or, where it holds ``CSRLinear`` layers, a copy of it with plain
    ``nn.Linear`` layers in their place (dense weights with zeros, the fused ReLUs put back):
    the CSR products are sparsetrain's custom operators, for which ONNX has no operator."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx exports an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, CSRLinear) for m in model.modules()):
        return model
    copied = copy.deepcopy(model)
    to_masked(copied)
    return copied


def _check_exportable(model: nn.Module) -> None:
    """ValueError for what torch.onnx cannot export: sparse-format weights."""
    semi = torch.sparse.SparseSemiStructuredTensor
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, semi) or t.layout != torch.strided:
            kind = "a 2:4 semi-structured" if isinstance(t, semi) else f"a {t.layout}"
            raise ValueError(
                f"{name} is {kind} tensor, which torch.onnx cannot export; export the dense "
                "model (the weights as ordinary tensors with zeros where pruned, e.g. the "
                "model before to_semi_structured, or load_sparse(path, backend=\"dense\"))")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, each submodule's training flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences what torch.onnx logs and warns about itself on every export (the torchvision
    operators it skips, deprecations inside torch), none of which concerns the model."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            yield
    finally:
        logger.setLevel(level)


def _example_args(example) -> tuple[torch.Tensor, ...]:
    if isinstance(example, torch.Tensor):
        return (example,)
    raise TypeError(f"example must be a torch.Tensor (one batch of inputs), got "
                    f"{type(example).__name__}")


def _reason(error: BaseException) -> str:
    """The gist of an exporter error (they run to pages, with terminal colours): the first
    line of the error and of its innermost cause."""
    def first_line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else '(no message)'}"

    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    summary = first_line(error)
    if root is not error:
        summary += f" (caused by {first_line(root)})"
    return summary


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Export ``model`` to the ONNX file ``path`` (its folder is created if needed); returns
    the path.

    ``example``: one batch of inputs (any batch size, 1 included; its values do not matter),
    traced through the model. ``opset``: the ONNX opset to target (None: torch's default).
    ``dynamic_batch``: the batch dimension of the input and output is dynamic (named
    ``"batch"``), so the file runs any batch size; False fixes it at the example's.

    The model is exported in eval mode (its training flags are restored afterwards), as plain
    layers (dense weights with zeros where pruned): a model holding ``CSRLinear`` layers is
    exported from a copy converted to ``nn.Linear`` layers. Raises
    :class:`OnnxDependencyError` when onnx or onnxscript is missing and
    :class:`OnnxExportError` (a ValueError) when torch.onnx cannot export the model.
    """
    args = _example_args(example)
    model = _plain(model)
    _check_exportable(model)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or opset < 1):
        raise ValueError(f"opset must be a positive integer or None, got {opset!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the path of the .onnx file to write")
    _require("onnx", "onnxscript", purpose="ONNX export (torch.onnx's exporter)")

    dynamic_shapes = None
    if dynamic_batch:
        if args[0].dim() == 0:
            raise ValueError("dynamic_batch needs an example with a batch dimension; got a "
                             "0-d tensor (use dynamic_batch=False)")
        dynamic_shapes = ({0: torch.export.Dim(BATCH_AXIS)},)

    try:
        with _eval_mode(model), _quiet_exporter():
            program = torch.onnx.export(
                model, args, None, dynamo=True, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=opset,
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    except (KeyboardInterrupt, MemoryError, OnnxDependencyError):
        raise
    except ImportError as error:
        raise OnnxDependencyError(f"ONNX export failed on a missing package ({error}): "
                                  f"install sparsetrain[onnx] ({INSTALL})") from error
    except Exception as error:  # torch.export and the translation raise many kinds
        raise OnnxExportError(f"torch.onnx could not export {type(model).__name__} to ONNX: "
                              f"{_reason(error)}; the full error is chained to this one"
                              ) from error

    if dynamic_batch:
        shape = program.model.graph.inputs[0].shape
        if shape is not None and len(shape) and isinstance(shape[0], int):
            raise OnnxExportError(
                f"{type(model).__name__} fixes the batch size: torch.export could only "
                f"trace it for inputs of shape {tuple(args[0].shape)}, not for any batch "
                "size (e.g. a reshape to a fixed batch in forward). Export it with "
                "dynamic_batch=False (the file then runs that batch size only), or make the "
                "forward pass batch-agnostic (x.flatten(1), x.reshape(x.shape[0], -1))")

    _save_atomically(program, path)
    return path


def _save_atomically(program, path: Path) -> None:
    """Save the ONNX program to ``path`` through a temporary folder beside it, then rename:
    the weights inside the file (external_data=False), unless torch puts them in a
    ``.data`` side file because they are too large for one protobuf, in which case that file
    is moved beside ``path`` first (its name, which the model refers to, is unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        target = staging / path.name
        program.save(target, external_data=False)
        for side in sorted(staging.iterdir()):
            if side != target:
                os.replace(side, path.parent / side.name)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _torch_outputs(model: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    with _eval_mode(model), torch.no_grad():
        out = model(example)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise TypeError("check_onnx compares tensor outputs; the model returned "
                        f"{type(out).__name__}")
    return outputs


def check_onnx(path: str | os.PathLike, model: nn.Module, example: torch.Tensor, *,
               rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Run the ONNX file ``path`` in onnxruntime (CPUExecutionProvider) on ``example`` and
    compare with ``model``'s output (eval mode, no gradients). Returns the largest absolute
    difference; raises :class:`OnnxExportError` when the shapes differ or an output is not
    within ``atol + rtol * |torch output|`` (NaNs equal), and :class:`OnnxDependencyError`
    when onnxruntime is missing."""
    _require("onnxruntime", purpose="Checking an ONNX file")
    import numpy as np
    import onnxruntime as ort

    _example_args(example)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxExportError(f"{path} has {len(inputs)} inputs; check_onnx feeds one")
    got = session.run(None, {inputs[0].name: example.detach().cpu().numpy()})
    want = [o.detach().cpu().numpy() for o in _torch_outputs(model, example)]
    if len(got) != len(want):
        raise OnnxExportError(f"{path} gives {len(got)} outputs, the model {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise OnnxExportError(f"output {i} of {path} has shape {g.shape}, the model's "
                                  f"{w.shape}")
        if not np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            with np.errstate(invalid="ignore"):
                diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            nans = int((np.isnan(g) != np.isnan(w)).sum())
            raise OnnxExportError(
                f"output {i} of {path} differs from the model's by up to "
                f"{np.nanmax(diff, initial=0.0):.3g} (rtol={rtol}, atol={atol})"
                + (f", and {nans} entries are NaN in only one of them" if nans else ""))
        same = (g == w) | (np.isnan(g) & np.isnan(w))  # equal infinities and NaNs: 0
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(g.astype(np.float64) - w.astype(np.float64)))
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst
