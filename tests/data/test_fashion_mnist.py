import gzip
import struct

import numpy as np
import pytest
import torch

from sparsetrain.data import FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from sparsetrain.data.idx import DataFileError


def write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_fashion_mnist(root, n_train=64, n_test=32, seed=0):
    rng = np.random.default_rng(seed)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_read_idx_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b", a, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), a)


def test_corrupt_files_get_clear_errors(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        read_idx(tmp_path / "missing.gz")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match="not a readable gzip file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataFileError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "cut", np.zeros((4, 5)), compress=False)
    (tmp_path / "cut").write_bytes((tmp_path / "cut").read_bytes()[:-3])
    with pytest.raises(DataFileError, match="cut is truncated: it ends 17 bytes into its 4x5"):
        read_idx(tmp_path / "cut")


def test_load_from_a_folder(tmp_path):
    root = fake_fashion_mnist(tmp_path)
    x, y = load_fashion_mnist("test", root, normalize=False)
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(32)]
    with pytest.raises(DataFileError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("validation", root)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_real_data_set():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10
