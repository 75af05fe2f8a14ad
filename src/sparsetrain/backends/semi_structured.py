"""2:4 weights on a GPU's sparse tensor cores: torch's semi-structured sparse format, for inference.

A model trained with ``structure="2:4"`` (in every group of 4 consecutive weights along a
Linear layer's input dimension, 2 are active) can run its Linear layers with torch's
``SparseSemiStructuredTensor`` (``torch.sparse.to_sparse_semi_structured``), which stores the 2
kept values of each group and their positions, and multiplies on the sparse tensor cores of
NVIDIA GPUs of compute capability 8.0 or higher (A100, H100, H200, ...). What torch 2.13 asks:

- CUDA only, a 2-D contiguous weight, float16 or bfloat16 for a 2:4 pattern (int8 and float8
  need a quantized model; float32, on the CUTLASS kernels only, means 1:2, one in every pair);
- shape: the weight's rows (outputs) and columns (inputs) multiples of the backend's minimum,
  16 x 16 for cuSPARSELt (the default) and 32 x 64 for CUTLASS (used when
  ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set or cuSPARSELt is missing), in float16
  and bfloat16. The dense operand (the activations) is padded as needed: any batch size works;
- only the weight is sparse (``F.linear(x, W_sparse, b)``; sparse @ sparse is not supported),
  the input in the weight's dtype, with a last dimension that ``view(-1, in_features)`` can
  flatten (a contiguous input);
- the converted weight holds only the forward representation: no backward, no optimizer, no
  ``state_dict`` round trip. Keep the dense (masked) model for training and saving; convert a
  copy for inference.

:func:`check_two_four` checks the pattern (no GPU needed), :func:`semi_structured_plan` says which
Linear layers of a model the format can hold (and why not the others), :func:`to_semi_structured`
converts a copy of the model.
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping, NamedTuple

import torch
from torch import nn
from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                          SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured)

LOG = logging.getLogger("sparsetrain")

#: The dtypes whose semi-structured format is 2:4 and that ``nn.Linear`` runs.
DTYPES = (torch.float16, torch.bfloat16)


def check_two_four(weight_or_mask: torch.Tensor, name: str = "weight") -> None:
    """``ValueError`` naming ``name`` and what is wrong, unless the non-zeros (the ``True``
    entries of a bool mask) of the 2-D ``weight_or_mask`` are 2:4 along its last dimension: a
    multiple of 4 long, at most 2 non-zeros in every group of 4 consecutive entries.

    At most 2, not exactly 2, because that is what torch's conversion keeps exactly: it stores 2
    values and their positions per group, so a group with fewer non-zeros (an active weight that
    is exactly 0, or a whole layer sparser than 2:4) is stored with explicit zeros and the product
    is unchanged. A group with 3 or 4 non-zeros is not refused: torch checks the pattern for
    neither backend (its CUTLASS packing silently drops the extra values), so the layer would
    compute something else. This check needs no GPU: run it before converting.
    """
    t = weight_or_mask
    if t.dim() != 2:
        raise ValueError(f"{name}: a 2:4 weight is 2-D (outputs x inputs), got shape "
                         f"{tuple(t.shape)}")
    rows, cols = t.shape
    if cols % 4:
        raise ValueError(f"{name} {tuple(t.shape)}: its input dimension {cols} is not a multiple "
                         "of 4, so it cannot be split into 2:4 groups of 4")
    counts = (t.detach() != 0).reshape(rows, cols // 4, 4).sum(-1).cpu()
    bad = (counts > 2).nonzero()
    if len(bad):
        examples = "; ".join(f"row {r}, columns {4 * g}-{4 * g + 3}: {int(counts[r, g])}"
                             for r, g in bad[:3].tolist())
        bad_rows = bad[:, 0].unique().tolist()
        raise ValueError(
            f"{name} {tuple(t.shape)} is not 2:4 along its inputs: {len(bad)} of "
            f"{counts.numel()} groups of 4 have more than 2 non-zeros ({examples}"
            f"{'; ...' if len(bad) > 3 else ''}), in {len(bad_rows)} rows ("
            f"{', '.join(map(str, bad_rows[:10]))}{', ...' if len(bad_rows) > 10 else ''})")


def semi_structured_class() -> type:
    """The ``SparseSemiStructuredTensor`` subclass a conversion uses: the one
    ``to_sparse_semi_structured`` picks (cuSPARSELt unless
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set), or CUTLASS where this torch has no
    cuSPARSELt."""
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def shape_multiples(dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """(rows, cols): what a weight's outputs and inputs must be multiples of for the format, in
    ``dtype``, on the backend of :func:`semi_structured_class` (torch's own table)."""
    limits = semi_structured_class()._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return limits.sparse_min_rows, limits.sparse_min_cols


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 for 2:4 weights, got "
                         f"{dtype} (torch's float32 format is 1:2, one in every pair, and int8 "
                         "or float8 need a quantized model)")


