"""Reader for the batches of the official python version of CIFAR-10 and CIFAR-100.

A batch is a pickled dict: ``data``, a uint8 array (N, 3072), and the labels, a list of N
integers (``labels`` in CIFAR-10; ``fine_labels`` and ``coarse_labels`` in CIFAR-100), with some
names and strings beside. Pickle can run code and build far more than a file holds, so a batch
is read by a restricted unpickler that

* imports nothing: the only names a file may use (numpy's array, scalar and dtype) are answered
  from a fixed table by stand-ins that check what they are given before numpy sees it;
* admits only the pickle operations of plain data (no sets, no instances of other classes, no
  extensions or out-of-band buffers), and only strings, bytes and integers as dict keys;
* is bounded by the size of the official files: a batch of at most ``max_rows`` images (10,000,
  or 50,000 for CIFAR-100's training set) may take at most ``16 * max_rows + 10,000``
  operations (which bounds the number of objects and of memo entries; an official batch takes
  about 5 per image), arrays of at most ``3072 * max_rows`` bytes, and a file of at most
  ``3328 * max_rows`` bytes plus 1 MiB.

Anything else is refused with one ``DataFileError`` naming the file, within about a second.
"""

from __future__ import annotations

import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from .idx import DataFileError

IMAGE_BYTES = 3072  # 3 x 32 x 32
# Plain numeric types an array or scalar in a batch may have (numpy's pickled dtype codes).
_CODES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}
_OPERATIONS = {
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "EMPTY_LIST", "APPEND",
    "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT",
    "DICT", "SETITEM", "SETITEMS", "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT",
    "LONG_BINPUT", "MEMOIZE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
}


class _Refused(pickle.UnpicklingError):
    """The file asks for something a CIFAR batch never holds; the message says what."""


def _printable(text: str, limit: int = 200) -> str:
    """``text`` from a file, cut to ``limit`` characters, with unprintable ones escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


class _Dtype:
    """Stands for ``numpy.dtype``: a plain numeric type named by its code; its pickled state
    may set the byte order and nothing else (no fields, no sub-arrays)."""

    def __init__(self, code, align=False, copy=False):
        if isinstance(code, bytes):
            code = code.decode("latin-1")
        if not isinstance(code, str) or code not in _CODES:
            raise _Refused("holds a numpy type other than a plain number")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) in (8, 9) else None
        if isinstance(order, bytes):
            order = order.decode("latin-1")
        if order not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]):
            raise _Refused("holds a numpy type other than a plain number")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """Stands for a ``numpy.ndarray`` being unpickled: its state (shape, type, bytes) is checked
    against ``max_bytes`` and its own length before ``array`` is built from it."""

    def __init__(self, max_bytes: int, max_rows: int):
        self.array: np.ndarray | None = None
        self.max_bytes, self.max_rows = max_bytes, max_rows

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5) or self.array is not None:
            raise _Refused("holds an array in an unknown form")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(shape, tuple) or len(shape) > 4 \
                or any(type(n) is not int or n < 0 for n in shape) or not isinstance(dtype, _Dtype):
            raise _Refused("holds an array in an unknown form")
        nbytes = math.prod(shape) * dtype.dtype.itemsize
        if nbytes > self.max_bytes:
            raise _Refused(f"claims an array of {_shape_text(shape)} {dtype.dtype.name} "
                           f"({nbytes} bytes), but a batch of at most {self.max_rows} images "
                           f"holds at most {self.max_bytes}")
        if not isinstance(raw, bytes) or len(raw) != nbytes:
            raise _Refused(f"holds an array of {_shape_text(shape)} {dtype.dtype.name} whose data "
                           f"is not {nbytes} bytes")
        flat = np.frombuffer(raw, dtype=dtype.dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy(order="C")


def _rebuild_scalar(dtype, data=None):
    """A numpy scalar of a plain type from exactly its bytes."""
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes) \
            or len(data) != dtype.dtype.itemsize:
        raise _Refused("holds a numpy scalar in an unknown form")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


class _ArrayType:
    """Stands for ``numpy.ndarray`` in a batch file: only ``_reconstruct`` accepts it, so a
    file cannot call the array constructor itself (with a buffer, offset and strides of its
    choosing) and read memory outside its own data."""


class _Bounded:
    """A file that answers no read beyond its end, whatever length a pickle claims."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        if 0 <= n <= 1 << 16:  # most reads: a byte or a few
            return self.f.read(n)
        left = self.size - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline()


class _Operations(dict):
    """The unpickler's table of operations by code; a code that is none is a corrupt file."""

    def __missing__(self, code: int):
        raise pickle.UnpicklingError(f"invalid load key 0x{code:02x}")


def _dispatch(checked: dict) -> dict:
    """The pure-Python unpickler's operations, each counted, those in ``checked`` replaced by
    their checked versions, the unlisted ones refused."""
    table = _Operations()
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        handler = checked.get(op.name, pickle._Unpickler.dispatch.get(code))
        if op.name not in _OPERATIONS or handler is None:
            handler = _refuse_operation(op.name)
        table[code] = _counted(handler)
    return table


def _refuse_operation(name: str):
    def refuse(self):
        raise _Refused(f"uses the pickle operation {name}, which CIFAR batches do not")
    return refuse


def _counted(handler):
    def run(self):
        self.operations += 1
        if self.operations > self.max_operations:
            raise _Refused(f"builds more than {self.max_operations} objects (pickle "
                           f"operations); a batch of at most {self.max_rows} images needs fewer")
        handler(self)
    return run


