"""Small files that claim or build far more than the official data sets hold are refused at once.

Each case is kept small enough to stay cheap even on a reader that lacks the bound; the test
checks that the refusal comes quickly, in one line, without building what the file asks for.
"""

import gzip
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest

from sparsetrain.data import DataFileError, load_dataset, read_idx

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MiB = 1 << 20


def refused_quickly(load, *args) -> str:
    """The message of the ``DataFileError`` that ``load(*args)`` raises; fails unless it is one
    line and came within a second."""
    start = time.perf_counter()
    with pytest.raises(DataFileError) as error:
        load(*args)
    seconds, message = time.perf_counter() - start, str(error.value)
    assert seconds < 1 and "\n" not in message, (seconds, message)
    return message


def peak_memory(load, *args) -> int:
    """The most memory (bytes) that ``load(*args)`` held at once before it failed."""
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError):
            load(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def idx_header(*shape, code=0x08):
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def test_gzip_that_inflates_beyond_its_header(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_header(10) + bytes(40 * MiB), compresslevel=1))
    assert path.stat().st_size < MiB
    message = refused_quickly(read_idx, path)
    assert str(path) in message and "longer than its header" in message
    assert peak_memory(read_idx, path) < 4 * MiB  # inflates only what the header says, + a bit


def test_header_claiming_an_absurd_size(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_header(60000, 4000, 4000) + bytes(40 * MiB),
                                   compresslevel=1))
    message = refused_quickly(read_idx, path)
    assert str(path) in message and "60000x4000x4000" in message and "at most" in message
    assert peak_memory(read_idx, path) < 4 * MiB


def test_little_endian_header_is_refused_by_its_size(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack("<3I", 10, 28, 28) + bytes(7840))
    message = refused_quickly(read_idx, path)
    assert str(path) in message and "big-endian" in message


def write_batches(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    good = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10},
                        protocol=3)
    for name in CIFAR10_FILES:
        (folder / name).write_bytes(content if name == "test_batch" else good)


def shared_nesting(depth, fan=10, leaf=0, kind=list):
    """``fan`` references to ``fan`` references to ... ``leaf``: tiny as a pickle (memo
    references), ``fan ** depth`` elements when walked."""
    value = leaf
    for _ in range(depth):
        value = kind([value] * fan)
    return value


def test_cifar_labels_laughing_through_the_memo(tmp_path):
    # A million labels from a 300-byte structure (the report had 10 ** 9: 45 s, then 29 GiB).
    bomb = shared_nesting(6)
    content = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": bomb},
                           protocol=3)
    write_batches(tmp_path / "cifar-10-batches-py", content)
    message = refused_quickly(load_dataset, "cifar10", tmp_path)
    assert "test_batch" in message and "labels must be integers" in message


def test_cifar_dict_key_laughing_through_the_memo(tmp_path):
    # Hashing a key of shared nested tuples walks all of them: 10 ** 8 here if it were allowed.
    # Written as dict, key, value, SETITEM: a dict literal here would hash the key itself.
    content = b"\x80\x03}" + pickle.dumps(shared_nesting(8, kind=tuple), protocol=3)[2:-1] \
        + b"K\x00s."
    assert len(content) < 2000
    write_batches(tmp_path / "cifar-10-batches-py", content)
    message = refused_quickly(load_dataset, "cifar10", tmp_path)
    assert "test_batch" in message and "dictionary key" in message


def test_cifar_array_claiming_more_than_a_batch(tmp_path):
    class Huge:
        """Pickles as numpy does an array of shape (10 ** 9, 3072), but with one byte."""

        def __reduce__(self):
            rebuild, args, (version, _, dtype, fortran, _) = np.zeros(1, np.uint8).__reduce__()
            return rebuild, args, (version, (10 ** 9, 3072), dtype, fortran, b"\0")

    content = pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=3)
    write_batches(tmp_path / "cifar-10-batches-py", content)
    message = refused_quickly(load_dataset, "cifar10", tmp_path)
    assert "test_batch" in message and "1000000000x3072" in message and "at most" in message


def test_cifar_too_many_objects(tmp_path):
    content = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10,
                            b"extra": [None] * 300_000}, protocol=3)
    write_batches(tmp_path / "cifar-10-batches-py", content)
    message = refused_quickly(load_dataset, "cifar10", tmp_path)
    assert "test_batch" in message and "objects" in message


def test_cifar_file_larger_than_any_official_batch(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py", b"")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        f.truncate(64 * MiB)  # sparse: costs no disk
    message = refused_quickly(load_dataset, "cifar10", tmp_path)
    assert "test_batch" in message and "at most" in message
    assert peak_memory(load_dataset, "cifar10", tmp_path) < 4 * MiB
