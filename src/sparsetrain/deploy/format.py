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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..files import replace_atomically

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


# --- checksum ---------------------------------------------------------------------------------
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
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- encoding ---------------------------------------------------------------------------------
def _index(t: torch.Tensor, limit: int) -> torch.Tensor:
    return t.to(torch.int32 if limit < 2 ** 31 else torch.int64).contiguous()


def _encode_weight(name: str, w: SparseWeight) -> tuple[dict[str, torch.Tensor], dict]:
    rows = w.shape[0] if w.shape else 1
    cols = w.numel // max(1, rows)
    pos = w.positions.to(torch.int64)
    r, c = torch.div(pos, cols, rounding_mode="floor"), pos % cols
    entry = {"shape": list(w.shape), "structure": w.structure, "nnz": int(pos.numel())}
    block = w.block if w.block is not None and len(w.shape) == 2 else None
    groups = _nm_groups(w, r, c, rows, cols)
    if groups is not None:
        n, m = groups
        order = c % m  # the places within each group, in row-major order: already sorted
        entry.update(layout="nm", n=n, m=m)
        return {f"{name}{SEP}values": w.values.detach().cpu().reshape(rows, cols // m, n)
                .contiguous(),
                f"{name}{SEP}idx": order.to(torch.uint8).reshape(rows, cols // m, n)}, entry
    if block is not None and _tiles(r, c, rows, cols, block):
        R, C = block
        first = (r % R == 0) & (c % C == 0)  # the top-left entry of every block
        br, bc = r[first] // R, c[first] // C
        order = torch.argsort(br * (cols // C) + bc)
        br, bc = br[order], bc[order]
        values = w.dense().reshape(rows // R, R, cols // C, C)[br, :, bc, :]
        crow = torch.zeros(rows // R + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(br, minlength=rows // R), 0)
        entry.update(layout="bsr", block=[R, C])
        return {f"{name}{SEP}values": values.contiguous(),
                f"{name}{SEP}crow": _index(crow, max(rows, cols, w.numel)),
                f"{name}{SEP}col": _index(bc, max(rows, cols, w.numel))}, entry
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    entry.update(layout="csr")
    return {f"{name}{SEP}values": w.values.detach().cpu().contiguous(),
            f"{name}{SEP}crow": _index(crow, max(rows, cols, pos.numel())),
            f"{name}{SEP}col": _index(c, max(rows, cols, pos.numel()))}, entry


def _nm_groups(w: SparseWeight, r: torch.Tensor, c: torch.Tensor, rows: int,
               cols: int) -> tuple[int, int] | None:
    """``(N, M)`` where ``w`` is a 2-D weight of structure ``"N:M"`` whose positions have
    exactly N in every group of M consecutive columns (M <= 256), else None."""
    if len(w.shape) != 2 or ":" not in w.structure or w.structure.startswith("block"):
        return None
    try:
        n, m = (int(v) for v in w.structure.split(":"))
    except ValueError:
        return None
    if not 0 < n <= m <= 256 or cols % m or r.numel() != rows * (cols // m) * n:
        return None
    counts = torch.bincount(r * (cols // m) + torch.div(c, m, rounding_mode="floor"),
                            minlength=rows * (cols // m))
    return (n, m) if bool((counts == n).all()) else None


def _tiles(r: torch.Tensor, c: torch.Tensor, rows: int, cols: int, block) -> bool:
    """Whether the positions ``(r, c)`` are whole aligned blocks of ``block``."""
    R, C = block
    if R < 1 or C < 1 or rows % R or cols % C or r.numel() % (R * C):
        return False
    ids = torch.unique(torch.div(r, R, rounding_mode="floor") * (cols // C)
                       + torch.div(c, C, rounding_mode="floor"))
    return ids.numel() * R * C == r.numel()


def encode(model: SparseModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file holding ``model``."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, t in model.dense.items():
        if SEP in name:
            raise ValueError(f"a tensor name may not contain {SEP!r}: {name!r}")
        tensors[name] = t.detach().cpu().contiguous().clone()  # no shared storage
    for name, w in model.sparse.items():
        if SEP in name:
            raise ValueError(f"a tensor name may not contain {SEP!r}: {name!r}")
        parts, layers[name] = _encode_weight(name, w)
        tensors.update(parts)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "sparsetrain_version": model.sparsetrain_version,
                "layers": json.dumps(layers, sort_keys=True),
                "info": json.dumps(model.info, sort_keys=True, default=str)}
    if model.recipe is not None:
        metadata["recipe"] = json.dumps(model.recipe, sort_keys=True)
    metadata["checksum"] = checksum(tensors, metadata)
    return tensors, metadata


def save(model: SparseModel, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (atomically: a temporary file renamed into place)."""
    from safetensors.torch import save as to_bytes

    path = Path(path)
    tensors, metadata = encode(model)
    data = to_bytes(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, data)
    return path


# --- decoding ---------------------------------------------------------------------------------
def load(path: str | Path) -> SparseModel:
    """The model in the file at ``path``, checked; ``SparseFileError`` saying what is wrong
    (missing, truncated or not safetensors, not a sparse model file, a newer format, changed
    since export, an inconsistent structure)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    path = Path(path)
    if not path.is_file():
        raise SparseFileError(f"{path} does not exist or is not a file; give the path of a "
                              "file written by `sparsetrain export` (st.export_sparse)")
    data = path.read_bytes()
    try:
        tensors = from_bytes(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, KeyError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise SparseFileError(f"{path} is not a complete safetensors file (truncated, or not "
                              f"safetensors at all: {why}); export the model again") from None
    return decode(tensors, metadata, str(path))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header is JSON after its 8-byte size)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("its metadata is not a mapping")
    return metadata


def decode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
           where: str = "the file") -> SparseModel:
    """The model that ``tensors`` and ``metadata`` hold, checked (``SparseFileError``)."""
    if metadata.get("format") != FORMAT:
        raise SparseFileError(f"{where} is a safetensors file but not a sparsetrain sparse "
                              "model (no 'format: sparsetrain.sparse-model' in its metadata); "
                              "export the model with `sparsetrain export` or st.export_sparse")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise SparseFileError(f"{where} has no valid format_version; export the model "
                              "again") from None
    if version > FORMAT_VERSION:
        raise SparseFileError(
            f"{where} was written by a newer sparsetrain "
            f"({metadata.get('sparsetrain_version') or 'unknown version'}, format version "
            f"{version}; this one reads up to {FORMAT_VERSION}); upgrade sparsetrain to load it")
    if version < 1:
        raise SparseFileError(f"{where} has format version {version}, which does not exist")
    if metadata.get("checksum") != checksum(tensors, metadata):
        raise SparseFileError(f"{where} does not match its checksum: it was changed or damaged "
                              "after export; export the model again from its run")
    try:
        layers = json.loads(metadata.get("layers", "{}"))
        info = json.loads(metadata.get("info", "{}"))
        recipe = json.loads(metadata["recipe"]) if "recipe" in metadata else None
    except json.JSONDecodeError as exc:
        raise SparseFileError(f"{where} has metadata that is not valid JSON ({exc}); export "
                              "the model again") from None
    sparse = {name: _decode_weight(name, entry, tensors, where)
              for name, entry in layers.items()}
    parts = {f"{n}{SEP}{p}" for n, entry in layers.items()
             for p in PARTS.get(entry.get("layout") if isinstance(entry, dict) else None, ())}
    stray = sorted(k for k in tensors if SEP in k and k not in parts)
    if stray:
        raise SparseFileError(f"{where} holds parts of sparse weights it does not describe "
                              f"({', '.join(stray[:3])}); export the model again")
    dense = {k: t for k, t in tensors.items() if SEP not in k}
    return SparseModel(dense, sparse, recipe, info if isinstance(info, dict) else {},
                       metadata.get("sparsetrain_version", ""))


def _decode_weight(name: str, entry: Any, tensors: Mapping[str, torch.Tensor],
                   where: str) -> SparseWeight:
    def bad(what: str) -> SparseFileError:
        return SparseFileError(f"{where}: sparse weight {name!r} {what}; export the model again")

    if not isinstance(entry, dict):
        raise bad("has no description")
    try:
        shape = tuple(int(s) for s in entry["shape"])
        layout = entry.get("layout")
        structure = str(entry.get("structure", "unstructured"))
    except (KeyError, TypeError, ValueError):
        raise bad("has a malformed description") from None
    if layout not in LAYOUTS:
        raise bad(f"has the unknown layout {layout!r} (this sparsetrain reads {LAYOUTS})")
    if any(s < 0 for s in shape) or not shape:
        raise bad(f"has the invalid shape {shape}")
    missing = [p for p in PARTS[layout] if f"{name}{SEP}{p}" not in tensors]
    if missing:
        raise bad(f"lacks its {', '.join(missing)}")
    if layout == "nm":
        return _decode_nm(entry, shape, structure, tensors[f"{name}{SEP}values"],
                          tensors[f"{name}{SEP}idx"], bad)
    values, crow, col = (tensors[f"{name}{SEP}{p}"] for p in PARTS[layout])
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype not in (torch.int32,
                                                                           torch.int64):
        raise bad("has indices that are not integers")
    if not values.is_floating_point():
        raise bad(f"has {values.dtype} values, not floating point")
    numel = 1
    for s in shape:
        numel *= s
    rows = shape[0]
    cols = numel // max(1, rows)
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    block = None
    R = C = 1
    if layout == "bsr":
        try:
            R, C = (int(b) for b in entry["block"])
        except (KeyError, TypeError, ValueError):
            raise bad("is in blocks but has no valid block shape") from None
        if len(shape) != 2 or R < 1 or C < 1 or rows % R or cols % C:
            raise bad(f"has blocks of {R}x{C} that do not tile its shape {shape}")
        block = (R, C)
        if values.dim() != 3 or tuple(values.shape[1:]) != (R, C):
            raise bad(f"has block values of shape {tuple(values.shape)}, not (blocks, {R}, {C})")
    elif values.dim() != 1:
        raise bad(f"has values of shape {tuple(values.shape)}, not one dimension")
    n_rows, n_cols = rows // R, cols // C
    n = values.shape[0]
    if (crow.dim() != 1 or crow.numel() != n_rows + 1 or col.dim() != 1 or col.numel() != n
            or int(crow[0]) != 0 or int(crow[-1]) != n or bool((crow[1:] < crow[:-1]).any())):
        raise bad("has row pointers and columns that do not agree with its values")
    if n and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise bad("has column indices outside its shape")
    row = torch.repeat_interleave(torch.arange(n_rows), crow[1:] - crow[:-1])
    key = row * n_cols + col
    if n > 1 and bool((key[1:] <= key[:-1]).any()):
        raise bad("has columns that are not sorted and unique within each row")
    if layout == "csr":
        return SparseWeight(shape, key, values.contiguous(), structure)
    # blocks -> row-major positions and their values
    i = torch.arange(R).view(1, R, 1)
    j = torch.arange(C).view(1, 1, C)
    pos = (row.view(-1, 1, 1) * R + i) * cols + col.view(-1, 1, 1) * C + j
    pos, order = pos.reshape(-1).sort()
    return SparseWeight(shape, pos, values.reshape(-1)[order].contiguous(), structure, block)


def _decode_nm(entry: dict, shape: tuple[int, ...], structure: str, values: torch.Tensor,
               idx: torch.Tensor, bad) -> SparseWeight:
    """The weight stored in N:M groups: ``values`` and their places ``idx`` in their groups."""
    try:
        n, m = int(entry["n"]), int(entry["m"])
    except (KeyError, TypeError, ValueError):
        raise bad("is in N:M groups but has no valid n and m") from None
    if len(shape) != 2 or not 0 < n <= m <= 256 or shape[1] % m:
        raise bad(f"has {n}:{m} groups that do not fit its shape {shape}")
    groups = (shape[0], shape[1] // m, n)
    if not values.is_floating_point() or tuple(values.shape) != groups:
        raise bad(f"has values of shape {tuple(values.shape)} ({values.dtype}), not floating "
                  f"point of {groups}")
    if idx.dtype != torch.uint8 or tuple(idx.shape) != groups:
        raise bad(f"has group places of shape {tuple(idx.shape)} ({idx.dtype}), not uint8 of "
                  f"{groups}")
    places = idx.to(torch.int64)
    if bool((places >= m).any()) or (n > 1 and bool((places[..., 1:] <= places[..., :-1]).any())):
        raise bad(f"has places in its groups that are not increasing and below {m}")
    starts = torch.arange(groups[0] * groups[1]).view(groups[0], groups[1], 1) * m
    return SparseWeight(shape, (starts + places).reshape(-1), values.reshape(-1).contiguous(),
                        structure)
