"""The CSR product as ``torch.library`` custom operators, so that ``torch.compile`` traces it.

``sparsetrain::csr_linear(x, values, crow, col, t_crow, t_row, t_perm, in_features, layer,
bias=None, relu=False) -> (y, saved)`` computes ``y = x W^T (+ bias)``, or with ``relu``
``y = relu(x W^T (+ bias))``, for the CSR weight ``W`` (rows given by ``crow``, columns by
``col``; ``t_crow``, ``t_row`` and ``t_perm`` give the structure of ``W^T``, see ``CSRLinear``
and :func:`transpose`; every index array is int32, :data:`INDEX`; the bias and the ReLU are
applied by the kernel as it writes ``y``); ``saved`` is what its backward reads: on the CPU
``x`` packed in batch tiles (by the kernels, or by torch where they cannot be built, so that a
compiled graph means the same either way: torch's graph caches may hand it to another process),
an empty tensor elsewhere; with the ReLU fused, autograd also keeps ``y`` itself.
``sparsetrain::csr_linear_backward`` gives the input gradient ``grad_y W`` (with the kernels:
the forward product of ``W^T``) and the gradient of the values, ``grad_y^T x`` at the
non-zeros; with the ReLU fused it takes ``y`` and uses ``grad_y`` zeroed where ``y <= 0``
(masked by the kernels as they pack it, which also sum it for the bias gradient; by torch's
``threshold_backward`` in the fallback). Both have fake (meta) implementations, so Dynamo and
AOTAutograd see them as single graph nodes with known shapes and strides, and the autograd
formula is registered with ``register_autograd``.

On the CPU they run the OpenMP kernels of ``csrc/csr_kernels.cpp`` in float64, float32,
bfloat16 and float16 (the 16-bit types summed in float32 and rounded once); where the kernels
cannot be built, torch's sparse CSR operations, which on the CPU take only float32 and float64:
there the 16-bit types are computed in float32 and rounded back, with a warning (once).

RigL reads the dense weight gradient of update steps from the input and output gradient of each
layer (``CSRLinear.capture``). The backward operator records them: ``layer`` is a handle (from
:func:`register_layer`) through which it finds the layer at run time and appends
``(x, grad_y)`` to its ``capture`` list when that is not None (with the ReLU fused, the masked
``grad_y``: the gradient of ``x W^T + b``, from which the dense weight gradient follows). The
decision is taken when the operator runs, not when it is traced, so one compiled graph serves
every step, update steps included. The recorded tensors are copies (a compiled graph may reuse
its buffers) in the dtype of the layer's values.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

from typing import Optional

import torch
from torch import Tensor

from ..kernels import compiled_kernels

#: The dtypes of CSR values and inputs.
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: Those torch's sparse CSR operations take on the CPU (others run in float32 there).
FALLBACK_DTYPES = (torch.float64, torch.float32)
#: The dtype of every index array: row pointers, columns, W^T's structure, block metadata.
INDEX = torch.int32

_LAYERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count()
_WARNED: set[str] = set()


def register_layer(layer) -> int:
    """A handle through which the operators find ``layer`` (its ``capture`` and values dtype)
    at run time; the layer is held weakly."""
    handle = next(_HANDLES)
    _LAYERS[handle] = weakref.ref(layer, lambda _, handle=handle: _LAYERS.pop(handle, None))
    return handle


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning the first time ``key`` comes up in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_kernels(x: Tensor) -> bool:
    """Whether the compiled kernels compute a product with input ``x``."""
    return x.device.type == "cpu" and x.dtype in DTYPES and compiled_kernels() is not None


def tile_width(dtype: torch.dtype) -> int:
    """Batch examples per packed tile of the kernels (csr_kernels.cpp: tile_width)."""
    return 32 if dtype == torch.float64 else 64


def packs(x: Tensor) -> bool:
    """Whether the forward operators save their input packed in tiles: on the CPU, whether or
    not the kernels could be built (torch packs it where they could not), so that a compiled
    graph, which torch's caches may hand to another process, means the same in both."""
    return x.device.type == "cpu" and x.dtype in DTYPES


def pack(x: Tensor) -> Tensor:
    """``x`` (batch, features) packed in tiles (tiles, features, width), zero-padded."""
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.pack_rows(x)
    width = tile_width(x.dtype)
    n = (x.shape[0] + width - 1) // width
    padded = x.new_zeros((n * width, x.shape[1]))
    padded[:x.shape[0]] = x
    return padded.view(n, width, x.shape[1]).transpose(1, 2).contiguous()


def unpack(tiles: Tensor, batch: int) -> Tensor:
    """The (batch, features) rows of packed ``tiles``."""
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.unpack_rows(tiles, batch)
    return tiles.transpose(1, 2).reshape(-1, tiles.shape[1])[:batch].contiguous()


