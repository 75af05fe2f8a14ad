"""An explicitly given data folder is the only place looked at: no system copy, cache, download."""

import pytest

import sparsetrain.data.datasets as datasets
from sparsetrain.data import DataFileError, load_dataset
from tests.data.test_fashion_mnist import fake_fashion_mnist as fake_files


def fake_fashion_mnist(folder, **sizes):
    folder.mkdir(parents=True)
    return fake_files(folder, **sizes)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Complete copies in the system folder and the cache, and downloads that would succeed:
    every fallback that an explicit ``data_dir`` must not reach."""
    system = fake_fashion_mnist(tmp_path / "system", n_train=10, n_test=5)
    fake_fashion_mnist(tmp_path / "cache" / "mnist", n_train=10, n_test=5)
    fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist", n_train=10, n_test=5)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", system)
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    return tmp_path


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_missing_data_dir_is_an_error(elsewhere, name):
    missing = elsewhere / "nonexistent"
    with pytest.raises(DataFileError) as error:
        load_dataset(name, missing)
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "train-images-idx3-ubyte" in message and "--data-dir" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_data_dir_missing_a_file_is_an_error(elsewhere, name):
    folder = fake_fashion_mnist(elsewhere / "mine", n_train=10, n_test=5)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileError) as error:
        load_dataset(name, folder)
    message = str(error.value)
    assert str(folder) in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message  # only what is missing is named
    assert "\n" not in message


def test_the_named_subfolder_is_looked_at(elsewhere):
    fake_fashion_mnist(elsewhere / "mine" / "mnist", n_train=7, n_test=3)
    assert len(load_dataset("mnist", elsewhere / "mine").train_y) == 7


def test_without_data_dir_the_fallbacks_still_apply(elsewhere):
    assert len(load_dataset("fashion-mnist").train_y) == 10
    assert len(load_dataset("mnist", download=False).train_y) == 10


def test_cifar10_sample_data_dir_does_not_fall_back_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CIFAR10_SAMPLE_ENV, str(tmp_path / "elsewhere.npz"))
    (tmp_path / "elsewhere.npz").write_bytes(b"")
    with pytest.raises(DataFileError) as error:
        load_dataset("cifar10-sample", tmp_path / "mine")
    assert str(tmp_path / "mine") in str(error.value)
    assert "elsewhere.npz" not in str(error.value)
