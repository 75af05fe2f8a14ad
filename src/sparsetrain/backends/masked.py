"""Masked-dense backend: each sparse weight is a dense tensor kept at zero outside its active set.

Works for any layer type, device and dtype. Per weight it keeps the active set as sorted flat
positions and as a bool mask (zeroing the inactive entries of a gradient or weight is one pass
of a compiled kernel, as fast as a copy; torch's ``where`` where the kernels are not built or
on other devices), and a bool record of the positions ever active. A topology update touches
only the positions that change (O(active) gathers and scatters); nothing here sorts or permutes
a layer. The dense gradient is served in blocks of ``BLOCK_ELEMENTS`` entries copied into one
scratch buffer, so that an update allocates nothing of the layer's size.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch

from ..kernels import compiled_kernels
from ..sparsity.positions import mask_of, positions_of
from ..sparsity.targets import Target
from .base import (DENSE_GRADIENT_EVERY_STEP, DENSE_WEIGHTS, VARIABLE_COUNT, Block, row_blocks,
                   row_multiple, unavailable)

#: Entries of a block of the dense gradient that a score reads at once (4 MB in float32: small
#: enough that the C allocator reuses the scratch memory instead of mapping it anew).
BLOCK_ELEMENTS = 1 << 20


def flat_get(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor.reshape(-1)[positions]`` for any memory layout."""
    if tensor.is_contiguous():
        return tensor.view(-1)[positions]
    return tensor[torch.unravel_index(positions, tensor.shape)]


def zero_inactive(tensor: torch.Tensor, active: torch.Tensor) -> None:
    """``tensor[~active] = 0`` in place (NaN included)."""
    kernels = compiled_kernels() if tensor.device.type == "cpu" else None
    if kernels is not None and tensor.is_contiguous():
        kernels.zero_inactive(tensor, active)
    else:
        torch.where(active, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device),
                    out=tensor)


def flat_set(tensor: torch.Tensor, positions: torch.Tensor, value) -> None:
    """``tensor.reshape(-1)[positions] = value`` in place, for any memory layout."""
    if tensor.is_contiguous():
        tensor.view(-1)[positions] = value
    else:
        tensor[torch.unravel_index(positions, tensor.shape)] = value