def semi_structured_plan(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, *,
                         dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Weight name -> ``"convert"``, or the reason it stays dense, for every ``nn.Linear``
    weight of ``model`` (and every name in ``masks``). Needs no GPU; changes nothing.

    The 2:4 pattern is that of ``masks[name]`` (name -> bool mask of the weight's shape, as
    ``sparsifier.masks`` gives) where ``masks`` is given; Linear weights not in it stay dense.
    Without ``masks`` it is that of the weight's non-zeros. A weight converts when it is the
    ``weight`` of a plain ``nn.Linear`` (not a subclass, not shared with another module, not
    parametrized), its pattern passes :func:`check_two_four`, and its shape is a multiple of
    :func:`shape_multiples` of ``dtype``. ``ValueError`` for a mask naming no parameter of
    ``model`` or of another shape than its weight.
    """
    _check_dtype(dtype)
    multiples, backend = shape_multiples(dtype), semi_structured_class().BACKEND
    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, int] = {}  # id(parameter) -> how many modules hold it
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    masks = dict(masks) if masks is not None else None
    unknown = sorted(set(masks or ()) - set(params))
    if unknown:
        raise ValueError(f"masks name no parameter of the model: {', '.join(unknown)}")
    plan: dict[str, str] = {}
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            name = f"{path}.{attr}" if path else attr
            if attr != "weight" and (masks is None or name not in masks):
                continue
            if not isinstance(module, nn.Linear):
                if masks is not None and name in masks:
                    plan[name] = f"in a {type(module).__name__}, not an nn.Linear"
                continue
            if type(module) is not nn.Linear or attr != "weight":
                plan[name] = f"a {type(module).__name__}'s {attr}, not a plain nn.Linear weight"
            elif owners[id(p)] > 1 or getattr(module, "parametrizations", None) is not None:
                plan[name] = "shared with another module or parametrized"
            elif masks is not None and name not in masks:
                plan[name] = "no mask given"
            else:
                pattern = p if masks is None else masks[name]
                if tuple(pattern.shape) != tuple(p.shape):
                    raise ValueError(f"the mask of {name} has shape {tuple(pattern.shape)}, its "
                                     f"weight {tuple(p.shape)}")
                rows, cols = p.shape
                try:
                    check_two_four(pattern, name)
                except ValueError as error:
                    plan[name] = str(error)
                    continue
                if rows % multiples[0] or cols % multiples[1]:
                    plan[name] = (f"shape {tuple(p.shape)}: torch's {backend} "
                                  f"kernels need outputs a multiple of {multiples[0]} and inputs a "
                                  f"multiple of {multiples[1]} in {dtype}")
                else:
                    plan[name] = "convert"
    return plan


def require_sparse_gpu(device: torch.device | str = "cuda") -> torch.device:
    """``device`` as a ``torch.device``; ``RuntimeError`` unless it is a CUDA GPU that runs
    semi-structured sparse products (compute capability 8.0 or higher)."""
    device = torch.device(device)
    need = ("the semi-structured (2:4) conversion needs a CUDA GPU with semi-structured sparse "
            "support, compute capability >= 8.0 (A100, H100, ...)")
    if device.type != "cuda":
        raise RuntimeError(f"{need}; got device {str(device)!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{need}; torch.cuda.is_available() is False here (torch "
                           f"{torch.__version__})")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        raise RuntimeError(f"{need}; {torch.cuda.get_device_name(device)} has compute "
                           f"capability {capability[0]}.{capability[1]}")
    return device


def _compress(weight: torch.Tensor) -> torch.Tensor:
    """The semi-structured tensor of a CUDA 2:4 ``weight``."""
    cls = semi_structured_class()
    if cls is SparseSemiStructuredTensorCUSPARSELT or SparseSemiStructuredTensor._FORCE_CUTLASS:
        return to_sparse_semi_structured(weight)
    return cls.from_dense(weight)  # no cuSPARSELt in this torch: its CUTLASS counterpart


class SemiStructured(NamedTuple):
    """What :func:`to_semi_structured` returns."""

    model: nn.Module  #: the converted copy, in eval mode
    converted: list[str]  #: names of the weights now in the semi-structured format
    dense: dict[str, str]  #: the other Linear weights (and masks) -> why they stay dense


def to_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, *,
                       dtype: torch.dtype = torch.float16,
                       device: torch.device | str = "cuda") -> SemiStructured:
    """A copy of ``model`` on ``device`` in ``dtype`` and in eval mode, whose 2:4 Linear
    weights are torch semi-structured sparse tensors; ``model`` itself is not changed.

    For inference only: call the copy under ``torch.inference_mode()`` (or ``no_grad``) with
    inputs in ``dtype`` on ``device``. Its converted weights have ``requires_grad=False`` and
    support no backward pass, optimizer or ``state_dict`` round trip: train and save the dense
    model, convert again after changing it.

    Which weights convert, and from which pattern, is :func:`semi_structured_plan`'s answer
    (``masks``: name -> bool mask, e.g. ``sparsifier.masks``; without it, the weights' zeros).
    With ``masks`` the weights are zeroed outside their masks before conversion, so the copy
    computes the masked model. Layers that do not fit stay dense (in ``dtype``). Returns
    ``SemiStructured(model, converted, dense)``: the copy, the converted weight names, and
    name -> reason for those left dense.

    ``ValueError`` for a dtype other than float16 or bfloat16, or when no weight converts;
    ``RuntimeError`` without a CUDA GPU of compute capability 8.0 or higher. The converted and
    dense names are also logged (``logging``, logger ``"sparsetrain"``, level INFO).
    """
    _check_dtype(dtype)
    device = require_sparse_gpu(device)
    plan = semi_structured_plan(model, masks, dtype=dtype)
    names = [n for n, what in plan.items() if what == "convert"]
    dense = {n: what for n, what in plan.items() if what != "convert"}
    if not names:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(dense.items())[:5]) + (
            "; ..." if len(dense) > 5 else "") if dense else "the model has no Linear"
        raise ValueError(f"no Linear weight of the model can be converted to 2:4 ({reasons})")
    result = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    modules = dict(result.named_modules())
    with torch.no_grad():
        for name in names:
            path, _, _ = name.rpartition(".")
            linear = modules[path]
            weight = linear.weight.detach()
            if masks is not None:
                weight = weight.masked_fill(~masks[name].to(device=device, dtype=torch.bool), 0)
            linear.weight = nn.Parameter(_compress(weight.contiguous()), requires_grad=False)
    LOG.info("2:4 semi-structured: converted %s; left dense: %s", ", ".join(names),
             "; ".join(f"{n} ({r})" for n, r in dense.items()) or "none")
    return SemiStructured(result, names, dense)
