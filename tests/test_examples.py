"""The example scripts run end to end (on a small fake data set, so the test stays fast)."""

import runpy
import sys
from pathlib import Path

from tests.data.test_fashion_mnist import fake_fashion_mnist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fashion_mnist_comparison(tmp_path, monkeypatch, capsys):
    root = fake_fashion_mnist(tmp_path, n_train=512, n_test=64)
    report = tmp_path / "report.md"
    monkeypatch.setattr(sys, "argv", [
        "fashion_mnist_comparison.py", "--data", str(root), "--epochs", "2",
        "--batch-size", "32", "--delta-t", "4", "--report", str(report),
    ])
    runpy.run_path(str(EXAMPLES / "fashion_mnist_comparison.py"), run_name="__main__")
    out = capsys.readouterr().out
    for method in ("dense", "static", "set", "snfs", "rigl", "gmp"):
        assert f"| {method} |" in out
    text = report.read_text()
    assert "| rigl | " in text and "Per-layer density" in text


def test_wide_sparse_mlp(tmp_path, monkeypatch, capsys):
    root = fake_fashion_mnist(tmp_path, n_train=512, n_test=64)
    monkeypatch.setattr(sys, "argv", [
        "wide_sparse_mlp.py", "--data", str(root), "--hidden", "256", "--density", "0.1",
        "--epochs", "2", "--batch-size", "64", "--delta-t", "3",
    ])
    runpy.run_path(str(EXAMPLES / "wide_sparse_mlp.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "MLP 784-256-256-10" in out and "epoch 2: test accuracy" in out


def test_ship_sparse_model(tmp_path, monkeypatch, capsys):
    root = fake_fashion_mnist(tmp_path, n_train=512, n_test=64)
    out = tmp_path / "lenet.sparse.safetensors"
    monkeypatch.setattr(sys, "argv", [
        "ship_sparse_model.py", "--data", str(root), "--epochs", "1", "--batch-size", "64",
        "--out", str(out)])
    runpy.run_path(str(EXAMPLES / "ship_sparse_model.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert f"exported to {out}" in text and out.is_file()
    assert "predictions identical to the trained model's: True" in text
    assert "ms sparse" in text and "ms dense" in text