def check_index_range(out_features: int, in_features: int, nnz: int) -> None:
    """ValueError unless the indices of a ``out_features x in_features`` weight with ``nnz``
    non-zeros fit :data:`INDEX` (int32)."""
    limit = torch.iinfo(INDEX).max
    if max(out_features, in_features, nnz) > limit:
        raise ValueError(f"a CSR weight of {out_features}x{in_features} with {nnz} non-zeros "
                         f"does not fit int32 indices: its dimensions and its number of "
                         f"non-zeros must stay below 2**31; use backend='masked'")


def row_pointers(rows: Tensor, n: int) -> Tensor:
    """The ``n + 1`` pointers (:data:`INDEX`) of the rows ``rows`` (sorted) of a CSR structure."""
    ptr = torch.zeros(n + 1, dtype=INDEX, device=rows.device)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return ptr


def transpose(crow: Tensor, col: Tensor, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """The structure of ``W^T`` for the CSR structure ``(crow, col)`` of a weight with ``cols``
    columns: its row pointers, the row of ``W`` of each of its non-zeros and their places in
    ``W``'s order (all :data:`INDEX`), non-zeros by column and rows in order within one. A
    counting sort on the CPU with the kernels, O(nnz + cols); a stable argsort otherwise."""
    kernels = compiled_kernels()
    if kernels is not None and col.device.type == "cpu":
        return tuple(kernels.csr_transpose(crow.contiguous(), col.contiguous(), cols))
    perm = torch.argsort(col, stable=True)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=col.device),
                                   crow[1:] - crow[:-1])
    return (row_pointers(col, cols), rows.index_select(0, perm).to(INDEX), perm.to(INDEX))


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support "beta" on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, dtype=values.dtype,
                                       device=values.device, check_invariants=False)


def _fallback_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's sparse operations compute ``dtype`` in, warning if it is another."""
    if dtype in FALLBACK_DTYPES:
        return dtype
    warn_once(f"fallback-{dtype}",
              f"sparsetrain: the compiled CSR kernels are not available, and torch's sparse CSR "
              f"operations do not take {dtype}: CSR products run in float32 and are rounded to "
              f"{dtype} (slower than the kernels; see the warning on why they did not build)")
    return torch.float32


def _check(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"csr_linear: expected inputs of shape (batch, {in_features}), got "
                         f"{tuple(x.shape)}")
    if x.dtype != values.dtype or x.dtype not in DTYPES:
        raise ValueError(f"csr_linear: inputs ({x.dtype}) and values ({values.dtype}) must be "
                         f"one of {', '.join(str(d) for d in DTYPES)}, the same for both")
    if crow.dtype != INDEX or col.dtype != INDEX:
        raise ValueError(f"csr_linear: crow and col must be int32, got {crow.dtype} and "
                         f"{col.dtype}")


def check_bias(bias: Tensor | None, rows: int, x: Tensor, what: str) -> None:
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x.dtype):
        raise ValueError(f"{what}: bias of shape ({rows},) in {x.dtype} expected, got "
                         f"{tuple(bias.shape)} in {bias.dtype}")


@torch.library.custom_op("sparsetrain::csr_linear", mutates_args=())
def csr_linear(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor,
               t_row: Tensor, t_perm: Tensor, in_features: int, layer: int,
               bias: Optional[Tensor] = None, relu: bool = False) -> tuple[Tensor, Tensor]:
    """``(x W^T + bias, saved)`` for ``x`` (batch, in_features), or with ``relu``
    ``(relu(x W^T + bias), saved)``; ``layer`` is a handle from :func:`register_layer`, or -1;
    the bias (optional, in ``x``'s dtype) and the ReLU are applied as the kernel writes ``y``."""
    _check(x, values, crow, col, in_features)
    rows, batch = crow.shape[0] - 1, x.shape[0]
    check_bias(bias, rows, x, "csr_linear")
    if use_kernels(x):
        kernels = compiled_kernels()
        tiles = kernels.pack_rows(x)
        y = kernels.csr_forward(crow, col, values.contiguous(), tiles, rows, in_features, batch,
                                bias, relu)
        return y, tiles
    y = torch_product(x, values, crow, col, in_features, bias, relu)
    return y, pack(x) if packs(x) else x.new_empty(0)


