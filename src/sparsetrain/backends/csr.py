"""Compressed sparse row (CSR) weights: a Linear layer whose cost scales with its density.

``CSRLinear`` keeps its weight as a 1-D parameter of the ``nnz`` active values, with the row
pointers and column indices as buffers. Its operators compute

- forward ``y = x W^T + b`` as a sparse-dense product,
- the input gradient ``grad_x = grad_y W`` as the transposed sparse product,
- the weight gradient only at the non-zeros, ``grad_W[r, c] = sum_b grad_y[b, r] x[b, c]``,
  by a sampled dense-dense product.

The products are the custom operators of :mod:`.csr_ops` (the compiled OpenMP kernels of
``csrc/csr_kernels.cpp`` on the CPU, torch's own sparse operations elsewhere or where the
kernels cannot be built), which ``torch.compile`` traces as single graph nodes. Standard torch
optimizers work on the values parameter unchanged.

Values may be float32 or float64, or bfloat16 or float16 (a model converted before the
sparsifier was built). Under ``torch.autocast`` the layer does what ``nn.Linear`` does: inputs,
values and bias are cast to the autocast dtype (float64 values are left alone, as autocast
leaves float64 weights), the product is summed in float32 and returned in the autocast dtype,
and the values' gradient arrives in ``.grad`` in the values' own dtype. Outside autocast the
input is cast to the values' dtype.

A layer whose weights come in aligned blocks of R outputs x C inputs can be told so
(``set_block_shape((R, C))``): its values stay in the same order, and its products become the
block kernels of :mod:`.block_ops`, which load each activation slice once for a block's R rows.

A ReLU that follows the layer can be fused into it (``layer.activation = "relu"``): forward
returns ``relu(x W^T + b)``, the kernels taking ``max(0, .)`` of each sum (after the bias, in
float32 for the 16-bit types, before rounding) as they write ``y``, and the backward operators
mask the output gradient where ``y <= 0`` (relu's own rule, 0 at the kink) as they pack it,
summing the masked gradient for the bias on the way: no pass of its own over the activations
either way. The operators keep ``y`` for that (the tensor returned, not a copy).

For RigL the layer can also keep, on request, the input and output gradient of a step
(``capture``), from which the dense weight gradient is computed later in blocks of rows; with
the ReLU fused, the output gradient kept is the masked one (the gradient of ``x W^T + b``).

Inference: where no gradient can flow through the layer (under ``torch.no_grad()`` or
``torch.inference_mode()``, or when none of the input, values and bias requires grad, as in a
model from ``sparsetrain.deploy.load_sparse``), the forward product is
:func:`.csr_infer.csr_infer`, with the same dtypes, autocast, bias and fused ReLU, but no
autograd: nothing is packed or kept for a backward pass, and nothing is recorded into
``capture``. On the CPU, batches of up to :data:`.csr_infer.SPMV_MAX_BATCH` examples take the
sparse matrix-vector kernel ``csr_spmv`` (which reads the input as it is, instead of in tiles of
64 examples), block-shaped layers included; larger ones the same tile kernels as training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import compiled_kernels  # noqa: F401  (the benchmarks import it from here)
from .block_ops import BLOCK_KEYS, block_linear, block_structure
from .csr_infer import csr_infer, csr_infer_op
from .csr_ops import (DTYPES, INDEX, check_index_range, csr_linear, register_layer,
                      row_pointers, transpose)
from .optimizer_state import set_data

#: What ``CSRLinear.activation`` may be: None (no activation) or a ReLU fused into the kernels.
ACTIVATIONS = (None, "relu")

#: The index buffers of a layer (all :data:`.csr_ops.INDEX`, int32), those saved in its state
#: dict first.
INDEX_KEYS = ("crow", "col", "t_crow", "t_row", "t_perm", *BLOCK_KEYS)


def csr_structure(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row pointers and column indices (int32), and the row of every non-zero (int64), of a
    2-D bool mask; ValueError where they would not fit int32."""
    if mask.dim() != 2:
        raise ValueError(f"a CSR weight needs a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    check_index_range(*mask.shape, rows.numel())
    return {"rows": rows, "crow": row_pointers(rows, mask.shape[0]), "col": cols.to(INDEX)}


def _default_init(generator: torch.Generator, n: int, fan_in: int, dtype, device):
    """Values drawn as ``nn.Linear`` initialises its weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    return values.to(device=device, dtype=dtype)


class CSRLinear(nn.Module):
    """A Linear layer with a CSR weight: memory and products proportional to its non-zeros.

    ``values`` (the ``nnz`` active weights, row-major) is the only weight parameter; ``crow``
    (``out_features + 1`` row pointers) and ``col`` (column of each value) are int32 buffers, so
    they travel with ``state_dict()`` (int64 ones, as saved before, are converted on loading);
    dimensions and ``nnz`` must stay below 2**31 (ValueError otherwise). ``bias`` is the given
    parameter itself (not a copy), so an optimizer that already holds it keeps updating it.
    ``capture``, None or a list, receives ``(x, grad_y)`` of each backward pass (see
    :mod:`.csr_ops`, which finds the layer through its handle ``_handle``). ``activation``,
    None or ``"relu"`` (see :data:`ACTIVATIONS`), is applied to the output by the kernels; it
    is an attribute, not part of ``state_dict()``.

    The structure of ``W^T`` is kept too, as buffers left out of ``state_dict()`` and rebuilt
    whenever the structure changes (``set_positions``, loading a state dict): ``t_crow`` (its
    row pointers), ``t_row`` (the row of ``W`` of each of its non-zeros) and ``t_perm`` (where
    each sits in ``values``), int32 too, so that the input gradient ``grad_y W`` is a gathering
    product like the forward one instead of a scatter.

    The number of non-zeros may change (``set_positions`` with new values, the CSR backend's
    ``set_active`` for a method that prunes, loading a state dict of another size): ``values``
    stays the same ``nn.Parameter`` with new data, so an optimizer holding it keeps it. A layer
    may hold no weight at all (``nnz == 0``): it outputs its bias (through the activation).
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
        self.block_shape: tuple[int, int] | None = None
        self._transpose_structure()
        self.values = nn.Parameter(weight.detach()[structure["rows"], structure["col"]].clone())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(
            bias.detach().clone())
        self.capture: list | None = None  # set to a list to keep (x, grad_y) of each backward
        self._activation: str | None = None
        self._handle = register_layer(self)

    def __setstate__(self, state):
        """A copy (``copy.deepcopy``, unpickling) gets a handle of its own, so that its backward
        passes record into its own ``capture``."""
        super().__setstate__(state)
        self.__dict__.setdefault("block_shape", None)  # layers pickled before block shapes
        self.__dict__.setdefault("_activation", None)  # layers pickled before activations
        for key in INDEX_KEYS:  # layers pickled with int64 indices
            if key in self._buffers and self._buffers[key].dtype != INDEX:
                self._buffers[key] = self._buffers[key].to(INDEX)
        self._handle = register_layer(self)

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
        layer.register_buffer("crow", torch.zeros(layer.out_features + 1, dtype=INDEX,
                                                  device=values.device))
        layer.register_buffer("col", torch.zeros(0, dtype=INDEX, device=values.device))
        layer.values = nn.Parameter(values.detach().clone())
        layer.bias = bias
        layer.block_shape = None
        layer.capture = None
        layer._activation = None
        layer._handle = register_layer(layer)
        layer.set_positions(positions)
        return layer

    @property
    def activation(self) -> str | None:
        """The activation the kernels apply to the output: None or ``"relu"``."""
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"CSRLinear.activation must be one of {ACTIVATIONS}, got {value!r}")
        self._activation = value

    def __setattr__(self, name, value):
        if name == "activation":  # nn.Module would register a module value as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # --- structure ------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.values.numel()

    def rows(self) -> torch.Tensor:
        """The row of every non-zero (int64)."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device),
                                       counts)

    def positions(self) -> torch.Tensor:
        """Sorted flat positions ``row * in_features + col`` of the non-zeros (int64)."""
        return self.rows() * self.in_features + self.col

    @torch.no_grad()
    def indices_for(self, positions: torch.Tensor):
        """``(crow, col, blocks)`` of the sorted flat ``positions`` (any number of them): the
        row pointers and columns (int32) and, with a block shape, the block metadata (else
        None). Changes nothing; ValueError where they do not fit int32 indices or, with a block
        shape, do not tile into its aligned blocks. O(len(positions) + out + in)."""
        positions = positions.to(device=self.values.device, dtype=torch.int64)
        check_index_range(self.out_features, self.in_features, positions.numel())
        rows = torch.div(positions, self.in_features, rounding_mode="floor")
        crow = row_pointers(rows, self.out_features)
        col = (positions - rows * self.in_features).to(INDEX)
        return crow, col, self._blocks_of(crow, col)

    @torch.no_grad()
    def set_indices(self, crow: torch.Tensor, col: torch.Tensor, blocks: dict | None) -> None:
        """Take the structure ``indices_for`` built (the values must already be as many as
        ``col``, in its order)."""
        if col.numel() != self.values.numel():
            raise ValueError(f"{col.numel()} column indices for {self.values.numel()} values")
        self.crow, self.col = crow, col
        self._transpose_structure(blocks)

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Point the structure at the sorted flat ``positions``: as many as there are values,
        which keep their order, or, with ``values`` (one per position, in their order), any
        number of them, the values parameter staying the same object with new data (its
        ``.grad`` is dropped; an optimizer's state of it is the caller's, as the CSR backend
        does with :func:`.optimizer_state.take_state`). With a block shape set, positions that
        do not tile into its aligned blocks raise a ValueError and leave the layer as it was."""
        n = positions.numel()
        if values is None and n != self.values.numel():
            raise ValueError(f"{n} positions for {self.values.numel()} values; pass values= to "
                             "change their number")
        if values is not None and tuple(values.shape) != (n,):
            raise ValueError(f"{n} positions need {n} values, got shape {tuple(values.shape)}")
        indices = self.indices_for(positions)  # raises before anything changes
        if values is not None:
            self.values.grad = None
            set_data(self.values, values.detach().to(self.values).contiguous().clone())
        self.set_indices(*indices)

    def set_block_shape(self, shape: tuple[int, int] | None) -> None:
        """Compute with the block kernels for aligned ``(R, C)`` blocks (R outputs x C inputs),
        or, with None, with the unstructured ones. The current positions must tile into such
        blocks (ValueError otherwise, the layer left as it was), and so must those of every
        later ``set_positions`` and loaded state dict. The values keep their order either way."""
        old = self.block_shape
        self.block_shape = None if shape is None else (int(shape[0]), int(shape[1]))
        try:
            self._transpose_structure(self._blocks_of(self.crow, self.col))
        except ValueError:
            self.block_shape = old
            raise

    def _blocks_of(self, crow: torch.Tensor, col: torch.Tensor) -> dict | None:
        """The block metadata of ``crow``, ``col`` for the block shape (None without one)."""
        if self.block_shape is None:
            return None
        return block_structure(crow, col, (self.out_features, self.in_features),
                               self.block_shape)

    @torch.no_grad()
    def _transpose_structure(self, blocks: dict | None = None) -> None:
        """Rebuild the structure of ``W^T`` from ``crow`` and ``col``: with a block shape, the
        block metadata ``blocks`` (:func:`.block_ops.block_structure`, whose buffers ``b_ptr``
        .. ``t_blk`` it sets); without one, ``t_crow``, ``t_row`` and ``t_perm``. Those of the
        other kind are left empty."""
        empty = self.col.new_empty(0)
        for key in BLOCK_KEYS:
            self.register_buffer(key, empty if blocks is None else blocks[key], persistent=False)
        if blocks is not None:
            for key in ("t_crow", "t_row", "t_perm"):
                self.register_buffer(key, empty, persistent=False)
            return
        structure = transpose(self.crow, self.col, self.in_features)
        for key, tensor in zip(("t_crow", "t_row", "t_perm"), structure):
            self.register_buffer(key, tensor, persistent=False)

    def structure(self) -> tuple[torch.Tensor, ...]:
        """``(crow, col, t_crow, t_row, t_perm)``, as :func:`.csr_ops.csr_linear` takes them
        (not kept for a layer with a block shape, whose products take its block metadata)."""
        if self.block_shape is not None:
            raise RuntimeError("a CSRLinear with a block shape keeps the block structure of W^T "
                               "instead of t_crow, t_row and t_perm; call set_block_shape(None) "
                               "first for the unstructured one")
        return self.crow, self.col, self.t_crow, self.t_row, self.t_perm

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loads a state dict of any number of non-zeros: where the saved ``values`` and
        ``col`` are another number than the layer's, the values parameter (the same object)
        and ``col`` take the saved size first, dropping ``.grad`` (load the optimizer's state
        dict saved with it too). The saved structure is checked first (int32 range, block
        tiling): a ValueError leaves the layer as it was."""
        for key in ("crow", "col"):  # int64 in state dicts saved before int32 indices
            index = state_dict.get(prefix + key)
            if isinstance(index, torch.Tensor) and index.dtype == torch.int64:
                state_dict[prefix + key] = index.to(INDEX)
        crow, col = state_dict.get(prefix + "crow"), state_dict.get(prefix + "col")
        values = state_dict.get(prefix + "values")
        whole = all(isinstance(t, torch.Tensor) for t in (crow, col)) and crow.shape == \
            self.crow.shape
        blocks = None
        if whole and self.block_shape is not None:  # checked before anything is loaded
            blocks = self._blocks_of(crow.to(self.crow.device), col.to(self.col.device))
        if (whole and isinstance(values, torch.Tensor) and values.dim() == col.dim() == 1
                and values.numel() == col.numel() != self.values.numel()
                and int(crow[-1]) == col.numel()):
            check_index_range(self.out_features, self.in_features, col.numel())
            with torch.no_grad():  # another number of non-zeros: resized, then loaded
                self.values.grad = None
                set_data(self.values, self.values.new_zeros(values.numel()))
                self.col = self.col.new_zeros(col.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.col.numel() == self.values.numel():  # else load_state_dict reports the sizes
            self._transpose_structure(blocks if blocks is not None
                                      else self._blocks_of(self.crow, self.col))

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

    def forward_flops(self, inputs, output) -> tuple[float, ...]:
        """FLOPs of the forward pass that produced ``output``: (weight products, bias
        additions), and with an activation its FLOPs (one per output) third; each non-zero is
        one multiply-add (2 FLOPs) per output row."""
        per_row = output.numel() // self.out_features
        flops = (2.0 * self.nnz * per_row,
                 float(output.numel()) if self.bias is not None else 0.0)
        return flops if self.activation is None else (*flops, float(output.numel()))

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.values.device)
        mask[self.rows(), self.col] = True
        return mask

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the products: autocast's where it is on for the values' device (unless
        the values are float64, which autocast leaves alone), else the values' own."""
        device = self.values.device.type
        if self.values.dtype != torch.float64 and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.values.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CSRLinear expects inputs with {self.in_features} features in "
                             f"the last dimension, got shape {tuple(x.shape)}")
        if self.values.dtype not in DTYPES:
            raise ValueError(f"CSRLinear holds float64, float32, bfloat16 or float16 values, "
                             f"not {self.values.dtype}; convert the model to one of them before "
                             "building the sparsifier, or use backend='masked'")
        dtype = self.compute_dtype()
        if dtype not in DTYPES:
            raise ValueError(f"CSRLinear cannot compute in {dtype} (the autocast dtype); use "
                             "bfloat16 or float16 autocast, or backend='masked'")
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        values = self.values
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        if values.dtype != dtype:
            values = values.to(dtype)  # its backward returns the gradient in the values' dtype
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        relu = self.activation == "relu"
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (flat, values, bias))):
            y = self._infer(flat, values, bias, relu)  # no autograd: nothing kept or recorded
        elif self.block_shape is not None:  # the bias (and the ReLU) applied as the kernels write y
            y, _ = block_linear(flat, values, self.crow, self.col,
                                *(getattr(self, key) for key in BLOCK_KEYS), *self.block_shape,
                                self.in_features, self._handle, bias, relu)
        else:
            y, _ = csr_linear(flat, values, *self.structure(), self.in_features, self._handle,
                              bias, relu)
        return y.reshape(*shape[:-1], self.out_features)

    def _infer(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
               relu: bool) -> torch.Tensor:
        """The forward product without autograd (:func:`.csr_infer.csr_infer`; its custom
        operator while ``torch.compile`` traces the layer)."""
        infer = csr_infer_op if torch.compiler.is_compiling() else csr_infer
        blocks = () if self.block_shape is None else (self.b_ptr, self.b_col, *self.block_shape)
        return infer(x, values, self.crow, self.col, self.in_features, bias, relu, *blocks)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}"
                + ("" if self.block_shape is None
                   else f", block_shape={self.block_shape[0]}x{self.block_shape[1]}")
                + ("" if self.activation is None else f", activation={self.activation}"))
