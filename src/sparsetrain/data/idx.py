"""Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Format (LeCun et al.): a 4-byte magic ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian uint32
sizes, then the data in C order. Only the unsigned-byte type (0x08) is used by these data sets.

The file is read as a stream: the header is checked first, against ``MAX_BYTES``, and then no
more than the size it states (plus one byte, to see whether the file goes on) is read or
inflated, so a small corrupt or hostile file cannot cost more memory or time than its header
honestly allows.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
#: The most data bytes a header may state: over five times the largest official file
#: (60,000 images of 28x28, 47 MB).
MAX_BYTES = 1 << 28
MAX_NDIM = 4
_AGAIN = "download or copy the official file again"


class DataFileError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _type_name(code: int) -> str:
    return f"{np.dtype(_DTYPES[code]).name} (type 0x{code:02X})"


def _read(path: Path, f, n: int, what: str) -> bytearray:
    """The next ``n`` bytes of ``f``, read a block at a time, so that a header claiming more
    than the file holds costs no more memory than the file."""
    data = bytearray()
    while len(data) < n and (block := f.read(min(n - len(data), 1 << 20))):
        data += block
    if len(data) != n:
        raise DataFileError(f"{path} is truncated: it ends {len(data)} bytes into its {what} of "
                            f"{n} bytes; {_AGAIN}")
    return data


def _parse(path: Path, f, ndim: int | None, uint8: bool) -> np.ndarray:
    magic = _read(path, f, 4, "magic number")
    if magic[0] or magic[1]:
        raise DataFileError(f"{path} is not an IDX file: it starts with {magic.hex(' ')}, "
                            f"expected 00 00 <type> <number of dimensions>; {_AGAIN}")
    code, rank = magic[2], magic[3]
    if code not in _DTYPES:
        raise DataFileError(f"{path} has the unknown IDX data type 0x{code:02X}; expected "
                            "0x08 (unsigned bytes) as in the official files, or one of "
                            + ", ".join(f"0x{c:02X}" for c in _DTYPES if c != 0x08) + f"; {_AGAIN}")
    if uint8 and code != 0x08:
        raise DataFileError(f"{path} stores {_type_name(code)}; expected unsigned bytes "
                            f"(type 0x08) as in the official files; {_AGAIN}")
    if ndim is not None and rank != ndim or not 1 <= rank <= MAX_NDIM:
        raise DataFileError(f"{path} has {rank} dimensions; expected "
                            f"{ndim if ndim is not None else f'1 to {MAX_NDIM}'}; {_AGAIN}")
    shape = struct.unpack(f">{rank}I", _read(path, f, 4 * rank, "header"))
    dtype = np.dtype(_DTYPES[code])
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_BYTES:
        raise DataFileError(f"{path} claims {_shape_text(shape)} values of {dtype.itemsize} "
                            f"byte(s), {size} bytes, but an IDX file may hold at most "
                            f"{MAX_BYTES}; its header is corrupt (IDX sizes are big-endian); "
                            f"{_AGAIN}")
    data = _read(path, f, size, f"{_shape_text(shape)} values")
    if f.read(1):
        raise DataFileError(f"{path} is longer than its header says ({_shape_text(shape)}, "
                            f"{size} bytes of data); {_AGAIN}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def read_idx(path: str | Path, *, ndim: int | None = None, uint8: bool = False) -> np.ndarray:
    """The array stored in IDX file ``path`` (``.gz`` files are decompressed as they are read).

    ``ndim`` and ``uint8`` say what the caller expects (that many dimensions; unsigned bytes);
    anything else, or any damage, raises ``DataFileError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            return _parse(path, f, ndim, uint8)
    except (OSError, EOFError, zlib.error) as exc:
        kind = "gzip file" if path.suffix == ".gz" else "file"
        raise DataFileError(f"{path} is not a readable {kind} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())}); {_AGAIN}") from None
