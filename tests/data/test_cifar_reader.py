"""The restricted CIFAR batch reader on the official file layout and its variants."""

import pickle
import pickletools

import numpy as np
import pytest

from sparsetrain.data import DataFileError
from sparsetrain.data.cifar import read_batch
from tests.data.py2_pickle import py2_batch


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_official_layout(tmp_path):
    data, labels = images(5), [3, 0, 9, 9, 1]
    content = py2_batch(data, labels)
    with open(tmp_path / "listing", "w") as listing:
        pickletools.dis(content, out=listing)  # a well-formed pickle
    (tmp_path / "data_batch_1").write_bytes(content)
    x, y = read_batch(tmp_path / "data_batch_1", b"labels", 10, 10_000)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.uint8 and x.flags.writeable
    assert np.array_equal(x.reshape(5, -1), data)
    assert y.dtype == np.int64 and y.tolist() == labels


def test_cifar100_keys(tmp_path):
    (tmp_path / "test").write_bytes(py2_batch(images(3), [99, 0, 42], b"fine_labels"))
    _, y = read_batch(tmp_path / "test", b"fine_labels", 100, 10_000)
    assert y.tolist() == [99, 0, 42]
    with pytest.raises(DataFileError, match="does not hold CIFAR data and labels"):
        read_batch(tmp_path / "test", b"labels", 10, 10_000)


@pytest.mark.parametrize("labels", [np.array([1, 2, 3], ">i8"), np.array([1, 2, 3], np.uint8),
                                    [np.int64(1), np.int32(2), 3], (1, 2, 3)],
                         ids=["big-endian-array", "uint8-array", "numpy-scalars", "tuple"])
def test_label_variants_written_by_python3(tmp_path, labels):
    data = np.asfortranarray(images(3).reshape(3, 3072))
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=3))
    x, y = read_batch(tmp_path / "b", b"labels", 10, 10_000)
    assert y.tolist() == [1, 2, 3] and np.array_equal(x.reshape(3, -1), data)


def test_rows_beyond_the_official_count(tmp_path):
    (tmp_path / "b").write_bytes(py2_batch(images(11), [0] * 11))
    with pytest.raises(DataFileError, match=r"11x3072 uint8 \(33792 bytes\).*at most 10 images"):
        read_batch(tmp_path / "b", b"labels", 10, 10)


@pytest.mark.parametrize("content, match", [
    (pickle.dumps({b"data": {1, 2}}, protocol=4), "pickle operation EMPTY_SET"),
    (pickle.dumps({b"data": np.zeros((1, 3072), "U1"), b"labels": [0]}, protocol=3),
     "numpy type other than a plain number"),
    (pickle.dumps({b"data": np.zeros((1, 3072), object), b"labels": [0]}, protocol=3),
     "numpy type other than a plain number"),
    (pickle.dumps({b"data": np.zeros((1, 3), [("a", "u1")]), b"labels": [0]}, protocol=3),
     "numpy type other than a plain number"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=5),
     "asks for numpy._core.numeric._frombuffer"),
])
def test_refusals(tmp_path, content, match):
    (tmp_path / "b").write_bytes(content)
    with pytest.raises(DataFileError, match=match) as error:
        read_batch(tmp_path / "b", b"labels", 10, 10_000)
    assert str(tmp_path / "b") in str(error.value) and "\n" not in str(error.value)
