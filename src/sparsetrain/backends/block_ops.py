"""Block-sparse products: ``CSRLinear`` with its weights in aligned blocks of R x C.

A layer whose active weights come in aligned blocks of ``R`` outputs x ``C`` inputs keeps its
values in the same CSR order as any other (row-major sorted positions), so value (block row
``br``, its ``j``-th block, local row ``i``, local column ``c``) sits at
``crow[br * R + i] + j * C + c``. :func:`block_structure` checks that positions tile so and
builds what the products need:

- ``b_ptr`` (``out / R + 1``): the block row pointers, counted in blocks;
- ``b_col``: the block column of every block (its inputs are ``b_col * C .. + C - 1``);
- ``t_ptr`` (``in / C + 1``), ``t_brow`` and ``t_blk``: the blocks of ``W^T`` by block column,
  with their block row and their ordinal among ``W``'s blocks (for the input gradient of
  blocks wider than tall, which is the forward product of ``W^T``).

All of them are int32, as the layer's ``crow`` and ``col`` (:data:`.csr_ops.INDEX`).

``sparsetrain::block_linear`` and ``sparsetrain::block_linear_backward`` are the custom
operators (fake implementations and a registered autograd, as :mod:`.csr_ops`). On the CPU they
run the OpenMP kernels of ``csrc/csr_kernels.cpp``: in the forward product one load of an input
slice serves the R rows of a block (and the bias, and a fused ReLU, are applied as ``y`` is
written; the backward then packs ``grad_y`` masked where ``y <= 0`` once, for all three
products, as :mod:`.csr_ops` does); the input gradient runs along ``W``'s rows for blocks at
least as tall as wide (a block row's R gradient slices in registers, added into the grad_x
slices its blocks touch) and as the forward product of ``W^T`` otherwise (one gradient slice
for the C rows of ``W^T``'s block); the weight gradient takes a block row's shared column list
in groups of rows x columns, each sum over every tile before its lanes are reduced. Elsewhere,
or where the kernels cannot be built, the CSR operators' own fallback through torch's sparse
operations computes the same products. The capture of ``(x, grad_y)`` for RigL works as for
:func:`.csr_ops.csr_linear`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import compiled_kernels
from .csr_ops import (INDEX, _check, _saved_fake, backward_fake, backward_with_bias,
                      check_bias, csr_linear, fallback_backward, gradient_tiles, packs,
                      transpose, use_kernels)


def _bad(shape, block, why: str) -> ValueError:
    return ValueError(f"positions of a {shape[0]}x{shape[1]} weight do not tile into aligned "
                      f"{block[0]}x{block[1]} blocks: {why}")


@torch.no_grad()
def block_structure(crow: Tensor, col: Tensor, shape, block) -> dict[str, Tensor]:
    """The block metadata of a CSR structure (``crow``, ``col``) of a ``shape`` weight in
    aligned ``block = (R, C)`` blocks; ValueError where its positions do not tile so.
    O(nnz) checks, and the blocks (not the values) sorted by column for ``W^T``
    (:func:`.csr_ops.transpose` of the block structure)."""
    out_f, in_f = (int(s) for s in shape)
    r, c = (int(b) for b in block)
    if r < 1 or c < 1 or out_f % r or in_f % c:
        raise ValueError(f"block {r}x{c} does not tile a {out_f}x{in_f} weight (R must divide "
                         f"the outputs and C the inputs)")
    counts = crow[1:] - crow[:-1]
    per_block_row = counts.view(-1, r)
    if not bool((per_block_row == per_block_row[:, :1]).all()):
        raise _bad(shape, block, "the rows of a block row hold different numbers of weights")
    if bool((counts % c).any()):
        raise _bad(shape, block, f"a row holds a number of weights that is not a multiple of {c}")
    rows = torch.repeat_interleave(torch.arange(out_f, device=col.device), counts)
    local = torch.arange(col.numel(), device=col.device) - crow[rows]  # index within its row
    if bool((col % c != local % c).any()):
        raise _bad(shape, block, "a weight's column is out of place within its block")
    group_start = torch.arange(col.numel(), device=col.device) - local % c
    if bool((col // c != col.index_select(0, group_start) // c).any()):
        raise _bad(shape, block, f"a row's weights do not come in runs of {c} aligned columns")
    leader = crow.index_select(0, (rows // r) * r) + local  # same place, block row's first row
    if bool((col != col.index_select(0, leader)).any()):
        raise _bad(shape, block, "the rows of a block row hold different columns")
    b_ptr = torch.div(crow[::r], r * c, rounding_mode="floor").to(INDEX).contiguous()
    firsts = (rows % r == 0) & (local % c == 0)
    b_col = col[firsts].to(INDEX) // c
    assert b_col.numel() * r * c == col.numel()
    t_ptr, t_brow, t_blk = transpose(b_ptr, b_col, in_f // c)  # block rows in order
    return {"b_ptr": b_ptr, "b_col": b_col, "t_ptr": t_ptr, "t_brow": t_brow, "t_blk": t_blk}


#: The order of the block metadata in the operators' arguments.
BLOCK_KEYS = ("b_ptr", "b_col", "t_ptr", "t_brow", "t_blk")


def _dims(b_ptr: Tensor, block_rows: int) -> int:
    return (b_ptr.shape[0] - 1) * block_rows


@torch.library.custom_op("sparsetrain::block_linear", mutates_args=())
def block_linear(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, b_ptr: Tensor,
                 b_col: Tensor, t_ptr: Tensor, t_brow: Tensor, t_blk: Tensor, block_rows: int,
                 block_cols: int, in_features: int, layer: int, bias: Optional[Tensor] = None,
                 relu: bool = False) -> tuple[Tensor, Tensor]:
    """``(x W^T + bias, saved)`` for a weight in ``block_rows x block_cols`` blocks, or with
    ``relu`` ``(relu(x W^T + bias), saved)`` (the bias, in ``x``'s dtype, and the ReLU applied
    as the kernel writes ``y``); ``crow`` and ``col`` serve the fallback, ``layer`` is a handle
    from :func:`.csr_ops.register_layer`."""
    _check(x, values, crow, col, in_features)
    check_bias(bias, _dims(b_ptr, block_rows), x, "block_linear")
    if use_kernels(x):
        kernels = compiled_kernels()
        tiles = kernels.pack_rows(x)
        y = kernels.block_forward(b_ptr, b_col, values.contiguous(), tiles, block_rows,
                                  block_cols, in_features, x.shape[0], bias, relu)
        return y, tiles
    empty = crow.new_empty(0)
    return csr_linear(x, values, crow, col, empty, empty, empty, in_features, -1, bias, relu)


@block_linear.register_fake
def _block_linear_fake(x, values, crow, col, b_ptr, b_col, t_ptr, t_brow, t_blk, block_rows,
                       block_cols, in_features, layer, bias=None, relu=False):
    return x.new_empty((x.shape[0], _dims(b_ptr, block_rows))), _saved_fake(x, in_features)


def _input_grad(kernels, b_ptr, b_col, t_ptr, t_brow, t_blk, values, gy_tiles, block_rows,
                block_cols, in_features, batch):
    """``grad_y W`` by the kernel that suits the block shape: for blocks at least as tall as
    they are wide, along W's rows (the R gradient slices of a block row in registers, added
    into the slices of grad_x its blocks touch); for wider ones, as the forward product of
    ``W^T`` (C rows of a block served by one gradient slice). Measured on 4096 x 4096 at
    density 0.1: 4x4, 4x1, 8x1 and 16x1 run 1.6 to 2.5 times faster along rows, 1x4 1.25
    times faster as W^T's product."""
    if block_rows >= block_cols:
        return kernels.block_input_grad_rows(b_ptr, b_col, values, gy_tiles, block_rows,
                                             block_cols, in_features, batch)
    return kernels.block_input_grad(t_ptr, t_brow, t_blk, b_ptr, values, gy_tiles, block_rows,
                                    block_cols, batch)


