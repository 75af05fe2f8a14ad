"""The CSR product for inference: ``y = x W^T (+ bias)``, or ``relu`` of it, with no autograd.

``CSRLinear`` computes through :func:`csr_infer` whenever no gradient can flow through it (under
``torch.no_grad()`` or ``torch.inference_mode()``, or when none of its input, values and bias
requires grad): nothing is packed for a backward pass, kept, or recorded into ``capture``.

On the CPU with the compiled kernels, batches of at most :data:`SPMV_MAX_BATCH` examples go to
``csr_spmv`` of ``csrc/csr_kernels.cpp``, which reads ``x`` in torch's own layout and gathers
each row's inputs (a tile kernel would multiply a whole tile of 64 examples for each non-zero,
most of them padding); larger batches go to the tile kernels the training path uses
(``csr_forward``, or ``block_forward`` for a layer with a block shape, whose values are in the
same CSR row order, so ``csr_spmv`` serves its small batches too). Elsewhere, or where the
kernels cannot be built, torch's sparse CSR product computes the same (the 16-bit types in
float32 on the CPU, as :mod:`.csr_ops` does).

``sparsetrain::csr_infer`` is the same function as a ``torch.library`` custom operator (with a
fake implementation and no autograd), which ``CSRLinear`` calls instead while ``torch.compile``
traces it, so that a compiled inference graph holds it as one node; eager calls skip the
operator's dispatch, which costs microseconds beside a small layer's product.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import compiled_kernels
from .csr_ops import _check, check_bias, torch_product, use_kernels

#: The largest batch computed by ``csr_spmv`` (its time grows with the batch, a tile kernel's
#: is that of 64 examples up to 64); larger ones by the tile kernels. On a 4096 x 4096 layer at
#: density 0.05 (Xeon, AVX-512, 2 threads; bfloat16 and float64) the two took the same time at
#: batch 8, and the tile kernel half as long at 16.
SPMV_MAX_BATCH = 8


def csr_infer(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, in_features: int,
              bias: Optional[Tensor] = None, relu: bool = False,
              b_ptr: Optional[Tensor] = None, b_col: Optional[Tensor] = None,
              block_rows: int = 0, block_cols: int = 0) -> Tensor:
    """``x W^T + bias``, or with ``relu`` ``relu(x W^T + bias)``, for ``x`` (batch,
    in_features) in the values' dtype and the CSR weight ``(crow, col, values)`` (int32
    indices); the bias (optional) in ``x``'s dtype. With ``b_ptr``, ``b_col``, ``block_rows``
    and ``block_cols`` (a layer with a block shape, see :mod:`.block_ops`), batches above
    :data:`SPMV_MAX_BATCH` take the block kernel. No autograd: call it where no gradient is
    needed."""
    _check(x, values, crow, col, in_features)
    rows, batch = crow.shape[0] - 1, x.shape[0]
    check_bias(bias, rows, x, "csr_infer")
    if use_kernels(x):
        kernels = compiled_kernels()
        if batch <= SPMV_MAX_BATCH:
            return kernels.csr_spmv(crow, col, values, x, bias, relu)
        tiles = kernels.pack_rows(x)
        if b_ptr is not None and b_col is not None:
            return kernels.block_forward(b_ptr, b_col, values.contiguous(), tiles, block_rows,
                                         block_cols, in_features, batch, bias, relu)
        return kernels.csr_forward(crow, col, values.contiguous(), tiles, rows, in_features,
                                   batch, bias, relu)
    return torch_product(x, values, crow, col, in_features, bias, relu)


@torch.library.custom_op("sparsetrain::csr_infer", mutates_args=())
def csr_infer_op(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, in_features: int,
                 bias: Optional[Tensor] = None, relu: bool = False,
                 b_ptr: Optional[Tensor] = None, b_col: Optional[Tensor] = None,
                 block_rows: int = 0, block_cols: int = 0) -> Tensor:
    """:func:`csr_infer` as a custom operator (for ``torch.compile``)."""
    return csr_infer(x, values, crow, col, in_features, bias, relu, b_ptr, b_col, block_rows,
                     block_cols)


@csr_infer_op.register_fake
def _csr_infer_fake(x, values, crow, col, in_features, bias=None, relu=False, b_ptr=None,
                    b_col=None, block_rows=0, block_cols=0):
    return x.new_empty((x.shape[0], crow.shape[0] - 1))
