"""The byte-level text data set: corpus from files, folders and the standard library, the split,
sequences and next bytes, and one clear error for bad input."""

import hashlib
import os
import platform

import pytest
import torch

from sparsetrain.data import DataFileError, TextDataset, available_datasets, load_dataset
from sparsetrain.data import text as text_module
from sparsetrain.data.text import DEFAULT_MAX_BYTES, load_text


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corpus_bytes(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(32, 127, (n,), generator=g).tolist())


def test_a_file_becomes_sequences_and_next_bytes(tmp_path):
    data = corpus_bytes(1000)
    path = write(tmp_path / "a.txt", data)
    d = load_text(path, context=16, validation_fraction=0.2)
    assert isinstance(d, TextDataset) and d.kind == "sequence" and d.num_classes == 256
    assert d.input_shape == (16,)
    # the last 200 bytes are held out; (800 - 1) // 16 = 49 training sequences
    assert d.train_x.shape == d.train_y.shape == (49, 16)
    assert d.test_x.shape == (12, 16)  # (200 - 1) // 16
    assert d.train_x.dtype == d.train_y.dtype == torch.uint8
    assert bytes(d.train_x[:2].flatten().tolist()) == data[:32]
    assert bytes(d.train_y[:2].flatten().tolist()) == data[1:33]
    assert bytes(d.test_x[0].tolist()) == data[800:816]
    assert bytes(d.test_y[0].tolist()) == data[801:817]
    # inputs and targets are views of one corpus tensor, not copies
    assert d.train_x.untyped_storage().data_ptr() == d.test_y.untyped_storage().data_ptr()
    assert d.prepare(d.train_x[:3], train=True).dtype == torch.int64
    assert d.prepare_targets(d.train_y[:3]).dtype == torch.int64
    info = d.info
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == 1000
    assert info["train_bytes"] == 800 and info["validation_bytes"] == 200
    assert info["python"] == platform.python_version() and info["files"] == 1


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b" / "z.txt", b"B-Z." * 5)
    write(tmp_path / "a.txt", b"A." * 5)
    write(tmp_path / "b" / "a.txt", b"B-A." * 5)
    write(tmp_path / "c.md", b"skipped: pattern")
    write(tmp_path / ".hidden.txt", b"skipped: hidden")
    write(tmp_path / ".git" / "x.txt", b"skipped: hidden folder")
    d = load_text(tmp_path, context=2, validation_fraction=0.25)
    corpus = b"A." * 5 + b"B-A." * 5 + b"B-Z." * 5
    assert d.info["sha256"] == hashlib.sha256(corpus).hexdigest() and d.info["files"] == 3
    md = load_text(tmp_path, context=2, pattern="*.md", validation_fraction=0.5)
    assert md.info["sha256"] == hashlib.sha256(b"skipped: pattern").hexdigest()


def test_several_paths_in_the_order_given(tmp_path):
    one, two = write(tmp_path / "1.txt", b"first "), write(tmp_path / "2" / "t.txt", b"second")
    joined = load_text(f"{two.parent}{os.pathsep}{one}", context=2, validation_fraction=0.5)
    as_list = load_text([two.parent, one], context=2, validation_fraction=0.5)
    assert joined.info["sha256"] == as_list.info["sha256"] == \
        hashlib.sha256(b"secondfirst ").hexdigest()


def test_max_bytes_cuts_the_corpus(tmp_path):
    data = corpus_bytes(3000)
    write(tmp_path / "a.txt", data[:1000])
    write(tmp_path / "b.txt", data[1000:])
    d = load_text(tmp_path, context=8, max_bytes=1500)
    assert d.info["bytes"] == 1500 and d.info["sha256"] == hashlib.sha256(data[:1500]).hexdigest()


def test_the_default_corpus_is_the_standard_library_without_tests(tmp_path, monkeypatch):
    write(tmp_path / "abc.py", b"x = 1\n" * 20)
    write(tmp_path / "pkg" / "mod.py", b"y = 2\n" * 20)
    for skipped in ("test", "tests", "site-packages", "idlelib/idle_test", "__pycache__"):
        write(tmp_path / skipped / "t.py", b"skipped\n")
    write(tmp_path / "notes.txt", b"not python\n")
    monkeypatch.setattr(text_module.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    d = load_text(context=8)
    assert d.info["sha256"] == hashlib.sha256(b"x = 1\n" * 20 + b"y = 2\n" * 20).hexdigest()
    assert d.info["corpus"].startswith("default") and str(tmp_path) in d.info["source"]
    assert load_text(context=2, max_bytes=60).info["bytes"] == 60


def test_the_real_default_corpus():
    d = load_dataset("text")
    assert d.info["bytes"] == DEFAULT_MAX_BYTES  # the standard library holds more than 1 MiB
    assert d.train_x.shape == (7372, 128) and d.test_x.shape == (819, 128)
    assert load_dataset("text").info["sha256"] == d.info["sha256"]  # deterministic
    assert "text" in available_datasets()


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.txt", r"missing\.txt does not exist.*--data-dir"),
    (lambda p: write(p / "empty.txt", b""), r"empty\.txt is empty"),
    (lambda p: write(p / "d" / "a.md", b"text").parent, r"holds no files matching '\*\.txt'"),
    (lambda p: write(p / "short.txt", b"0123456789" * 3), r"short\.txt holds 30 bytes, too few"
                                                          r".*smaller context"),
])
def test_bad_corpora_are_one_clear_error(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataFileError, match=match) as error:
        load_dataset("text", path, context=16)
    assert "\n" not in str(error.value)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.txt", corpus_bytes(500))

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(text_module, "open", refuse, raising=False)
    with pytest.raises(DataFileError, match=r"cannot read .*locked\.txt: Permission denied"):
        load_text(path, context=8)


def test_a_special_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataFileError, match=r"pipe\.txt is not a regular file"):
        load_text(fifo, context=8)


@pytest.mark.parametrize("options, match", [
    ({"context": 0}, "context must be"),
    ({"validation_fraction": 1.0}, "validation_fraction must be"),
    ({"max_bytes": -5}, "max_bytes must be"),
    ({"pattern": ""}, "pattern must be"),
    ({"n_train": 5}, "bad options for data set 'text': n_train; it takes context"),
])
def test_bad_options(tmp_path, options, match):
    path = write(tmp_path / "a.txt", corpus_bytes(500))
    with pytest.raises(ValueError, match=match):
        load_dataset("text", path, **options)


def test_no_augmentation_for_bytes(tmp_path):
    d = load_text(write(tmp_path / "a.txt", corpus_bytes(500)), context=8)
    with pytest.raises(ValueError, match="no augmentation"):
        d.prepare(d.train_x[:2], train=True, augment=True)
