"""load_dataset: every loader on small files written here, errors, prepare() and augmentation."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

import sparsetrain.data.datasets as datasets
from sparsetrain.data import DataFileError, available_datasets, load_dataset, random_crop_flip
from tests.data.test_fashion_mnist import fake_fashion_mnist


def test_available():
    assert available_datasets() == sorted(["fashion-mnist", "mnist", "cifar10", "cifar100",
                                           "cifar10-sample", "digits", "synthetic", "text"])
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*synthetic"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_from_data_dir(tmp_path, name, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    fake_fashion_mnist(tmp_path, n_train=40, n_test=20)
    ds = load_dataset(name, tmp_path, download=False)
    assert ds.input_shape == (1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert len(ds.train_y) == 40 and len(ds.test_y) == 20 and ds.num_classes == 10
    x = ds.prepare(ds.train_x, train=True)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.01


def test_idx_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    with pytest.raises(DataFileError, match="mnist files .* not found"):
        load_dataset("mnist", download=False)
    with pytest.raises(DataFileError, match="mnist: .* lacks train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, download=False)


def test_download_verifies_checksums(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    fake_fashion_mnist(source, n_train=10, n_test=5)
    files = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()}
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(datasets.DOWNLOADS, "mnist", (source.as_uri() + "/", files))
    ds = load_dataset("mnist")
    assert len(ds.train_y) == 10
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(files)

    bad = dict(files, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache2")
    monkeypatch.setitem(datasets.DOWNLOADS, "mnist", (source.as_uri() + "/", bad))
    with pytest.raises(DataFileError, match="MD5"):
        load_dataset("mnist")
    left = sorted(p.name for p in (tmp_path / "cache2" / "mnist").iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in left and not any(n.startswith(".") for n in left)


def test_download_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(datasets.DOWNLOADS, "mnist",
                        ((tmp_path / "nowhere").as_uri() + "/", datasets.DOWNLOADS["mnist"][1]))
    with pytest.raises(DataFileError, match="cannot download.*--data-dir"):
        load_dataset("mnist")


def write_cifar(folder, files, label_key, n=6, classes=10, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: list(rng.integers(0, classes, n))}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.input_shape == (3, 32, 32) and len(ds.train_y) == 30 and len(ds.test_y) == 6
    raw = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.equal(ds.train_x[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))
    assert ds.augment_by_default
    assert load_dataset("cifar10", folder).train_x.shape == ds.train_x.shape


def test_cifar100_batches(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels", classes=100)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and len(ds.train_y) == 6


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, match", [
    (pickle.dumps(Exploit()), "refused: it asks for builtins.print, but only numpy"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:50], "not a "
     "readable"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "expected uint8"),
    (pickle.dumps([1, 2, 3]), "does not hold"),
])
def test_bad_cifar_files(tmp_path, content, match, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(DataFileError, match=match) as error:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in str(error.value)
    assert "must never run" not in capsys.readouterr().out


def test_cifar_needs_its_folder(tmp_path):
    with pytest.raises(DataFileError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataFileError, match="not found"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_sample(cifar10_sample, monkeypatch):
    ds = load_dataset("cifar10-sample")  # the file named by $SPARSETRAIN_CIFAR10_SAMPLE
    assert (len(ds.train_y), len(ds.test_y)) == (5438, 1017)
    assert ds.input_shape == (3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.test_y).min() > 80
    monkeypatch.delenv(datasets.CIFAR10_SAMPLE_ENV)
    for data_dir in (cifar10_sample.parent, cifar10_sample):  # its folder, or the file itself
        assert torch.equal(load_dataset("cifar10-sample", data_dir).test_y, ds.test_y)


def test_cifar10_sample_is_looked_for_only_where_told(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.CIFAR10_SAMPLE_ENV, raising=False)
    with pytest.raises(DataFileError, match=r"needs the file cifar10_sample.npz: pass its folder "
                                            r"as --data-dir, or set \$SPARSETRAIN_CIFAR10_SAMPLE"):
        load_dataset("cifar10-sample")
    monkeypatch.setenv(datasets.CIFAR10_SAMPLE_ENV, str(tmp_path / "missing.npz"))
    with pytest.raises(DataFileError, match=r"not found in .*missing.npz; pass its folder"):
        load_dataset("cifar10-sample")
    with pytest.raises(DataFileError, match=r"not found in .*cifar10_sample.npz; pass") as error:
        load_dataset("cifar10-sample", tmp_path)  # the given folder only, not the variable's
    assert "missing.npz" not in str(error.value)


def test_cifar10_sample_checksum(tmp_path):
    np.savez(tmp_path / "cifar10_sample.npz", x_train=np.zeros((2, 3072), np.uint8))
    with pytest.raises(DataFileError, match="SHA-256"):
        load_dataset("cifar10-sample", tmp_path)


def test_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and len(ds.train_y) + len(ds.test_y) == 1797


def test_synthetic_is_seeded_and_shaped():
    a = load_dataset("synthetic", n_train=50, n_test=10, input_shape=[3, 4, 5], num_classes=3)
    b = load_dataset("synthetic", n_train=50, n_test=10, input_shape=[3, 4, 5], num_classes=3)
    c = load_dataset("synthetic", n_train=50, n_test=10, input_shape=[3, 4, 5], num_classes=3,
                     seed=1)
    assert a.input_shape == (3, 4, 5) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.train_x, c.train_x)
    with pytest.raises(ValueError, match="bad options"):
        load_dataset("synthetic", colour=True)


def reference_crop_flip(x, offsets, flips, padding=4):
    out = torch.empty_like(x)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i in range(len(x)):
        r, c = offsets[i].tolist()
        img = padded[i, :, r:r + x.shape[2], c:c + x.shape[3]]
        out[i] = img.flip(2) if flips[i] else img
    return out


def test_augmentation_matches_a_per_image_reference():
    x = torch.rand(16, 3, 32, 32)
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert torch.equal(out, reference_crop_flip(x, offsets, flips))
    assert flips.any() and (~flips).any() and (offsets != 4).any()
    again = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_prepare_augments_only_when_training():
    ds = load_dataset("synthetic", n_train=8, n_test=4, input_shape=[3, 32, 32])
    plain = ds.prepare(ds.train_x, train=False)
    assert torch.equal(plain, ds.prepare(ds.train_x, train=True))  # not on by default here
    augmented = ds.prepare(ds.train_x, train=True, augment=True,
                           generator=torch.Generator().manual_seed(0))
    assert not torch.equal(plain, augmented) and augmented.shape == plain.shape


class DirectArray:
    """Pickles as a direct call of numpy.ndarray(shape, dtype, buffer, offset, strides)."""

    def __reduce__(self):
        return (np.ndarray, ((4,), np.uint8, b"abcd", 0, (1,)))


def test_cifar_reader_refuses_direct_array_construction(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": DirectArray(), b"labels": [0]}))
    with pytest.raises(DataFileError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)
