"""The CSR backend: eligible Linear layers become ``CSRLinear``, updated in their compact form.

``backend="csr"`` converts, in place, every sparsified plain ``nn.Linear`` of the model into a
:class:`~sparsetrain.backends.csr.CSRLinear` (see :func:`~.conversion.csr_eligibility`; under a
``block:RxC`` structure it computes with the block kernels of :mod:`.block_ops`) and
hands the optimizer the layer's values parameter in place of the dense weight, with its state
gathered at the active positions. Other sparsified weights (convolutions, embeddings, ...) stay
masked-dense, in a :class:`~.masked.MaskedBackend` this backend delegates them to.

Nothing here builds a dense tensor of a CSR layer's size: the dense gradient a grow score reads
is computed block by block from the input and output gradient the layer recorded on the update
step, ``grad_W[rows] = grad_y[:, rows]^T x`` (under torch.distributed gathered from every rank
and averaged as DDP averages), and a block holds about twice the layer's non-zeros (within
``MIN_BLOCK_ELEMENTS`` and ``BLOCK_ELEMENTS``). Layers on the ``meta`` device are
materialised with only their active weights, drawn as ``nn.Linear`` draws its initial weights
(from a generator seeded with ``seed``): the RigL paper's "Big-Sparse" regime.

A topology update moves the values and their optimizer state along with their positions, in
O(nnz) (a merge of the sorted old and new positions, one gather a tensor, a counting sort for
the transposed structure). Where the number of active weights stays, the values parameter and
its state tensors are updated in place. Where it changes (capability ``"variable_count"``: GMP,
SRigL's ablation, ...), the values parameter stays the same ``nn.Parameter`` (the optimizer's
``param_groups`` and every reference to it stay valid) and gets new data of the new size, its
``.grad`` and per-entry state tensors (momentum, Adam's moments) gathered likewise: kept weights
keep theirs, new ones start at zero, dropped ones are gone, and memory stays proportional to the
active count. A layer may end with no weight at all (it outputs its bias). Under torch.distributed
this capability is withdrawn: ``DistributedDataParallel`` holds every parameter's size in its
gradient buckets (and a resized one fails in the backward pass), so a method whose counts
change is refused there when the sparsifier is built (use ``backend="masked"``), and a count
change is refused in ``set_active``.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..sparsity.positions import match_sorted, union_sorted
from ..sparsity.targets import Target
from .base import (BLOCK_ELEMENTS, VARIABLE_COUNT, Block, row_blocks, row_multiple,
                   unavailable)
from .conversion import csr_eligibility, fuse_relus
from .csr import CSRLinear, _default_init
from .csr_ops import DTYPES as CSR_DTYPES
from .masked import MaskedBackend, flat_get
from .optimizer_state import state_tensors, swap_param, take_state

#: Fewest elements of a gradient block, so that the products stay large enough to run fast.
MIN_BLOCK_ELEMENTS = 1 << 20

#: Why a CSR layer's number of weights cannot change under torch.distributed.
DISTRIBUTED_REASON = (
    "under torch.distributed DistributedDataParallel keeps the size of every parameter in its "
    "gradient buckets, and a CSR layer's values parameter would change size; use "
    "backend='masked' for a method whose number of active weights changes")


def in_process_group() -> bool:
    """Whether a torch.distributed process group is initialised (of any size: DDP on one
    process keeps its buckets too)."""
    return dist.is_available() and dist.is_initialized()


class _Capabilities:
    """``CSRBackend.capabilities``: ``"variable_count"``, except under an initialised
    torch.distributed process group (see :data:`DISTRIBUTED_REASON`), as read when a sparsifier
    is built."""

    def __get__(self, obj, owner=None) -> frozenset[str]:
        return frozenset() if in_process_group() else frozenset({VARIABLE_COUNT})


class CSRBackend:
    """Sparsified ``nn.Linear`` weights as ``CSRLinear`` layers, the rest masked-dense."""

    name = "csr"
    capabilities = _Capabilities()  # variable_count, outside torch.distributed

    @classmethod
    def missing_reason(cls, capability: str) -> str | None:
        """Why ``capability`` is not in ``capabilities`` now, where a reason is known."""
        return DISTRIBUTED_REASON if capability == VARIABLE_COUNT and in_process_group() else None

    def __init__(self, targets: Iterable[Target], active: Mapping[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, *, model: nn.Module, seed: int = 0,
                 structure=None):
        """``active`` name -> sorted flat positions for every target; ``model`` is converted
        in place."""
        targets = list(targets)
        self.optimizer = optimizer
        self.names = [t.name for t in targets]
        self.layer_index = {t.name: i for i, t in enumerate(targets)}
        self._shapes = {t.name: tuple(t.shape) for t in targets}
        eligibility = csr_eligibility(model, self.names)
        where = {n: w for n, w in eligibility.items() if isinstance(w, tuple)}
        if not where:
            reasons: dict[str, list[str]] = {}
            for n, w in eligibility.items():
                reasons.setdefault(str(w), []).append(n)
            why = "; ".join(", ".join(ns[:3]) + (f" and {len(ns) - 3} more" if len(ns) > 3
                                                 else "") + f": {w}"
                            for w, ns in reasons.items())
            warnings.warn(f"backend='csr' converts plain nn.Linear weights only, and none of the "
                          f"sparsified weights is one ({why}), so every layer stays on the "
                          "masked backend", RuntimeWarning, stacklevel=4)
        wrong = [f"{n} ({t.param.dtype})" for t in targets for n in [t.name]
                 if n in where and t.param.dtype not in CSR_DTYPES]
        if wrong:
            raise ValueError(f"backend='csr' holds float32, float64, bfloat16 and float16 Linear "
                             f"weights, not {', '.join(wrong)}; convert the model to one of "
                             "them before building the sparsifier, or use backend='masked'")
        others = [t for t in targets if t.name not in where]
        self._rows_multiple = row_multiple(structure)
        self.masked = MaskedBackend(others, {t.name: active[t.name] for t in others}, optimizer,
                                    layer_index=self.layer_index, structure=structure)
        self.layers: dict[str, CSRLinear] = {}
        self._ever: dict[str, torch.Tensor] = {}
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        generator = torch.Generator().manual_seed(int(seed))
        for name, (parent, attr) in where.items():
            layer = self._convert(name, getattr(parent, attr), active[name], generator)
            if structure is not None and structure.kind == "block":  # the block kernels
                layer.set_block_shape((structure.rows, structure.cols))
            setattr(parent, attr, layer)
            self.layers[name] = layer
            self._ever[name] = layer.positions()
        fuse_relus(model, self.layers.values())

    def _convert(self, name: str, linear: nn.Linear, positions: torch.Tensor,
                 generator: torch.Generator) -> CSRLinear:
        weight = linear.weight
        out_features, in_features = weight.shape
        if weight.is_meta:  # materialised with its active weights only
            device = torch.device("cpu")
            values = _default_init(generator, positions.numel(), in_features, weight.dtype,
                                   device)
            bias = None
            if linear.bias is not None:
                bias = nn.Parameter(_default_init(generator, out_features, in_features,
                                                  weight.dtype, device))
                swap_param(self.optimizer, linear.bias, bias, lambda v: v)
        else:
            positions = positions.to(weight.device)
            values, bias = flat_get(weight.detach(), positions), linear.bias
        layer = CSRLinear.from_positions(positions.to(values.device), values,
                                         weight.shape, bias)
        swap_param(self.optimizer, weight, layer.values,
                   lambda v: flat_get(v, positions.to(v.device)).clone())
        empty = layer.empty_rows()
        if empty:
            warnings.warn(f"backend='csr': {empty} of the {out_features} output units of "
                          f"{name!r} have no active weight at its density and will output only "
                          "their bias; raise the density or use a denser distribution "
                          "(e.g. 'erk') if that is not intended", RuntimeWarning, stacklevel=5)
        return layer

    # --- sizes and active sets --------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def numel(self, name: str) -> int:
        return math.prod(self._shapes[name])

    def n_active(self, name: str) -> int:
        return self.layers[name].nnz if name in self.layers else self.masked.n_active(name)

    def active_positions(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name].positions()
        return self.masked.active_positions(name)

    def active_values(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name].values.detach()
        return self.masked.active_values(name)

    def dense_mask(self, name: str) -> torch.Tensor:
        return self.layers[name].mask() if name in self.layers else self.masked.dense_mask(name)

    def dense_weight(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name].dense_weight()
        return self.masked.dense_weight(name)

    def dense_state(self, name: str) -> list[torch.Tensor]:
        if name not in self.layers:
            return self.masked.dense_state(name)
        layer = self.layers[name]
        rows, cols = layer.rows(), layer.col
        result = []
        for state in state_tensors(self.optimizer, layer.values):
            dense = torch.zeros(self._shapes[name], dtype=state.dtype, device=state.device)
            dense[rows, cols] = state
            result.append(dense)
        return result

    def ever_active_count(self, name: str) -> int:
        if name in self.layers:
            return self._ever[name].numel()
        return self.masked.ever_active_count(name)

    def ever_active_positions(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self._ever[name]
        return self.masked.ever_active_positions(name)

    def restore_ever_active(self, name: str, positions: torch.Tensor) -> None:
        if name not in self.layers:
            return self.masked.restore_ever_active(name, positions)
        self._ever[name] = union_sorted(self.layers[name].positions(),
                                        positions.to(self.layers[name].col.device))

    # --- training steps -------------------------------------------------------------------
    def mask_gradients(self) -> None:
        self.masked.mask_gradients()

    def after_optimizer_step(self) -> None:
        self.masked.after_optimizer_step()

    def prepare_step(self, keep_gradient: bool) -> None:
        """Record (or stop recording) each CSR layer's input and output gradient for the coming
        backward passes, which a score that reads gradients needs."""
        self.masked.prepare_step(keep_gradient)
        self._saved.clear()
        for layer in self.layers.values():
            layer.capture = [] if keep_gradient else None

    def gradient_parameter(self, name: str) -> nn.Parameter:
        if name not in self.layers:
            return self.masked.gradient_parameter(name)
        return self.layers[name].values

    def active_gradient(self, name: str) -> torch.Tensor:
        if name not in self.layers:
            return self.masked.active_gradient(name)
        values = self.layers[name].values
        return values.grad if values.grad is not None else torch.zeros_like(values.detach())

    # --- scores ---------------------------------------------------------------------------
    def dense_gradient(self, name: str) -> torch.Tensor | None:
        if name in self.layers:
            raise ValueError(f"backend 'csr' has no dense gradient of {name!r} at every step; "
                             "read it by blocks on update steps")
        return self.masked.dense_gradient(name)

    def _saved_gradient(self, name: str):
        """``(x, grad_y^T)`` of the recorded backward passes of CSR layer ``name`` (joined along
        the batch; under torch.distributed gathered from every rank and averaged as DDP
        averages), with ``grad_y^T @ x`` the dense weight gradient; None if nothing ran."""
        if name not in self._saved:
            captured = self.layers[name].capture
            if not captured:
                self._saved[name] = None
            else:
                x = torch.cat([x.detach() for x, _ in captured]).contiguous()
                g = torch.cat([g.detach() for _, g in captured])
                world = collectives.world_size()
                if world > 1:
                    x, g = collectives.all_gather_rows(x), collectives.all_gather_rows(g) / world
                self._saved[name] = (x, g.t().contiguous())
        return self._saved[name]

    def blocks(self, name: str) -> Iterator[Block]:
        if name not in self.layers:
            yield from self.masked.blocks(name)
            return
        layer = self.layers[name]
        elements = min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, 2 * layer.nnz))
        buffer: list[torch.Tensor] = []  # one for every block: see gradient_rows

        def gradient_rows(rows: slice, shape) -> torch.Tensor:
            if layer.capture is None:
                unavailable(name)()
            saved = self._saved_gradient(name)
            if not buffer:  # allocating a block per block fragments the C heap on big layers
                buffer.append(torch.empty(shape, dtype=layer.values.dtype,
                                          device=layer.values.device))
            out = buffer[0][:shape[0]]
            if saved is None:  # the layer took no part in the step
                return out.zero_()
            x, g_t = saved
            return torch.mm(g_t[rows], x, out=out)

        for rows, lo, hi, shape in row_blocks(self._shapes[name], elements,
                                              self._rows_multiple):
            yield Block(name, self.layer_index[name], rows, lo, hi, shape,
                        lambda rows=rows: layer.dense_rows(rows.start, rows.stop),
                        lambda rows=rows, shape=shape: gradient_rows(rows, shape))

    # --- changing the active set ----------------------------------------------------------
    def restore_active(self, name: str, positions: torch.Tensor) -> None:
        """Make ``positions`` the active set as it was saved (a CSR layer's values and
        structure are also in the model's state_dict, which restores them)."""
        if name not in self.layers:
            return self.masked.restore_active(name, positions)
        self.set_active(name, positions)

    @torch.no_grad()
    def set_active(self, name: str, positions: torch.Tensor) -> None:
        """Make the sorted ``positions`` the active set of CSR layer ``name``: values and state
        of positions it had move along, new positions start at zero with zero state, dropped
        ones go. Their number may differ from the layer's (capability ``variable_count``; not
        under torch.distributed, RuntimeError): the values parameter (the same object), its
        gradient and its state tensors then get the new size. Positions the layer cannot hold
        (not tiling its R x C blocks, or beyond int32 indices) raise a ValueError naming the
        layer, before anything changes. O(number of positions + the layer's dimensions)."""
        if name not in self.layers:
            return self.masked.set_active(name, positions)
        layer = self.layers[name]
        positions = positions.to(layer.values.device)
        n = positions.numel()
        if n != layer.nnz and in_process_group():
            raise RuntimeError(f"backend 'csr' cannot change the number of active weights of "
                               f"{name!r} ({layer.nnz} -> {n}): {DISTRIBUTED_REASON}")
        if layer.block_shape is not None and n % (layer.block_shape[0] * layer.block_shape[1]):
            r, c = layer.block_shape
            raise ValueError(f"backend 'csr' holds {name!r} in aligned {r}x{c} blocks, so its "
                             f"number of active weights must be a multiple of {r * c}; got {n}")
        try:
            indices = layer.indices_for(positions)  # first: it raises on what it cannot hold
        except ValueError as error:
            raise ValueError(f"backend 'csr' cannot make {n} positions the active set of "
                             f"{name!r}: {error}") from None
        where, fresh = match_sorted(layer.positions(), positions)  # where each one was
        take_state(self.optimizer, layer.values, where)
        layer.set_indices(*indices)
        # only positions not active before can be new to ever-active
        self._ever[name] = union_sorted(self._ever[name], fresh)
