"""Reading a sparse model file (see :mod:`.format`), every part of it checked before use:
``SparseFileError`` saying what is wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .format import (FORMAT, FORMAT_VERSION, LAYOUTS, PARTS, SEP, SparseFileError, SparseModel,
                     SparseWeight, checksum)


def load(path: str | Path) -> SparseModel:
    """The model in the file at ``path``, checked; ``SparseFileError`` saying what is wrong
    (missing, truncated or not safetensors, not a sparse model file, a newer format, changed
    since export, an inconsistent structure)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SparseFileError(f"{path} does not exist or is not a file; give the path of a "
                              "file written by `sparsetrain export` (st.export_sparse)")
    try:  # memory-mapped: the tensors are read once, into their own memory
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, ValueError, KeyError, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise SparseFileError(f"{path} is not a complete safetensors file (truncated, or not "
                              f"safetensors at all: {why}); export the model again") from None
    return decode(tensors, metadata, str(path))


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
