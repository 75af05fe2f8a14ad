"""Writing a sparse model file (see :mod:`.format`): each sparse weight in the layout of its
structure where its positions have it, else CSR; the metadata and its checksum; atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import replace_atomically
from .format import FORMAT, FORMAT_VERSION, SEP, SparseModel, SparseWeight, checksum


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
