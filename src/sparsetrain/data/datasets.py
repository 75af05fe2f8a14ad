"""The data sets of the experiment runner, behind one function: ``load_dataset(name)``.

| name | what | where it is looked up |
| --- | --- | --- |
| `fashion-mnist`, `mnist` | official IDX files | `data_dir`, Debian's `/usr/share/datasets/fashion-mnist/` (Fashion-MNIST), the cache `~/.cache/sparsetrain/<name>`, then downloaded (checksums verified) |
| `cifar10`, `cifar100` | official python batches (`cifar-10-batches-py/`, `cifar-100-python/`) | `data_dir` (the folder itself or its parent) |
| `cifar10-sample` | 5,438 + 1,017 real CIFAR-10 images (`cifar10_sample.npz`) | `data_dir` (the file or its folder), else the file named by `$SPARSETRAIN_CIFAR10_SAMPLE` |
| `digits` | scikit-learn's 8x8 digits (1,797 images) | scikit-learn, if installed |
| `synthetic` | seeded random tensors with a class signal, any shape | generated |

Images are kept compactly (uint8 where the source is) and turned into normalised float32 batch by
batch by ``Dataset.prepare``, which also applies the standard augmentation of 32x32 images
(random crop with 4-pixel zero padding, horizontal flip) from a given generator.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .idx import DataFileError, read_idx

CACHE = Path(os.environ.get("SPARSETRAIN_CACHE", Path.home() / ".cache" / "sparsetrain"))
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: The environment variable naming the CIFAR-10 sample file when ``data_dir`` does not hold it.
CIFAR10_SAMPLE_ENV = "SPARSETRAIN_CIFAR10_SAMPLE"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official download locations and the MD5 checksums their publishers give for the .gz files.
DOWNLOADS = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
}
CIFAR10_SAMPLE_SHA256 = "3ccea9c4f1b9dc7c3226e4a3501c70eccce3004d0e6d5c14c08cd2b9adc6920d"


@dataclass
class Dataset:
    """A data set in memory: raw training and test examples, and how to turn them into input."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per channel, of the training examples scaled to [0, 1]
    std: torch.Tensor
    augment_by_default: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def prepare(self, x: torch.Tensor, *, train: bool, augment: bool | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch of raw examples as normalised float32, augmented when training asks for it."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if train and (self.augment_by_default if augment is None else augment):
            x = random_crop_flip(x, generator=generator)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def random_crop_flip(x: torch.Tensor, *, padding: int = 4,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) cropped at a random offset of its zero-padded copy and
    flipped left-right with probability 1/2; the draws come from ``generator``."""
    if x.dim() != 4:
        raise ValueError(f"augmentation needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = offsets[:, 0:1] + torch.arange(h)                       # (N, H)
    cols = offsets[:, 1:2] + torch.arange(w)                       # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if scaled.dim() < 3:
        scaled = scaled.view(len(scaled), 1, -1)
    dims = [0] + list(range(2, scaled.dim()))
    mean = scaled.mean(dim=dims)
    std = scaled.std(dim=dims).clamp_min(1e-6)
    return mean, std


def _make(name, train_x, train_y, test_x, test_y, num_classes, augment=False) -> Dataset:
    train_y, test_y = (y.to(torch.int64) if torch.is_tensor(y)
                       else torch.tensor(np.array(y), dtype=torch.int64) for y in (train_y, test_y))
    for split, y in (("training", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataFileError(f"{name}: {split} labels outside 0..{num_classes - 1}")
    mean, std = _stats(train_x)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, mean, std, augment)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str) -> Path:
    """Fetch ``url`` to ``target`` atomically, keeping it only if its MD5 is ``md5``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        actual = _md5(tmp)
        if actual != md5:
            raise DataFileError(f"download of {url} has MD5 {actual}, expected {md5}; the file "
                                "was not kept (retry, or place the official file in --data-dir)")
        os.replace(tmp, target)
    except OSError as exc:
        raise DataFileError(f"cannot download {url} ({exc}); this machine may be offline: "
                            "place the files in a folder and pass it as --data-dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _idx_folder(name: str, data_dir: Path | None, allow_download: bool) -> Path:
    stems = [s for pair in _IDX_FILES.values() for s in pair]

    def complete(folder: Path) -> bool:
        return all((folder / s).is_file() or (folder / f"{s}.gz").is_file() for s in stems)

    candidates = []
    if data_dir is not None:
        candidates += [data_dir, data_dir / name]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    candidates.append(CACHE / name)
    for folder in candidates:
        if complete(folder):
            return folder
    if data_dir is not None and not data_dir.is_dir():
        raise DataFileError(f"data folder {data_dir} does not exist")
    if not allow_download:
        raise DataFileError(
            f"{name} files ({', '.join(stems)}, optionally .gz) not found in "
            f"{', '.join(map(str, candidates))}"
            + ("; on Debian: apt-get install dataset-fashion-mnist" if name == "fashion-mnist"
               else ""))
    base, files = DOWNLOADS[name]
    for file, md5 in files.items():
        target = CACHE / name / file
        if not target.is_file():
            download(base + file, target, md5)
    return CACHE / name


def read_idx_split(folder: Path, split: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``split`` ("train" or "test") from the IDX files in ``folder``."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def find(stem):
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
        raise DataFileError(f"{folder / stem}[.gz] not found{hint}")

    images, labels = (read_idx(find(s)) for s in _IDX_FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(f"{split} files in {folder} do not fit together: images "
                            f"{images.shape}, labels {labels.shape}")
    return images, labels


def _load_idx(name: str, data_dir: Path | None, download: bool) -> Dataset:
    folder = _idx_folder(name, data_dir, download)
    (xtr, ytr), (xte, yte) = (read_idx_split(folder, s) for s in ("train", "test"))
    return _make(name, torch.from_numpy(xtr.copy()).unsqueeze(1), ytr,
                 torch.from_numpy(xte.copy()).unsqueeze(1), yte, 10)


# --- CIFAR python batches -------------------------------------------------------------------
class _ArrayType:
    """Stands for ``numpy.ndarray`` in a batch file: only ``_rebuild_array`` accepts it, so a
    file cannot call the array constructor itself (with a buffer, offset and strides of its
    choosing) and read memory outside its own data."""


def _rebuild_array(cls, shape, dtype_code):
    if cls is not _ArrayType:
        raise pickle.UnpicklingError("an array may only be rebuilt as numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _rebuild_scalar(dtype, data=None):
    """A numpy scalar of a plain (non-object) dtype from exactly its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("only plain numpy scalars may be stored")
    return np.frombuffer(data, dtype=dtype)[0]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR batches hold: dicts, lists, strings, bytes,
    numbers and numpy arrays (rebuilt by numpy's own ``__setstate__`` from the file's bytes).
    Nothing named in the file is imported: the few names it may use are answered from a fixed
    table, and any other is refused, so a crafted file cannot run code."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _rebuild_array
            if name == "scalar":
                return _rebuild_scalar
        if (module, name) == ("numpy", "ndarray"):
            return _ArrayType
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataFileError(f"CIFAR batch {path} not found")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # truncated or foreign files raise many kinds
        raise DataFileError(f"{path} is not a readable CIFAR batch ({type(exc).__name__}: "
                            f"{exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataFileError(f"{path} does not hold CIFAR data and {label_key.decode()}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or len(labels) != len(data):
        raise DataFileError(f"{path} has data {data.shape} {data.dtype} and {len(labels)} "
                            "labels; expected uint8 (N, 3072) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, data_dir: Path | None) -> Dataset:
    folder_name, train_files, test_file, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                    "test_batch", b"labels", 10),
        "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
    }[name]
    if data_dir is None:
        raise DataFileError(f"{name} needs --data-dir: the folder {folder_name}/ of the official "
                            "python version (or its parent)")
    folder = data_dir if (data_dir / test_file).exists() else data_dir / folder_name
    if not (folder / test_file).exists():
        raise DataFileError(f"{name} batches not found in {data_dir} (looked for {test_file} "
                            f"there and in {data_dir / folder_name})")
    parts = [_read_batch(folder / f, key) for f in train_files]
    xte, yte = _read_batch(folder / test_file, key)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return _make(name, torch.from_numpy(xtr), ytr, torch.from_numpy(xte), yte, classes,
                 augment=True)


def _load_cifar10_sample(data_dir: Path | None) -> Dataset:
    """The sample from ``data_dir`` (the file, or a folder holding ``cifar10_sample.npz``), else
    from the file named by ``$SPARSETRAIN_CIFAR10_SAMPLE``; nothing else is searched."""
    candidates = []
    if data_dir is not None:
        candidates += [data_dir, data_dir / "cifar10_sample.npz"]
    if os.environ.get(CIFAR10_SAMPLE_ENV):
        candidates.append(Path(os.environ[CIFAR10_SAMPLE_ENV]))
    if not candidates:
        raise DataFileError(f"cifar10-sample needs the file cifar10_sample.npz: pass its folder "
                            f"as --data-dir, or set ${CIFAR10_SAMPLE_ENV} to its path")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise DataFileError(f"cifar10_sample.npz not found in {', '.join(map(str, candidates))}; "
                            f"pass its folder as --data-dir, or set ${CIFAR10_SAMPLE_ENV} to its "
                            "path")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CIFAR10_SAMPLE_SHA256:
        raise DataFileError(f"{path} has SHA-256 {digest}, not the published "
                            f"{CIFAR10_SAMPLE_SHA256}; it is damaged or another file")
    with np.load(path, allow_pickle=False) as f:
        xtr, ytr, xte, yte = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    return _make("cifar10-sample", torch.from_numpy(xtr.reshape(-1, 3, 32, 32).copy()), ytr,
                 torch.from_numpy(xte.reshape(-1, 3, 32, 32).copy()), yte, 10, augment=True)


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataFileError("the digits data set comes with scikit-learn: pip install "
                            "scikit-learn") from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return _make("digits", x[train], y[train], x[test], y[test], 10)


def make_synthetic(n_train: int = 1000, n_test: int = 200,
                   input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                   seed: int = 0, noise: float = 1.0) -> Dataset:
    """Random examples ``class mean + noise``: seeded, any shape, learnable above chance."""
    shape = tuple(int(s) for s in input_shape)
    if n_train <= 0 or n_test <= 0 or num_classes < 2 or not shape or min(shape) <= 0:
        raise ValueError("synthetic needs positive n_train, n_test and input_shape sizes and "
                         "num_classes >= 2")
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(num_classes, *shape, generator=g)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return means[y] + noise * torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xte, yte) = draw(int(n_train)), draw(int(n_test))
    return _make("synthetic", xtr, ytr, xte, yte, num_classes)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": lambda d, download, **o: _load_idx("fashion-mnist", d, download, **o),
    "mnist": lambda d, download, **o: _load_idx("mnist", d, download, **o),
    "cifar10": lambda d, download, **o: _load_cifar("cifar10", d, **o),
    "cifar100": lambda d, download, **o: _load_cifar("cifar100", d, **o),
    "cifar10-sample": lambda d, download, **o: _load_cifar10_sample(d, **o),
    "digits": lambda d, download, **o: _load_digits(**o),
    "synthetic": lambda d, download, **o: make_synthetic(**o),
}


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True,
                 **options) -> Dataset:
    """The data set ``name`` (see the table above); ``options`` go to its loader."""
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; the data sets are: "
                         f"{', '.join(available_datasets())}")
    try:
        return _LOADERS[name](None if data_dir is None else Path(data_dir), download, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for data set {name!r}: {exc}") from None
