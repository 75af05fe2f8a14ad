"""The contract between the methods and the backends that store sparse weights.

A backend owns how each sparsified weight is stored (a dense tensor times a mask, CSR, ...). The
methods see a weight only through this protocol, by its name, and never ask which backend they
run on:

- ``names``; ``shape(name)``, ``numel(name)``, ``n_active(name)``;
- ``active_positions(name)``: the active set, sorted flat positions (int64);
- ``active_values(name)``: the weights at those positions, in that order;
- ``set_active(name, positions)``: make the sorted ``positions`` the active set; weights active
  before and after keep their values and optimizer state, new ones start at zero with zero
  state, dropped ones are zeroed with their state;
- ``restore_active(name, positions)``: the same for a saved active set, keeping the weights
  stored at ``positions`` (they are the saved ones);
- ``blocks(name)``: the layer cut into row blocks (:class:`Block`) on which scores are computed:
  the dense weights and the dense gradient of a block of rows, without a dense tensor of the
  whole layer where the storage is compact; under a ``structure`` of R x C blocks, each row
  block starts and ends at a multiple of R rows;
- ``dense_gradient(name)``: the whole dense gradient of the last backward pass (capability
  ``"dense_gradient_every_step"``);
- ``prepare_step(keep_gradient)``: whether the coming step's dense gradient feeds a topology
  update, so the backend keeps it (a compact layer records its input and output gradient);
- ``gradient_parameter(name)``: the parameter whose ``.grad`` holds ``name``'s gradient, and
  ``active_gradient(name)``: that gradient at the active positions, in their order (for
  clipping by the norm of the active gradients);
- ``mask_gradients()`` before the optimizer step, ``after_optimizer_step()`` after it (on every
  step, also where an update replaces the optimizer step): inactive weights and their optimizer
  state are set to exactly zero by selection, whatever they held (NaN and inf included);
- ``dense_mask(name)``, ``dense_weight(name)`` and ``dense_state(name)`` (the optimizer's
  per-weight state tensors): dense tensors of the weight's shape, built on request (for users
  and tests; the library never asks for them);
- ``ever_active_count(name)`` and ``ever_active_positions(name)``: the positions active at some
  point since training began (``restore_ever_active`` loads them back).

A backend is built as ``Backend(targets, active, optimizer, model=..., seed=...,
structure=...)``: ``structure`` (a :class:`~sparsetrain.sparsity.structure.Structure`) is the
one every active set keeps, from which a backend may pick a faster storage format.

``capabilities`` (a class attribute) lists what a backend can do beyond that; a method that
``requires`` more is refused with a clear error before anything is converted:

- ``"dense_gradient_every_step"``: the dense gradient of every step (e.g. for a moving average);
- ``"variable_count"``: ``set_active`` may change the number of active weights (pruning);
- ``"dense_weights"``: every weight has a dense place of its own whatever the density, so a
  method may hold a layer dense for a while (AC/DC's dense phases) or keep weights outside the
  active set at no extra cost (Top-KAST's backward set); ``dense_weight(name)`` is then the
  weight's own storage, which such a method may write in place.

``CAPABILITIES`` says why a method needs each, for the error that refuses it; a backend may
also say why it lacks one at the moment (``missing_reason(capability)``, a classmethod: the CSR
backend changes no counts under torch.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: Most elements of a dense block a backend materialises at once.
BLOCK_ELEMENTS = 1 << 23

DENSE_GRADIENT_EVERY_STEP = "dense_gradient_every_step"
VARIABLE_COUNT = "variable_count"
DENSE_WEIGHTS = "dense_weights"

#: What each capability gives, as the error that refuses a method says it.
CAPABILITIES = {
    DENSE_GRADIENT_EVERY_STEP: "the dense gradient of every step",
    VARIABLE_COUNT: "a number of active weights that changes",
    DENSE_WEIGHTS: "dense storage of every weight",
}


def missing_reason(backend_class: type, capability: str) -> str | None:
    """Why ``backend_class`` lacks ``capability`` at the moment, where it says
    (``missing_reason`` classmethod), else None."""
    reason = getattr(backend_class, "missing_reason", None)
    return None if reason is None else reason(capability)


class GradientUnavailable(RuntimeError):
    """A score read the dense gradient of a step for which it was not kept."""


@dataclass
class Block:
    """Rows ``rows.start:rows.stop`` of sparse weight ``name``: the flat positions
    ``lo:hi``, with ``shape`` the weight's shape restricted to those rows.

    ``weight()`` and ``gradient()`` give the dense weights (zeros where inactive; read only)
    and the dense gradient of the rows, each of ``shape``. ``gradient()`` returns a scratch
    buffer: a score may change it in place (``block.gradient().abs_()``), and must not keep it,
    as the next block reuses it.
    """

    name: str
    layer: int
    rows: slice
    lo: int
    hi: int
    shape: tuple[int, ...]
    _weight: Callable[[], torch.Tensor]
    _gradient: Callable[[], torch.Tensor]

    def weight(self) -> torch.Tensor:
        return self._weight()

    def gradient(self) -> torch.Tensor:
        return self._gradient()

    def positions(self, device=None) -> torch.Tensor:
        """The flat positions of the block's entries, in its row-major order."""
        return torch.arange(self.lo, self.hi, dtype=torch.int64, device=device)


def row_blocks(shape: tuple[int, ...], elements: int = BLOCK_ELEMENTS, multiple: int = 1):
    """``(rows, lo, hi, block_shape)`` for consecutive row blocks of a weight of ``shape`` with
    at most ``elements`` entries each (at least ``multiple`` rows), each starting at a multiple
    of ``multiple`` rows."""
    rows = int(shape[0]) if shape else 1
    per_row = 1
    for s in shape[1:]:
        per_row *= int(s)
    step = max(multiple, elements // max(1, per_row) // multiple * multiple)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield slice(r0, r1), r0 * per_row, r1 * per_row, (r1 - r0, *shape[1:])


def row_multiple(structure) -> int:
    """The rows a row block must be a multiple of under ``structure`` (R for R x C blocks)."""
    return structure.rows if structure is not None and structure.kind == "block" else 1


def unavailable(name: str) -> Callable[[], torch.Tensor]:
    def fail() -> torch.Tensor:
        raise GradientUnavailable(
            f"a score read the dense gradient of {name!r}, but this step's gradient was not "
            "kept for the update; a method whose drop or grow score reads gradients must set "
            "the class attribute update_reads_gradient = True")

    return fail
