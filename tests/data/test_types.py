"""Values of the wrong type are refused, naming the file and what was expected, never converted."""

import pickle

import numpy as np
import pytest

from sparsetrain.data import DataFileError, load_dataset, read_idx
from tests.data.test_fashion_mnist import fake_fashion_mnist

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_refusal(tmp_path, labels) -> str:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in CIFAR10_FILES:
        batch = {b"data": np.zeros((3, 3072), np.uint8),
                 b"labels": labels if name == "data_batch_2" else [0, 1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(DataFileError) as error:
        load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert "data_batch_2" in message and "\n" not in message
    return message


@pytest.mark.parametrize("labels", [[0.0, 1.5, 2.0], [0.0, 1.0, 2.0], np.array([0.0, 1.0, 2.0]),
                                    [np.float32(0), np.float32(1), np.float32(2)]],
                         ids=["floats", "whole-floats", "float-array", "numpy-floats"])
def test_cifar_float_labels(tmp_path, labels):
    assert "labels must be integers" in cifar_refusal(tmp_path, labels)


@pytest.mark.parametrize("labels", [[b"0", b"1", b"2"], ["0", "1", "2"], [True, False, True]],
                         ids=["bytes", "str", "bool"])
def test_cifar_labels_of_other_types(tmp_path, labels):
    message = cifar_refusal(tmp_path, labels)
    assert "labels must be integers" in message and type(labels[0]).__name__ in message


def idx_file(path, code, body=b"\0" * 40, shape=(10,)):
    path.write_bytes(bytes([0, 0, code, len(shape)])
                     + b"".join(n.to_bytes(4, "big") for n in shape) + body)
    return path


def test_idx_unknown_type_code(tmp_path):
    path = idx_file(tmp_path / "labels", 0x07)
    with pytest.raises(DataFileError) as error:
        read_idx(path)
    assert str(path) in str(error.value) and "0x07" in str(error.value)
    assert "0x08" in str(error.value)  # says what it expected


@pytest.mark.parametrize("code, itemsize, what", [(0x0C, 4, "int32"), (0x0D, 4, "float32"),
                                                  (0x09, 1, "int8")], ids=["i4", "f4", "i1"])
@pytest.mark.parametrize("stem", ["t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"])
def test_idx_files_not_of_unsigned_bytes(tmp_path, code, itemsize, what, stem):
    fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    (tmp_path / f"{stem}.gz").unlink()
    shape = (10,) if "labels" in stem else (10, 1, 1)
    path = idx_file(tmp_path / stem, code, b"\0" * 10 * itemsize, shape)
    with pytest.raises(DataFileError) as error:
        load_dataset("mnist", tmp_path, download=False)
    message = str(error.value)
    assert str(path) in message and what in message and "unsigned bytes (type 0x08)" in message


def test_idx_bad_magic_says_what_it_expected(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(b"\x01\x02\x08\x03" + b"\0" * 12)
    with pytest.raises(DataFileError) as error:
        read_idx(path)
    assert str(path) in str(error.value) and "00 00" in str(error.value)
