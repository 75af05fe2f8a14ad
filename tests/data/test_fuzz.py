"""Property-based tests: IDX files and CIFAR batches with random byte flips, cuts and insertions
are either read into consistent arrays or refused with ``DataFileError``: never another
exception, never a hang (a deadline of a few seconds per file)."""

import gzip
import math
import pickle
import struct
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.data import DataFileError, read_idx
from sparsetrain.data.cifar import read_batch
from tests.data.py2_pickle import py2_batch

pytestmark = pytest.mark.fuzz
hang_guard = settings(deadline=timedelta(seconds=5))

# Near either end (negative: from the end) where the headers and opcodes are, or anywhere.
_position = st.integers(-400, 400) | st.integers(0, 1 << 16)
mutations = st.lists(st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("cut"), _position, st.just(b"")),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=8)),
), min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    """``data`` with each edit applied in turn, positions taken modulo its length then."""
    out = bytearray(data)
    for kind, position, value in edits:
        i = position % (len(out) + 1)
        if kind == "flip" and i < len(out):
            out[i] ^= value
        elif kind == "cut":
            del out[i:]
        elif kind == "insert":
            out[i:i] = value
    return bytes(out)


def idx_bytes() -> bytes:
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    return bytes([0, 0, 8, 3]) + struct.pack(">3I", *a.shape) + a.tobytes()


def read_or_refuse(path):
    try:
        return read_idx(path)
    except DataFileError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return None


@hang_guard
@given(edits=mutations)
def test_mutated_idx(tmp_path_factory, edits):
    content = mutate(idx_bytes(), edits)
    path = tmp_path_factory.mktemp("idx") / "images"
    path.write_bytes(content)
    a = read_or_refuse(path)
    if a is not None:  # then the header describes exactly what came back
        assert a.ndim == content[3] and len(content) == 4 + 4 * a.ndim + a.nbytes
        assert a.shape == struct.unpack(f">{a.ndim}I", content[4:4 + 4 * a.ndim])


@hang_guard
@given(edits=mutations, compressed_first=st.booleans())
def test_mutated_gzip_idx(tmp_path_factory, edits, compressed_first):
    content = (mutate(gzip.compress(idx_bytes()), edits) if compressed_first
               else gzip.compress(mutate(idx_bytes(), edits)))
    path = tmp_path_factory.mktemp("idx") / "images.gz"
    path.write_bytes(content)
    a = read_or_refuse(path)
    if a is not None:
        assert a.size == math.prod(a.shape) and 1 <= a.ndim <= 4


def cifar_batches():
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = [3, 0, 9, 1]
    return [py2_batch(data, labels),
            pickle.dumps({b"data": data, b"labels": labels}, protocol=3),
            pickle.dumps({b"data": data, b"labels": [np.int64(v) for v in labels]}, protocol=4)]


@hang_guard
@given(which=st.sampled_from(range(3)), edits=mutations)
def test_mutated_cifar_batch(tmp_path_factory, which, edits):
    path = tmp_path_factory.mktemp("cifar") / "data_batch_1"
    path.write_bytes(mutate(cifar_batches()[which], edits))
    try:
        x, y = read_batch(path, b"labels", 10, 10)
    except DataFileError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, 32, 32)
    assert y.dtype == np.int64 and y.shape == (len(x),) and 1 <= len(x) <= 10
    assert ((0 <= y) & (y < 10)).all()
