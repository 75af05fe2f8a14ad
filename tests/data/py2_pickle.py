"""CIFAR batches laid out as the official files are: pickled by Python 2 (protocol 2, strings as
``SHORT_BINSTRING``/``BINSTRING``, numpy under ``numpy.core.multiarray``), written here opcode by
opcode since Python 3 pickles bytes differently."""

from __future__ import annotations

import struct

import numpy as np


def _string(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<i", len(value)) + value


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _array(a: np.ndarray) -> bytes:
    """``a`` as numpy pickles an array under Python 2: _reconstruct, then its state."""
    shape = b"(" + b"".join(_int(n) for n in a.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _string(a.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
             + b"(K\x03" + _string(a.dtype.str[:1].encode()) + b"NNNJ\xff\xff\xff\xffJ\xff\xff"
             + b"\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + _string(a.tobytes()) + b"tb")


def py2_batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch file: ``batch_label``, ``data``, the labels as a list, and ``filenames``."""
    names = b"".join(_string(b"image_%05d.png" % i) for i in range(len(labels)))
    return (b"\x80\x02}q\x01(" + _string(b"batch_label") + _string(b"training batch 1 of 5")
            + _string(b"data") + _array(data)
            + _string(label_key) + b"](" + b"".join(_int(v) for v in labels) + b"e"
            + _string(b"filenames") + b"](" + names + b"e" + b"u.")
