"""Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Format (LeCun et al.): a 4-byte magic ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian uint32
sizes, then the data in C order. Only the unsigned-byte type (0x08) is used by these data sets.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file ``path`` (``.gz`` files are decompressed)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(
            f"{path} is not a readable gzip file ({exc}); download or reinstall it"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataFileError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path} is truncated: its header is incomplete")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFileError(
            f"{path} has {len(raw)} bytes, but its header {shape} says {expected}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