def _check_keys(keys) -> None:
    for key in keys:
        if type(key) not in (str, bytes, int):
            raise _Refused(f"has a dictionary key of type {type(key).__name__}; CIFAR batches "
                           "have only string keys")


class _BatchUnpickler(pickle._Unpickler):
    """Unpickles only what the official CIFAR batches hold: dicts, lists, strings, bytes,
    numbers and numpy arrays (built by ``_Array`` from the file's checked bytes), within the
    bounds of a batch of ``max_rows`` images. Nothing named in the file is imported: the few
    names it may use are answered from a fixed table, and any other is refused, so a crafted
    file cannot run code."""

    def __init__(self, file, max_rows: int):
        super().__init__(file, encoding="bytes")
        self.max_rows, self.operations = max_rows, 0
        self.max_operations = 16 * max_rows + 10_000
        self.reconstruct = self._reconstruct  # one bound method, known by identity
        self.callables = (self.reconstruct, _rebuild_scalar, _Dtype)

    def _reconstruct(self, cls, shape, dtype_code):
        if cls is not _ArrayType:
            raise _Refused("rebuilds an array as something other than numpy.ndarray")
        return _Array(IMAGE_BYTES * self.max_rows, self.max_rows)

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return self.reconstruct
            if name == "scalar":
                return _rebuild_scalar
        if (module, name) == ("numpy", "ndarray"):
            return _ArrayType
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        name = _printable(f"{module}.{name}", 100)
        raise _Refused(f"asks for {name}, but only numpy's array, scalar and dtype are admitted")

    def _reduce(self):
        func, args = self.stack[-2:]
        if not any(func is c for c in self.callables) or type(args) is not tuple:
            raise _Refused("calls something other than numpy's array, scalar and dtype")
        pickle._Unpickler.load_reduce(self)

    def _build(self):
        if type(self.stack[-2]) not in (_Array, _Dtype):
            raise _Refused("sets the state of something other than a numpy array or dtype")
        pickle._Unpickler.load_build(self)

    def _setitem(self):
        _check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def _setitems(self):
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_setitems(self)

    def _dict(self):
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)


_BatchUnpickler.dispatch = _dispatch({
    "REDUCE": _BatchUnpickler._reduce, "BUILD": _BatchUnpickler._build,
    "SETITEM": _BatchUnpickler._setitem, "SETITEMS": _BatchUnpickler._setitems,
    "DICT": _BatchUnpickler._dict,
})


def _labels(path: Path, labels, key: str, classes: int) -> np.ndarray:
    """``labels`` as int64, if they are integers in 0..classes-1."""
    if isinstance(labels, _Array):
        if labels.array is None:
            raise DataFileError(f"{path}: {key} is an array without contents")
        if labels.array.ndim != 1 or labels.array.dtype.kind not in "iu":
            raise DataFileError(f"{path}: {key} must be integers; found an array of "
                                f"{labels.array.dtype.name} {labels.array.shape}")
        values = labels.array
    elif isinstance(labels, (list, tuple)):
        for i, label in enumerate(labels):
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
                raise DataFileError(f"{path}: {key} must be integers; found "
                                    f"{type(label).__name__} at position {i}")
        values = labels
    else:
        raise DataFileError(f"{path}: {key} must be a list of integers; found "
                            f"{type(labels).__name__}")
    if len(values) and (min(values) < 0 or max(values) >= classes):
        bad = next(int(v) for v in values if not 0 <= v < classes)
        raise DataFileError(f"{path}: {key} holds {bad}, outside 0..{classes - 1}")
    return np.asarray(values, dtype=np.int64)


def read_batch(path: str | Path, label_key: bytes, classes: int,
               max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of the batch file ``path``, which may
    hold at most ``max_rows`` images, with labels ``label_key`` in 0..classes-1."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"CIFAR batch {path} not found; the folder must hold every file of "
                            "the official python version")
    try:
        return _read_batch(path, label_key, classes, max_rows)
    except DataFileError as exc:
        raise DataFileError(f"{exc}; replace it with the file of the official python version "
                            "(https://www.cs.toronto.edu/~kriz/cifar.html)") from None


def _read_batch(path: Path, label_key: bytes, classes: int,
                max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    size, max_size = path.stat().st_size, (IMAGE_BYTES + 256) * max_rows + (1 << 20)
    if size > max_size:
        raise DataFileError(f"{path} has {size} bytes, but a batch of at most {max_rows} "
                            f"images takes at most {max_size}")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(_Bounded(f, size), max_rows).load()
    except _Refused as exc:
        raise DataFileError(f"{path} is refused: it {exc}") from None
    except Exception as exc:  # truncated or foreign files raise many kinds
        raise DataFileError(f"{path} is not a readable CIFAR batch ({type(exc).__name__}: "
                            f"{_printable(str(exc))})") from None
    key = label_key.decode()
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataFileError(f"{path} does not hold CIFAR data and {key}")
    data = batch[b"data"]
    data = data.array if isinstance(data, _Array) else None
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        found = "no array" if data is None else f"{data.dtype.name} {data.shape}"
        raise DataFileError(f"{path} has data {found}; expected uint8 (N, {IMAGE_BYTES})")
    labels = _labels(path, batch[label_key], key, classes)
    if len(data) == 0 or len(labels) != len(data):
        raise DataFileError(f"{path} has {len(data)} images and {len(labels)} {key}; expected "
                            "as many labels as images, and at least one")
    return data.reshape(-1, 3, 32, 32), labels
