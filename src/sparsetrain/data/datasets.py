"""The data sets of the experiment runner, behind one function: ``load_dataset(name)``.

| name | what | where it is looked up |
| --- | --- | --- |
| `fashion-mnist`, `mnist` | official IDX files | `data_dir` (or its subfolder `<name>`) alone when given; else Debian's `/usr/share/datasets/fashion-mnist/` (Fashion-MNIST), the cache `~/.cache/sparsetrain/<name>`, then downloaded (checksums verified) |
| `cifar10`, `cifar100` | official python batches (`cifar-10-batches-py/`, `cifar-100-python/`) | `data_dir` (the folder itself or its parent) |
| `cifar10-sample` | 5,438 + 1,017 real CIFAR-10 images (`cifar10_sample.npz`) | `data_dir` (the file or its folder) alone when given, else the file named by `$SPARSETRAIN_CIFAR10_SAMPLE` |
| `digits` | scikit-learn's 8x8 digits (1,797 images) | scikit-learn, if installed |
| `synthetic` | seeded random tensors with a class signal, any shape | generated |
| `text` | byte-level text for language modelling (``kind == "sequence"``; see ``text``) | the files or folders of `data_dir`; without it the Python standard library's `.py` files (first 1 MiB) |

A folder given as ``data_dir`` is the only place looked at: if it lacks a file, loading fails
naming the folder and the file, never falling back to another copy. Every file is checked as it
is read (type, size, shape, labels in range, train and test agreeing) and refused with a
``DataFileError`` naming it; see ``idx`` and ``cifar`` for the bounds that keep a small corrupt or
hostile file from costing more than the official files do.

Images are kept compactly (uint8 where the source is) and turned into normalised float32 batch by
batch by ``Dataset.prepare``, which also applies the standard augmentation of 32x32 images
(random crop with 4-pixel zero padding, horizontal flip) from a given generator.

A data set's ``kind`` says what its examples are: ``"classification"`` (an input and one label
each) or ``"sequence"`` (byte sequences whose targets are the next byte at every position, a
label per position: the ``text`` data set). ``prepare_targets`` turns a batch of targets into
the int64 labels a loss takes; ``info`` holds what identifies the data (e.g. the text corpus's
SHA-256), which the runner writes into its summaries.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from .cifar import read_batch
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
    info: dict[str, Any] = field(default_factory=dict)

    #: ``"classification"`` or ``"sequence"`` (see the module's docstring).
    kind: ClassVar[str] = "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def prepare_targets(self, y: torch.Tensor) -> torch.Tensor:
        """A batch of targets as the int64 labels a loss takes (they are stored so)."""
        return y

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
    """A ``Dataset`` after the checks every loader shares: integer labels in range, as many as
    examples, at least one example, training and test examples of one shape. (The file
    readers check the same, naming the file; these messages name the data set.)"""
    ys = []
    for split, x, y in (("training", train_x, train_y), ("test", test_x, test_y)):
        y = y if torch.is_tensor(y) else torch.as_tensor(np.asarray(y))
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool \
                or y.dim() != 1:
            raise DataFileError(f"{name}: {split} labels are {y.dtype} {tuple(y.shape)}; "
                                "expected a vector of integers")
        if len(x) == 0 or len(y) != len(x):
            raise DataFileError(f"{name}: {len(x)} {split} examples and {len(y)} labels; "
                                "expected as many labels as examples, and at least one")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise DataFileError(f"{name}: {split} labels outside 0..{num_classes - 1}")
        ys.append(y.to(torch.int64))
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataFileError(f"{name}: test examples of shape {tuple(test_x.shape[1:])}, training "
                            f"examples of {tuple(train_x.shape[1:])}; they must agree")
    mean, std = _stats(train_x)
    return Dataset(name, train_x, ys[0], test_x, ys[1], num_classes, mean, std, augment)


def _size_text(x: np.ndarray) -> str:
    return "x".join(map(str, x.shape[1:]))


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


def _missing_idx_files(folder: Path) -> list[str]:
    stems = [s for pair in _IDX_FILES.values() for s in pair]
    return [s for s in stems if not (folder / s).is_file() and not (folder / f"{s}.gz").is_file()]


def _given_idx_folder(name: str, data_dir: Path) -> Path:
    """``data_dir`` or its subfolder ``name``, whichever holds all the IDX files; nothing else
    is looked at: a folder given explicitly never falls back to another copy."""
    inner = data_dir / name
    for folder in (data_dir, inner):
        if not _missing_idx_files(folder):
            return folder
    advice = (f"put the official IDX files there or in {inner}, or leave "
              "--data-dir out to use " + ("Debian's copy, " if name == "fashion-mnist" else "")
              + "the cache or a download")
    if not data_dir.is_dir():
        stems = ", ".join(_missing_idx_files(data_dir))
        raise DataFileError(f"{name}: the data folder {data_dir} does not exist (it should hold "
                            f"{stems}, or the same with .gz); {advice}")
    folder = min((data_dir, inner), key=lambda f: len(_missing_idx_files(f)))
    raise DataFileError(f"{name}: {folder} lacks {', '.join(_missing_idx_files(folder))} "
                        f"(or the same with .gz); {advice}")


def _idx_folder(name: str, data_dir: Path | None, allow_download: bool) -> Path:
    if data_dir is not None:
        return _given_idx_folder(name, data_dir)
    candidates = ([DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else []) + [CACHE / name]
    for folder in candidates:
        if not _missing_idx_files(folder):
            return folder
    if not allow_download:
        stems = ", ".join(s for pair in _IDX_FILES.values() for s in pair)
        raise DataFileError(
            f"{name} files ({stems}, optionally .gz) not found in "
            f"{', '.join(map(str, candidates))}; pass the folder holding them as --data-dir"
            + ("; on Debian: apt-get install dataset-fashion-mnist" if name == "fashion-mnist"
               else ""))
    base, files = DOWNLOADS[name]
    for file, md5 in files.items():
        target = CACHE / name / file
        if not target.is_file():
            download(base + file, target, md5)
    return CACHE / name


def _find_idx(folder: Path, stem: str, hint: str = "") -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataFileError(f"{folder / stem}[.gz] not found{hint}")


def read_idx_split(folder: Path, split: str, hint: str = "",
                   num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, rows, columns) and labels (N,) of ``split`` ("train" or "test") from the IDX
    files in ``folder``: unsigned bytes, as many labels as images (at least one), each in
    0..num_classes-1; anything else raises ``DataFileError`` naming the file."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    image_file, label_file = (_find_idx(folder, s, hint) for s in _IDX_FILES[split])
    images = read_idx(image_file, uint8=True)
    if images.ndim != 3:
        raise DataFileError(f"{image_file} holds an array of {images.shape}; expected images "
                            "(N, rows, columns)")
    if len(images) == 0:
        raise DataFileError(f"{image_file} holds no images")
    labels = read_idx(label_file, ndim=1, uint8=True)
    if len(labels) != len(images):
        raise DataFileError(f"{label_file} holds {len(labels)} labels, but {image_file.name} "
                            f"holds {len(images)} images; the files do not belong together")
    if int(labels.max()) >= num_classes:
        raise DataFileError(f"{label_file} holds the label {int(labels.max())}, outside "
                            f"0..{num_classes - 1}; the file is corrupt or of another data set")
    return images, labels


def _load_idx(name: str, data_dir: Path | None, download: bool) -> Dataset:
    folder = _idx_folder(name, data_dir, download)
    (xtr, ytr), (xte, yte) = (read_idx_split(folder, s) for s in ("train", "test"))
    if xtr.shape[1:] != xte.shape[1:]:
        test, train = (_find_idx(folder, _IDX_FILES[s][0]) for s in ("test", "train"))
        raise DataFileError(f"{test} holds {_size_text(xte)} images, but {train.name} holds "
                            f"{_size_text(xtr)}; the files do not belong together")
    return _make(name, torch.from_numpy(xtr).unsqueeze(1), ytr,
                 torch.from_numpy(xte).unsqueeze(1), yte, 10)


# --- CIFAR python batches -------------------------------------------------------------------
def _load_cifar(name: str, data_dir: Path | None) -> Dataset:
    # folder, training files, test file, label key, classes, images per training file
    folder_name, train_files, test_file, key, classes, train_rows = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                    "test_batch", b"labels", 10, 10_000),
        "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100, 50_000),
    }[name]
    if data_dir is None:
        raise DataFileError(f"{name} needs --data-dir: the folder {folder_name}/ of the official "
                            "python version (or its parent)")
    folder = data_dir if (data_dir / test_file).exists() else data_dir / folder_name
    if not (folder / test_file).exists():
        raise DataFileError(f"{name} batches not found in {data_dir} (looked for {test_file} "
                            f"there and in {data_dir / folder_name})")
    parts = [read_batch(folder / f, key, classes, train_rows) for f in train_files]
    xte, yte = read_batch(folder / test_file, key, classes, 10_000)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return _make(name, torch.from_numpy(xtr), ytr, torch.from_numpy(xte), yte, classes,
                 augment=True)


def _load_cifar10_sample(data_dir: Path | None) -> Dataset:
    """The sample from ``data_dir`` (the file, or a folder holding ``cifar10_sample.npz``), or,
    when no ``data_dir`` is given, from the file named by ``$SPARSETRAIN_CIFAR10_SAMPLE``;
    nothing else is searched."""
    if data_dir is not None:
        candidates = [data_dir, data_dir / "cifar10_sample.npz"]
    elif os.environ.get(CIFAR10_SAMPLE_ENV):
        candidates = [Path(os.environ[CIFAR10_SAMPLE_ENV])]
    else:
        raise DataFileError(f"cifar10-sample needs the file cifar10_sample.npz: pass its folder "
                            f"as --data-dir, or set ${CIFAR10_SAMPLE_ENV} to its path")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise DataFileError(f"cifar10_sample.npz not found in {', '.join(map(str, candidates))}; "
                            f"pass its folder as --data-dir, or leave --data-dir out and set "
                            f"${CIFAR10_SAMPLE_ENV} to its path")
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


# Data sets read from files: loader(data_dir, download); they take no options.
_FILE_LOADERS: dict[str, Callable[[Path | None, bool], Dataset]] = {
    "fashion-mnist": lambda d, download: _load_idx("fashion-mnist", d, download),
    "mnist": lambda d, download: _load_idx("mnist", d, download),
    "cifar10": lambda d, download: _load_cifar("cifar10", d),
    "cifar100": lambda d, download: _load_cifar("cifar100", d),
    "cifar10-sample": lambda d, download: _load_cifar10_sample(d),
}
# Data sets made in memory: loader(**options).
_MADE: dict[str, Callable[..., Dataset]] = {"digits": _load_digits, "synthetic": make_synthetic}


def _load_text(data_dir, **options) -> Dataset:
    from .text import load_text

    accepted = [n for n, p in inspect.signature(load_text).parameters.items()
                if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"bad options for data set 'text': {', '.join(unknown)}; it takes "
                         f"{', '.join(accepted)}")
    return load_text(data_dir, **options)


# Data sets read from files that take options: loader(data_dir as given, **options).
_FILE_LOADERS_WITH_OPTIONS: dict[str, Callable[..., Dataset]] = {"text": _load_text}


def available_datasets() -> list[str]:
    return sorted([*_FILE_LOADERS, *_MADE, *_FILE_LOADERS_WITH_OPTIONS])


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True,
                 **options) -> Dataset:
    """The data set ``name`` (see the table above); ``options`` go to its loader."""
    if name in _MADE:
        try:
            return _MADE[name](**options)
        except TypeError as exc:
            raise ValueError(f"bad options for data set {name!r}: {exc}") from None
    if name in _FILE_LOADERS_WITH_OPTIONS:
        return _FILE_LOADERS_WITH_OPTIONS[name](data_dir, **options)
    if name not in _FILE_LOADERS:
        raise ValueError(f"unknown data set {name!r}; the data sets are: "
                         f"{', '.join(available_datasets())}")
    if options:
        raise ValueError(f"bad options for data set {name!r}: it takes none, got "
                         f"{', '.join(sorted(options))}")
    return _FILE_LOADERS[name](None if data_dir is None else Path(data_dir), download)
