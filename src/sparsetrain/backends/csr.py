"""Compressed sparse row (CSR) weights: a Linear layer whose cost scales with its density.

``CSRLinear`` keeps its weight as a 1-D parameter of the ``nnz`` active values, with the row
pointers and column indices as buffers. Its autograd function computes

- forward ``y = x W^T + b`` as a sparse-dense product,
- the input gradient ``grad_x = grad_y W`` as the transposed sparse product,
- the weight gradient only at the non-zeros, ``grad_W[r, c] = sum_b grad_y[b, r] x[b, c]``,
  by a sampled dense-dense product.

On the CPU (float32 and float64) these run as the compiled OpenMP kernels of
``csrc/csr_kernels.cpp``; elsewhere, or where the kernels cannot be built, as torch's own sparse
operations. Standard torch optimizers work on the values parameter unchanged.

For RigL the layer can also keep, on request, the input and output gradient of a step
(``capture``), from which the dense weight gradient is computed later in blocks of rows.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..kernels import compiled_kernels


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support "beta" on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, dtype=values.dtype,
                                       device=values.device, check_invariants=False)


def _use_kernels(x: torch.Tensor, values: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == values.dtype
            and x.dtype in (torch.float32, torch.float64) and compiled_kernels() is not None)


class _CSRLinearFunction(torch.autograd.Function):
    """``x W^T`` for a CSR ``W``; ``capture`` (a list or None) receives ``(x, grad_y)``."""

    @staticmethod
    def forward(ctx, x, values, crow, col, shape, capture):
        ctx.kernels = _use_kernels(x, values)
        ctx.shape = shape
        ctx.capture = capture
        if ctx.kernels:  # the batch packed in tiles: see csrc/csr_kernels.cpp
            kernels = compiled_kernels()
            x_tiles = kernels.pack_tiles(x.t())  # free of a transpose after a CSR layer
            y = kernels.csr_forward(crow, col, values.contiguous(), x_tiles, shape[0],
                                    shape[1], x.shape[0]).t()
            ctx.save_for_backward(x_tiles, values, crow, col)
        else:
            y = (_csr(crow, col, values, shape) @ x.t()).t()
            ctx.save_for_backward(x, values, crow, col)
        if capture is not None:
            ctx.x = x
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved, values, crow, col = ctx.saved_tensors
        out_features, in_features = ctx.shape
        grad_x = grad_values = None
        if ctx.capture is not None:
            ctx.capture.append((ctx.x, grad_y))
        if ctx.kernels:
            kernels, batch = compiled_kernels(), grad_y.shape[0]
            gy_tiles = kernels.pack_tiles(grad_y.t())
            if ctx.needs_input_grad[0]:
                grad_x = kernels.csr_input_grad(crow, col, values.contiguous(), gy_tiles,
                                                in_features, batch).t()
            if ctx.needs_input_grad[1]:
                grad_values = kernels.csr_weight_grad(crow, col, gy_tiles, saved, in_features,
                                                      batch)
        else:
            x, grad_y_t = saved, grad_y.t().contiguous()
            if ctx.needs_input_grad[0]:
                grad_x = (_csr(crow, col, values, ctx.shape).t() @ grad_y_t).t()
            if ctx.needs_input_grad[1]:
                template = _csr(crow, col, torch.zeros_like(values), ctx.shape)
                sampled = torch.sparse.sampled_addmm(template, grad_y_t, x, beta=0.0)
                grad_values = sampled.values()
        return grad_x, grad_values, None, None, None, None


def _row_pointers(rows: torch.Tensor, out_features: int) -> torch.Tensor:
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return crow


def csr_structure(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row pointers and column indices (and the row of every non-zero) of a 2-D bool mask."""
    if mask.dim() != 2:
        raise ValueError(f"a CSR weight needs a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    return {"rows": rows, "crow": _row_pointers(rows, mask.shape[0]), "col": cols}


def _default_init(generator: torch.Generator, n: int, fan_in: int, dtype, device):
    """Values drawn as ``nn.Linear`` initialises its weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    return values.to(device=device, dtype=dtype)


class CSRLinear(nn.Module):
    """A Linear layer with a CSR weight: memory and products proportional to its non-zeros.

    ``values`` (the ``nnz`` active weights, row-major) is the only weight parameter; ``crow``
    (``out_features + 1`` row pointers) and ``col`` (column of each value) are buffers, so they
    travel with ``state_dict()``. ``bias`` is the given parameter itself (not a copy), so an
    optimizer that already holds it keeps updating it.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if weight.shape != mask.shape or weight.dim() != 2:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must "
                             "be the same 2-D shape")
        self.out_features, self.in_features = weight.shape
        structure = csr_structure(mask.to(device=weight.device, dtype=torch.bool))
        self.register_buffer("crow", structure["crow"])
        self.register_buffer("col", structure["col"])
        self.values = nn.Parameter(weight.detach()[structure["rows"], structure["col"]].clone())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(
            bias.detach().clone())
        self.capture: list | None = None  # set to a list to keep (x, grad_y) of each backward

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "CSRLinear":
        """The layer of ``linear`` with the weights at ``mask``; shares ``linear.bias``."""
        return cls(linear.weight, mask, linear.bias)

    @classmethod
    def from_positions(cls, positions: torch.Tensor, values: torch.Tensor, shape,
                       bias: torch.Tensor | None = None) -> "CSRLinear":
        """A layer from sorted flat positions ``row * in_features + col`` and their values."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = (int(s) for s in shape)
        layer.register_buffer("crow", torch.zeros(layer.out_features + 1, dtype=torch.int64,
                                                  device=values.device))
        layer.register_buffer("col", torch.zeros(0, dtype=torch.int64, device=values.device))
        layer.values = nn.Parameter(values.detach().clone())
        layer.bias = bias
        layer.capture = None
        layer.set_positions(positions)
        return layer

    # --- structure ------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.values.numel()

    def rows(self) -> torch.Tensor:
        """The row of every non-zero."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device),
                                       counts)

    def positions(self) -> torch.Tensor:
        """Sorted flat positions ``row * in_features + col`` of the non-zeros."""
        return self.rows() * self.in_features + self.col

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor) -> None:
        """Point the structure at the sorted flat ``positions`` (as many as there are values)."""
        positions = positions.to(device=self.values.device, dtype=torch.int64)
        if positions.numel() != self.values.numel():
            raise ValueError(f"{positions.numel()} positions for {self.values.numel()} values")
        rows = torch.div(positions, self.in_features, rounding_mode="floor")
        self.crow = _row_pointers(rows, self.out_features)
        self.col = positions - rows * self.in_features

    def empty_rows(self) -> int:
        """How many output units have no active input (they output only their bias)."""
        return int((self.crow[1:] == self.crow[:-1]).sum())

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros where inactive)."""
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype,
                             device=self.values.device)
        weight[self.rows(), self.col] = self.values.detach()
        return weight

    def dense_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the weight as a dense tensor (zeros where inactive)."""
        k0, k1 = int(self.crow[r0]), int(self.crow[r1])
        counts = self.crow[r0 + 1:r1 + 1] - self.crow[r0:r1]
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=counts.device), counts)
        block = torch.zeros(r1 - r0, self.in_features, dtype=self.values.dtype,
                            device=self.values.device)
        block[rows, self.col[k0:k1]] = self.values.detach()[k0:k1]
        return block

    def forward_flops(self, inputs, output) -> tuple[float, float]:
        """FLOPs of the forward pass that produced ``output``: (weight products, bias
        additions); each non-zero is one multiply-add (2 FLOPs) per output row."""
        per_row = output.numel() // self.out_features
        return 2.0 * self.nnz * per_row, float(output.numel()) if self.bias is not None else 0.0

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.values.device)
        mask[self.rows(), self.col] = True
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CSRLinear expects inputs with {self.in_features} features in "
                             f"the last dimension, got shape {tuple(x.shape)}")
        if self.values.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"CSRLinear holds float32 or float64 values, not "
                             f"{self.values.dtype} (was the model converted, e.g. by .half(), "
                             "after backend='csr' was set up?); keep the weights in float32 "
                             "(autocast still runs the rest in lower precision) or use "
                             "backend='masked'")
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != self.values.dtype:
            flat = flat.to(self.values.dtype)
        y = _CSRLinearFunction.apply(flat, self.values, self.crow, self.col,
                                     (self.out_features, self.in_features), self.capture)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")