@torch.library.custom_op("sparsetrain::block_linear_backward", mutates_args=())
def block_linear_backward(grad_y: Tensor, saved: Tensor, values: Tensor, crow: Tensor,
                          col: Tensor, b_ptr: Tensor, b_col: Tensor, t_ptr: Tensor,
                          t_brow: Tensor, t_blk: Tensor, block_rows: int, block_cols: int,
                          in_features: int, layer: int, need_input: bool, need_values: bool,
                          y: Optional[Tensor] = None,
                          need_bias: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_y W, grad_y^T x at the active blocks, grad_bias)``; ``saved`` is the packed
    ``x`` on the CPU (see :func:`.csr_ops.packs`), ``x`` itself elsewhere; ``y`` (the output of
    a fused ReLU) and ``grad_bias`` as for :func:`.csr_ops.csr_linear_backward`: ``grad_y`` is
    masked once, as it is packed, for all three kernels. A gradient not needed comes back
    empty."""
    batch = grad_y.shape[0]
    if use_kernels(grad_y):
        kernels = compiled_kernels()
        gy_tiles, grad_bias = gradient_tiles(kernels, grad_y, saved, layer, y, need_bias)
        grad_x, grad_values = grad_y.new_empty(0), grad_y.new_empty(0)
        if need_input:
            grad_x = _input_grad(kernels, b_ptr, b_col, t_ptr, t_brow, t_blk, values.contiguous(),
                                 gy_tiles, block_rows, block_cols, in_features, batch)
        if need_values:
            grad_values = kernels.block_weight_grad(b_ptr, b_col, gy_tiles, saved, block_rows,
                                                    block_cols, in_features, batch)
        return grad_x, grad_values, grad_bias
    return fallback_backward(grad_y, saved, values, crow, col, in_features, layer, need_input,
                             need_values, y, need_bias)


@block_linear_backward.register_fake
def _block_linear_backward_fake(grad_y, saved, values, crow, col, b_ptr, b_col, t_ptr, t_brow,
                                t_blk, block_rows, block_cols, in_features, layer, need_input,
                                need_values, y=None, need_bias=False):
    return backward_fake(grad_y, values, in_features, need_input, need_values, y, need_bias)


def _setup_context(ctx, inputs, output):
    (x, values, crow, col, *blocks, block_rows, block_cols, in_features, layer, _bias,
     relu) = inputs
    y, saved = output
    ctx.save_for_backward(saved if packs(x) else x, values, crow, col, *blocks,
                          *((y,) if relu else ()))  # the fused ReLU's mask is y > 0
    ctx.block, ctx.in_features, ctx.layer = (block_rows, block_cols), in_features, layer
    ctx.relu = relu
    ctx.mark_non_differentiable(saved)


def _backward(ctx, grad_y, _grad_saved):
    grad_x, grad_values, grad_bias = backward_with_bias(
        block_linear_backward, ctx, grad_y, *ctx.block, ctx.in_features, ctx.layer, bias_at=13)
    n_inputs = len(ctx.needs_input_grad)  # 13, 14 with a bias, 15 with the ReLU fused
    return (grad_x, grad_values, *([None] * 11), grad_bias, None)[:n_inputs]


block_linear.register_autograd(_backward, setup_context=_setup_context)
