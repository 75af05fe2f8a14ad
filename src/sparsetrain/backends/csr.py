"""Compressed sparse row (CSR) weights: a Linear layer whose cost scales with its density.

First step of the truly sparse backend: ``CSRLinear`` keeps its weight as a 1-D parameter of
the ``nnz`` active values, with the row pointers and column indices as buffers (and the
permutation to the transposed layout, so the backward pass needs no conversion). Its autograd
function computes

- forward ``y = x W^T + b`` as a sparse-dense product,
- the input gradient ``grad_x = grad_y W`` with the transposed sparse matrix,
- the weight gradient only at the non-zeros, ``grad_W[r, c] = sum_b grad_y[b, r] x[b, c]``,
  by a sampled dense-dense product.

Standard torch optimizers work on the values parameter unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support "beta" on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, dtype=values.dtype,
                                       device=values.device, check_invariants=False)


_KERNELS: Any = None


def compiled_kernels():
    """The OpenMP CSR kernels (built with the machine's g++ on first use and cached by torch),
    or ``None`` where they cannot be built: then torch's own sparse operations are used."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("csrc") / "csr_kernels.cpp"
            _KERNELS = load("sparsetrain_csr", [str(source)],
                            extra_cflags=["-O3", "-fopenmp", "-march=native"],
                            extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no headers, a failed build: fall back
            warnings.warn(f"sparsetrain: the compiled CSR kernels are not available ({exc}); "
                          "using torch's sparse operations, which are slower", RuntimeWarning,
                          stacklevel=2)
            _KERNELS = False
    return _KERNELS or None


def _use_kernels(x: torch.Tensor, values: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == values.dtype
            and x.dtype in (torch.float32, torch.float64) and compiled_kernels() is not None)


class _CSRLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, crow, col, t_crow, t_col, t_perm, shape):
        ctx.kernels = _use_kernels(x, values)
        ctx.shape = shape
        if ctx.kernels:  # features x batch layout: unit stride over the batch
            x_t = x.t().contiguous()
            y = compiled_kernels().csr_spmm(crow, col, values.contiguous(), x_t, shape[0]).t()
            ctx.save_for_backward(x_t, values, crow, col, t_crow, t_col, t_perm)
            return y
        weight = _csr(crow, col, values, shape)
        y = (weight @ x.t()).t()
        ctx.save_for_backward(x, values, crow, col, t_crow, t_col, t_perm)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
        out_features, in_features = ctx.shape
        grad_x = grad_values = None
        if ctx.kernels:
            kernels, x_t = compiled_kernels(), x
            grad_y_t = grad_y.t().contiguous()
            if ctx.needs_input_grad[0]:
                grad_x = kernels.csr_spmm(t_crow, t_col, values[t_perm].contiguous(), grad_y_t,
                                          in_features).t()
            if ctx.needs_input_grad[1]:
                grad_values = kernels.csr_sampled(crow, col, grad_y_t, x_t)
            return grad_x, grad_values, None, None, None, None, None, None
        grad_y = grad_y.contiguous()
        if ctx.needs_input_grad[0]:
            transposed = _csr(t_crow, t_col, values[t_perm], (in_features, out_features))
            grad_x = (transposed @ grad_y.t()).t()
        if ctx.needs_input_grad[1]:
            template = _csr(crow, col, torch.zeros_like(values), ctx.shape)
            sampled = torch.sparse.sampled_addmm(template, grad_y.t().contiguous(), x,
                                                 beta=0.0)
            grad_values = sampled.values()
        return grad_x, grad_values, None, None, None, None, None, None


def csr_structure(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row pointers, column indices and the transposed layout of a 2-D bool ``mask``."""
    if mask.dim() != 2:
        raise ValueError(f"a CSR weight needs a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.nonzero(as_tuple=True)           # row-major order
    out_features, in_features = mask.shape
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    t_order = torch.argsort(cols * out_features + rows)  # column-major order of the same nnz
    t_crow = torch.zeros(in_features + 1, dtype=torch.int64, device=mask.device)
    t_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=in_features), 0)
    return {"rows": rows, "crow": crow, "col": cols, "t_crow": t_crow, "t_col": rows[t_order],
            "t_perm": t_order}


class CSRLinear(nn.Module):
    """A Linear layer with a CSR weight: memory and products proportional to its non-zeros."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if weight.shape != mask.shape or weight.dim() != 2:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must "
                             "be the same 2-D shape")
        self.out_features, self.in_features = weight.shape
        structure = csr_structure(mask.to(device=weight.device, dtype=torch.bool))
        for name in ("crow", "col", "t_crow", "t_col", "t_perm", "rows"):
            self.register_buffer(name, structure[name])
        self.values = nn.Parameter(weight.detach()[self.rows, self.col].clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "CSRLinear":
        return cls(linear.weight, mask, linear.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros where inactive)."""
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype,
                             device=self.values.device)
        weight[self.rows, self.col] = self.values.detach()
        return weight

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.values.device)
        mask[self.rows, self.col] = True
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        y = _CSRLinearFunction.apply(flat, self.values, self.crow, self.col, self.t_crow,
                                     self.t_col, self.t_perm,
                                     (self.out_features, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")