def torch_product(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, in_features: int,
                  bias: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``x W^T (+ bias)``, with ``relu`` its ReLU, by torch's sparse CSR product: where the
    kernels cannot compute it (the 16-bit types in float32 on the CPU, rounded back)."""
    compute = _fallback_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen already
        y_t = _csr(crow, col, values.to(compute), (crow.shape[0] - 1, in_features)) \
            @ x.t().to(compute)
        if bias is not None:
            y_t = y_t + bias.to(compute)[:, None]
        if relu:
            y_t = torch.relu(y_t)
    return y_t.t().to(x.dtype).contiguous()


@csr_linear.register_fake
def _csr_linear_fake(x, values, crow, col, t_crow, t_row, t_perm, in_features, layer,
                     bias=None, relu=False):
    rows, batch = crow.shape[0] - 1, x.shape[0]
    return x.new_empty((batch, rows)), _saved_fake(x, in_features)


def _saved_fake(x: Tensor, in_features: int) -> Tensor:
    if packs(x):
        width = tile_width(x.dtype)
        return x.new_empty(((x.shape[0] + width - 1) // width, in_features, width))
    return x.new_empty(0)


def capturing(layer: int) -> bool:
    """Whether layer handle ``layer`` has a capture list now (so that the backward pass need
    not unpack its saved input otherwise)."""
    module = _LAYERS[layer]() if layer in _LAYERS else None
    return module is not None and module.capture is not None


def _record(layer: int, x: Tensor, grad_y: Tensor) -> None:
    """Append copies of ``(x, grad_y)`` to the capture list of layer handle ``layer``, if it
    has one."""
    module = _LAYERS[layer]() if layer in _LAYERS else None
    if module is None or module.capture is None:
        return
    dtype = module.values.dtype
    module.capture.append((x.to(dtype, copy=True), grad_y.to(dtype, copy=True)))


@torch.library.custom_op("sparsetrain::csr_linear_backward", mutates_args=())
def csr_linear_backward(grad_y: Tensor, saved: Tensor, values: Tensor, crow: Tensor,
                        col: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor,
                        in_features: int, layer: int, need_input: bool, need_values: bool,
                        y: Optional[Tensor] = None,
                        need_bias: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_y W, grad_y^T x at the non-zeros, grad_bias)``; ``saved`` is the packed ``x``
    on the CPU (see :func:`packs`), ``x`` itself elsewhere. With ``y``, the output of a fused
    ReLU, ``grad_y`` is first masked where ``y <= 0`` (see :func:`gradient_tiles`) and
    ``grad_bias`` is the masked ``grad_y`` summed over the batch if ``need_bias``; without,
    ``grad_bias`` is empty (the caller sums ``grad_y``). A gradient not needed comes back
    empty."""
    rows, batch = crow.shape[0] - 1, grad_y.shape[0]
    if use_kernels(grad_y):
        kernels = compiled_kernels()
        gy_tiles, grad_bias = gradient_tiles(kernels, grad_y, saved, layer, y, need_bias)
        grad_x, grad_values = grad_y.new_empty(0), grad_y.new_empty(0)
        if need_input:
            values_t = values.index_select(0, t_perm)  # (faster than values[t_perm])
            grad_x = kernels.csr_forward(t_crow, t_row, values_t, gy_tiles, in_features, rows,
                                         batch)
        if need_values:
            grad_values = kernels.csr_weight_grad(crow, col, gy_tiles, saved, in_features,
                                                  batch)
        return grad_x, grad_values, grad_bias
    return fallback_backward(grad_y, saved, values, crow, col, in_features, layer, need_input,
                             need_values, y, need_bias)


def gradient_tiles(kernels, grad_y: Tensor, saved: Tensor, layer: int, y: Tensor | None = None,
                   need_bias: bool = False) -> tuple[Tensor, Tensor]:
    """``(grad_y packed for the kernels' backward products, grad_bias)``. With ``y``, the
    output of a fused ReLU, ``grad_y`` is zeroed where ``y <= 0`` as it is packed, and summed
    over the batch on the way if ``need_bias`` (else, and without ``y``, ``grad_bias`` is
    empty). ``(x, grad_y)``, the masked ``grad_y`` with ``y``, is recorded for layer handle
    ``layer`` if it is capturing (the saved input and the masked gradient unpacked only then)."""
    if y is None:
        tiles, grad_bias = kernels.pack_rows(grad_y), grad_y.new_empty(0)
    else:
        tiles, grad_bias = kernels.pack_masked(grad_y, y, need_bias)
    if layer >= 0 and capturing(layer):
        batch = grad_y.shape[0]
        _record(layer, kernels.unpack_rows(saved, batch),
                grad_y if y is None else kernels.unpack_rows(tiles, batch))
    return tiles, grad_bias


def fallback_backward(grad_y, saved, values, crow, col, in_features, layer, need_input,
                      need_values, y=None, need_bias=False):
    """``(grad_x, grad_values, grad_bias)`` by torch's sparse operations (any layout of the same
    non-zeros: the values are in CSR order), with ``grad_y`` masked where the fused ReLU's
    output ``y`` is <= 0 if given (as :func:`csr_linear_backward`), after recording ``(x,
    grad_y)`` for layer handle ``layer``."""
    x = unpack(saved, grad_y.shape[0]) if packs(grad_y) else saved
    grad_bias = grad_y.new_empty(0)
    with torch.autocast(grad_y.device.type, enabled=False):  # the dtypes are chosen already
        if y is not None:
            grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)  # torch.relu's own rule
            if need_bias:
                grad_bias = grad_y.sum(0)
        if layer >= 0:
            _record(layer, x, grad_y)
        return (*_fallback_backward(grad_y, x, values, crow, col, in_features, need_input,
                                    need_values), grad_bias)