class MaskedBackend:
    """Dense storage times a mask, for the weights in ``targets``."""

    name = "masked"
    capabilities = frozenset({DENSE_GRADIENT_EVERY_STEP, VARIABLE_COUNT, DENSE_WEIGHTS})

    def __init__(self, targets: Iterable[Target], active: Mapping[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 seed: int = 0, layer_index: Mapping[str, int] | None = None,
                 structure=None):
        """``active`` name -> sorted flat positions for every target. ``model`` and ``seed``
        are not needed: the weights stay where they are. ``layer_index`` numbers the layers
        (their index in the sparsifier; by default their order in ``targets``)."""
        targets = list(targets)
        self._rows_multiple = row_multiple(structure)
        meta = [t.name for t in targets if t.param.is_meta]
        if meta:
            raise ValueError(f"the weights {meta} are on the meta device; the masked backend "
                             "keeps dense weights, so build the model on a real device (only "
                             "backend='csr' materialises nn.Linear layers from the meta device)")
        self.names = [t.name for t in targets]
        self.params = {t.name: t.param for t in targets}
        self.layer_index = dict(layer_index) if layer_index is not None else {
            t.name: i for i, t in enumerate(targets)}
        self.optimizer = optimizer
        self._positions: dict[str, torch.Tensor] = {}
        self._active: dict[str, torch.Tensor] = {}
        self._ever: dict[str, torch.Tensor] = {}
        self._keep_gradient = False
        self._gradient_masked = False
        self._kept: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            positions = active[name].to(param.device)
            self._positions[name] = positions
            self._active[name] = mask_of(positions, param.shape)
            self._ever[name] = self._active[name].clone()
        self._apply()

    # --- sizes and active sets --------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)

    def numel(self, name: str) -> int:
        return math.prod(self.params[name].shape)

    def n_active(self, name: str) -> int:
        return self._positions[name].numel()

    def active_positions(self, name: str) -> torch.Tensor:
        return self._positions[name]

    def active_values(self, name: str) -> torch.Tensor:
        return flat_get(self.params[name].detach(), self._positions[name])

    def dense_mask(self, name: str) -> torch.Tensor:
        return self._active[name].clone()

    def dense_weight(self, name: str) -> torch.Tensor:
        return self.params[name].detach()

    def dense_state(self, name: str) -> list[torch.Tensor]:
        return self._state_tensors(self.params[name])

    def ever_active_count(self, name: str) -> int:
        return int(self._ever[name].sum())

    def ever_active_positions(self, name: str) -> torch.Tensor:
        return positions_of(self._ever[name])

    def restore_ever_active(self, name: str, positions: torch.Tensor) -> None:
        ever = mask_of(positions.to(self._ever[name].device), self.params[name].shape)
        self._ever[name] = ever | self._active[name]

    # --- keeping inactive weights at zero -------------------------------------------------
    def _state_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        return [v for v in self.optimizer.state.get(param, {}).values()
                if torch.is_tensor(v) and v.shape == param.shape]

    @torch.no_grad()
    def _apply(self, names=None) -> None:
        """Zero every inactive weight and its optimizer state (selecting, not multiplying)."""
        for name in self.names if names is None else names:
            param = self.params[name]
            for tensor in [param.data, *self._state_tensors(param)]:
                zero_inactive(tensor, self._active[name])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every inactive weight (before an optimizer step); a gradient
        that feeds the coming update is kept first."""
        for name, param in self.params.items():
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                param.grad = param.grad.to_dense()
            if self._keep_gradient:
                self._kept[name] = param.grad.detach().clone()
            zero_inactive(param.grad, self._active[name])
        self._gradient_masked = True

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Zero every inactive weight and its optimizer state, whatever they held (a NaN or
        inf there, e.g. through weight decay, becomes exactly zero)."""
        self._apply()

    def prepare_step(self, keep_gradient: bool) -> None:
        """Whether the coming step's dense gradient must outlive its masking (it feeds an
        update that comes after the optimizer step)."""
        self._keep_gradient = bool(keep_gradient)
        self._gradient_masked = False
        self._kept.clear()

    def gradient_parameter(self, name: str) -> torch.nn.Parameter:
        """The parameter whose ``.grad`` holds the gradient of weight ``name``."""
        return self.params[name]

    def active_gradient(self, name: str) -> torch.Tensor:
        """The gradient at the active positions (in their order); zeros if there is none."""
        grad = self.params[name].grad
        if grad is None:
            return torch.zeros(self.n_active(name), dtype=self.params[name].dtype,
                               device=self.params[name].device)
        return flat_get(grad.to_dense() if grad.is_sparse else grad, self._positions[name])

    # --- scores ---------------------------------------------------------------------------
    def dense_gradient(self, name: str) -> torch.Tensor | None:
        """Gradient of the loss w.r.t. the effective weight at every position (inactive weights
        are stored as zeros, so autograd's gradient is that one), or None."""
        if name in self._kept:
            return self._kept[name]
        grad = self.params[name].grad
        if grad is None:
            return None
        return (grad.to_dense() if grad.is_sparse else grad).detach()

    def blocks(self, name: str) -> Iterator[Block]:
        param = self.params[name]
        scratch: list[torch.Tensor] = []  # one buffer for every block of this pass

        def gradient_rows(rows: slice, shape) -> torch.Tensor:
            if self._gradient_masked and name not in self._kept:
                unavailable(name)()
            if not scratch:
                scratch.append(torch.empty(shape, dtype=param.dtype, device=param.device))
            out = scratch[0][:shape[0]]
            grad = self.dense_gradient(name)
            if grad is None:  # the weight took no part in the step
                return out.zero_()
            return out.copy_(grad[rows])

        for rows, lo, hi, shape in row_blocks(tuple(param.shape), BLOCK_ELEMENTS,
                                              self._rows_multiple):
            yield Block(name, self.layer_index[name], rows, lo, hi, shape,
                        lambda rows=rows: param.detach()[rows],
                        lambda rows=rows, shape=shape: gradient_rows(rows, shape))

    # --- changing the active set ----------------------------------------------------------
    @torch.no_grad()
    def restore_active(self, name: str, positions: torch.Tensor) -> None:
        """Make ``positions`` the active set as it was saved: the weights stored there stay
        (they are the saved ones, loaded into the model), the rest is zeroed with its state."""
        param = self.params[name]
        positions = positions.to(param.device)
        self._positions[name] = positions
        self._active[name] = mask_of(positions, param.shape)
        self._ever[name] |= self._active[name]
        self._apply([name])

    @torch.no_grad()
    def set_active(self, name: str, positions: torch.Tensor) -> None:
        """Make the sorted ``positions`` the active set of ``name``: weights active before and
        after keep their values and state; grown ones start at zero with zero state."""
        param = self.params[name]
        positions = positions.to(param.device)
        old, active = self._positions[name], self._active[name]
        grown = positions[~flat_get(active, positions)]
        flat_set(active, old, False)
        flat_set(active, positions, True)
        dropped = old[~flat_get(active, old)]  # by lookups in the mask: no search
        changed = torch.cat([dropped, grown])
        for tensor in [param.data, *self._state_tensors(param)]:
            flat_set(tensor, changed, 0)
        flat_set(self._ever[name], grown, True)
        self._positions[name] = positions
