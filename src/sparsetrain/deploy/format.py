"""The sparse model file: a safetensors file holding each sparse weight compactly.

A file holds the tensors of one model (its ``state_dict``, as a plain PyTorch module names
them) and, in safetensors' string metadata,

- ``format`` (:data:`FORMAT`) and ``format_version`` (:data:`FORMAT_VERSION`);
- ``sparsetrain_version``, the version that wrote it;
- ``layers``, JSON: for every sparse weight its ``shape``, ``layout``, ``structure`` and
  ``nnz``;
- ``recipe``, JSON or absent: how to build the module (``model``, ``num_classes``,
  ``input_shape``, ``width``: :func:`sparsetrain.models.build_model`'s arguments);
- ``info``, JSON: what the exporter was told about the model (method, data set, accuracy...);
- ``checksum``: SHA-256 of every tensor (name, dtype, shape, bytes) and every other metadata
  entry, so that a file changed after export is refused.

A dense tensor is stored under its own name. A sparse weight ``NAME`` of shape ``(out, ...)``
is stored as the matrix of ``out`` rows and ``numel / out`` columns (its row-major flat
positions, as :mod:`sparsetrain.sparsity` numbers them) in one of three layouts:

- ``"csr"``: ``NAME::values`` (nnz, the weight's dtype), ``NAME::crow`` (rows + 1 row
  pointers) and ``NAME::col`` (nnz column indices), int32 where they fit, else int64;
- ``"bsr"`` (a 2-D weight in aligned blocks of R x C, ``block`` in its layer entry):
  ``NAME::values`` (blocks, R, C), ``NAME::crow`` (rows / R + 1 block-row pointers),
  ``NAME::col`` (the block column of each block);
- ``"nm"`` (a 2-D weight trained with ``structure="N:M"``, exactly N active in every group of M
  consecutive inputs; ``n`` and ``m`` in its layer entry): ``NAME::values`` (rows, cols / M, N)
  and ``NAME::idx`` (uint8, the same shape: each value's place in its group, increasing).

So a file's size is about proportional to the non-zeros: 8 bytes a non-zero in float32 CSR
(4 bytes of value, 4 of index), 5 in N:M groups, a little over 4 in blocks.

Nothing is unpickled: safetensors holds raw tensors and strings only. Every structure read is
checked (sorted unique positions within the shape, sizes that agree) before it is used.
Writing is :mod:`.write` (``save``), reading :mod:`.read` (``load``); this module holds what
both share: the classes of a file's content and its checksum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

#: The ``format`` entry of a sparse model file.
FORMAT = "sparsetrain.sparse-model"
#: The version of the format this code writes; it reads this one and every earlier one.
FORMAT_VERSION = 1
#: Between a sparse weight's name and the part of it a tensor holds.
SEP = "::"
LAYOUTS = ("csr", "bsr", "nm")
#: The tensors of a sparse weight in each layout.
PARTS = {"csr": ("values", "crow", "col"), "bsr": ("values", "crow", "col"),
         "nm": ("values", "idx")}


class SparseFileError(ValueError):
    """A sparse model file that cannot be used: the message says why and what to do."""


@dataclass
class SparseWeight:
    """One sparse weight: ``shape``, its sorted flat ``positions`` (int64), the ``values`` at
    them (in their order), the ``structure`` it was trained with (e.g. ``"unstructured"``,
    ``"2:4"``, ``"block:4x4"``) and, for blocks, the ``block`` shape ``(R, C)``. The file
    stores it in the layout of its structure where its positions have that structure (N:M
    groups, blocks of a 2-D weight), else as CSR."""

    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor
    structure: str = "unstructured"
    block: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def density(self) -> float:
        return self.positions.numel() / max(1, self.numel)

    def dense(self) -> torch.Tensor:
        """The weight as a dense tensor, zeros where inactive."""
        weight = torch.zeros(self.numel, dtype=self.values.dtype)
        weight[self.positions] = self.values
        return weight.view(self.shape)

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.numel, dtype=torch.bool)
        mask[self.positions] = True
        return mask.view(self.shape)


@dataclass
class SparseModel:
    """The content of a sparse model file: ``dense`` tensors by name, ``sparse`` weights by
    name, the construction ``recipe`` (or None), the exporter's ``info`` and the
    ``sparsetrain_version`` that wrote it."""

    dense: dict[str, torch.Tensor]
    sparse: dict[str, SparseWeight]
    recipe: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    sparsetrain_version: str = ""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor by its name in the module, the sparse ones dense (zeros)."""
        state = dict(self.dense)
        state.update({name: w.dense() for name, w in self.sparse.items()})
        return state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: tuple(t.shape) for name, t in self.dense.items()}
        shapes.update({name: tuple(w.shape) for name, w in self.sparse.items()})
        return shapes


def checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of the tensors (by name: name, dtype, shape, bytes) and the metadata entries
    (by key, without ``checksum``)."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "checksum"):
        h.update(f"meta {key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"tensor {name} {t.dtype} {tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