def _fallback_backward(grad_y, x, values, crow, col, in_features, need_input, need_values):
    """csr_linear_backward by torch's sparse operations."""
    rows = crow.shape[0] - 1
    compute = _fallback_dtype(grad_y.dtype)
    grad_y_t = grad_y.t().to(compute).contiguous()
    shape = (rows, in_features)
    grad_x, grad_values = grad_y.new_empty(0), grad_y.new_empty(0)
    if need_input:
        grad_x = (_csr(crow, col, values.to(compute), shape).t() @ grad_y_t)
        grad_x = grad_x.t().to(grad_y.dtype).contiguous()
    if need_values:
        template = _csr(crow, col, torch.zeros(values.shape, dtype=compute,
                                               device=values.device), shape)
        sampled = torch.sparse.sampled_addmm(template, grad_y_t, x.to(compute), beta=0.0)
        grad_values = sampled.values().to(grad_y.dtype, copy=True)
    return grad_x, grad_values


@csr_linear_backward.register_fake
def _csr_linear_backward_fake(grad_y, saved, values, crow, col, t_crow, t_row, t_perm,
                              in_features, layer, need_input, need_values, y=None,
                              need_bias=False):
    return backward_fake(grad_y, values, in_features, need_input, need_values, y, need_bias)


def backward_fake(grad_y, values, in_features, need_input, need_values, y, need_bias):
    """The shapes of the backward operators' ``(grad_x, grad_values, grad_bias)``."""
    batch = grad_y.shape[0]
    grad_x = grad_y.new_empty((batch, in_features) if need_input else (0,))
    grad_values = values.new_empty(values.shape) if need_values else grad_y.new_empty(0)
    with_bias = y is not None and need_bias
    return grad_x, grad_values, grad_y.new_empty((grad_y.shape[1],) if with_bias else (0,))


def _setup_context(ctx, inputs, output):
    x, values, crow, col, t_crow, t_row, t_perm, in_features, layer, _bias, relu = inputs
    y, saved = output
    ctx.save_for_backward(saved if packs(x) else x, values, crow, col, t_crow, t_row,
                          t_perm, *((y,) if relu else ()))  # the fused ReLU's mask is y > 0
    ctx.in_features, ctx.layer, ctx.relu = in_features, layer, relu
    ctx.mark_non_differentiable(saved)


def backward_with_bias(op, ctx, grad_y, *args, bias_at: int):
    """``(grad_x, grad_values, grad_bias)`` of a forward operator (its inputs from ``ctx``,
    the bias at ``bias_at``) by its backward ``op``, called with ``args`` after the tensors
    saved, each gradient None where not needed: with the ReLU fused ``op`` masks ``grad_y``
    and sums the bias gradient, without it the bias gradient is ``grad_y`` summed here."""
    need_input, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = len(ctx.needs_input_grad) > bias_at and ctx.needs_input_grad[bias_at]
    if ctx.relu:
        *saved, y = ctx.saved_tensors
        grad_x, grad_values, grad_bias = op(grad_y, *saved, *args, need_input, need_values, y,
                                            need_bias)
    else:
        grad_x, grad_values, _ = op(grad_y, *ctx.saved_tensors, *args, need_input, need_values)
        grad_bias = grad_y.sum(0) if need_bias else None
    return (grad_x if need_input else None, grad_values if need_values else None,
            grad_bias if need_bias else None)


def _backward(ctx, grad_y, _grad_saved):
    grad_x, grad_values, grad_bias = backward_with_bias(
        csr_linear_backward, ctx, grad_y, ctx.in_features, ctx.layer, bias_at=9)
    n_inputs = len(ctx.needs_input_grad)  # 9, 10 with a bias, 11 with the ReLU fused
    return (grad_x, grad_values, *([None] * 7), grad_bias, None)[:n_inputs]


csr_linear.register_autograd(_backward, setup_context=_setup_context)
