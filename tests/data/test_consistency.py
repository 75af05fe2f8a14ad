"""Files that are each well formed but do not fit together are refused at load, naming the file."""

import pickle

import numpy as np
import pytest

from sparsetrain.data import DataFileError, load_dataset
from tests.data.test_fashion_mnist import fake_fashion_mnist, write_idx

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def refusal(name, folder) -> str:
    with pytest.raises(DataFileError) as error:
        load_dataset(name, folder, download=False)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_test_images_of_another_size(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 27, 27)))
    message = refusal("mnist", tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in message and "27x27" in message and "28x28" in message


def test_labels_and_images_differ_in_count(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19))
    message = refusal("mnist", tmp_path)
    assert "train-labels-idx1-ubyte.gz" in message and "19" in message and "20" in message


def test_idx_labels_beyond_the_classes(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 10))
    message = refusal("fashion-mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in message and "0..9" in message


def test_images_of_wrong_rank(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((20, 784)))
    message = refusal("mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in message and "(N, rows, columns)" in message


def test_empty_training_set(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=0, n_test=10)
    message = refusal("mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in message and "no images" in message


def test_cifar_labels_beyond_the_classes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in CIFAR10_FILES:
        labels = [0, 1, 10] if name == "data_batch_4" else [0, 1, 2]
        (folder / name).write_bytes(pickle.dumps(
            {b"data": np.zeros((3, 3072), np.uint8), b"labels": labels}))
    message = refusal("cifar10", tmp_path)
    assert "data_batch_4" in message and "0..9" in message
