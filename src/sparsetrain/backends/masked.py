"""Masked-dense backend: each sparse weight is a dense tensor kept at zero outside its mask.

Works for any layer type, device and dtype. The methods reach a sparse weight only through the
narrow interface below (masks, magnitudes of active weights, dense gradient, replacing the active
set), so a truly sparse backend can stand in without changing them.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from ..sparsity.masks import initial_masks
from ..sparsity.targets import Target


class MaskedBackend:
    """Dense storage times a boolean mask, for the weights in ``targets``."""

    name = "masked"

    def __init__(
        self,
        targets: Iterable[Target],
        masks: Mapping[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer,
        *,
        model: torch.nn.Module | None = None,
        densities: Mapping[str, float] | None = None,
        generator: torch.Generator | None = None,
    ):
        """``masks`` name -> bool tensor for every target, or ``None`` to draw them at random
        (exactly ``active_count`` ones per layer) from ``densities`` with ``generator``.
        ``model`` is not needed: the weights stay where they are."""
        targets = list(targets)
        if masks is None:
            masks = initial_masks(targets, densities, generator)
        self.names = [t.name for t in targets]
        self.params = {t.name: t.param for t in targets}
        self.optimizer = optimizer
        self.masks: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            self.masks[name] = masks[name].to(device=param.device, dtype=torch.bool)
        self.apply_masks()

    # --- keeping inactive weights at zero -------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight and its optimizer state."""
        for name, param in self.params.items():
            mask = self.masks[name]
            param.mul_(mask)
            self._mask_optimizer_state(param, mask)

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Zero every inactive weight (after an optimizer step)."""
        for name, param in self.params.items():
            param.mul_(self.masks[name])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every inactive weight (before an optimizer step)."""
        for name, param in self.params.items():
            if param.grad is not None:
                if param.grad.is_sparse:
                    param.grad = param.grad.to_dense()
                param.grad.mul_(self.masks[name])

    def _mask_optimizer_state(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(mask)

    # --- the interface the methods use ----------------------------------------------------
    def is_compact(self, name: str) -> bool:
        """Whether ``name`` is updated in a compact form (never here: see the CSR backend)."""
        return False

    def n_active(self, name: str) -> int:
        return int(self.masks[name].sum())

    def numel(self, name: str) -> int:
        return math.prod(self.params[name].shape)

    def prepare_step(self, capture: bool) -> None:
        """Nothing to prepare: the dense gradient is in ``.grad`` after every backward pass."""

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Make ``mask`` the active set of ``name`` (restoring a saved state)."""
        param = self.params[name]
        self.masks[name] = mask.to(device=param.device, dtype=torch.bool)
        with torch.no_grad():
            param.mul_(self.masks[name])
            self._mask_optimizer_state(param, self.masks[name])

    def weight_magnitudes(self, name: str) -> torch.Tensor:
        """``|W|`` in the weight's shape (zero where inactive)."""
        return self.params[name].detach().abs()

    def dense_gradient(self, name: str) -> torch.Tensor | None:
        """Gradient of the loss w.r.t. the effective weight ``W * M`` at every position.

        Inactive weights are stored as zeros, so the gradient autograd leaves in ``.grad`` is
        already the dense gradient w.r.t. ``W * M``.
        """
        grad = self.params[name].grad
        if grad is not None and grad.is_sparse:
            grad = grad.to_dense()
        return None if grad is None else grad.detach()

    @torch.no_grad()
    def replace_active(self, name: str, new_mask: torch.Tensor) -> torch.Tensor:
        """Make ``new_mask`` the active set of weight ``name``; return the grown positions.

        Grown weights (active now, inactive before) start at zero with zero optimizer state;
        dropped weights are zeroed with their state; weights active before and after keep their
        values and state.
        """
        param = self.params[name]
        old_mask = self.masks[name]
        new_mask = new_mask.to(device=param.device, dtype=torch.bool)
        grown = new_mask & ~old_mask
        kept = new_mask & old_mask
        param.mul_(kept)
        self._mask_optimizer_state(param, kept)
        self.masks[name] = new_mask
        return grown
