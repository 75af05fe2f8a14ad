"""The ``sparsetrain`` command line on the synthetic data set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrain.cli import main

BASE = ["train", "--model", "lenet300", "--data", "synthetic", "--data-option", "n_train=128",
        "--data-option", "n_test=32", "--data-option", "input_shape=[1, 6, 6]",
        "--epochs", "2", "--batch-size", "32", "--delta-t", "2", "--no-progress",
        "--device", "cpu"]


def run(tmp_path, *args):
    return main([*BASE, "--runs-dir", str(tmp_path / "runs"), *args])


def test_train_and_summary(tmp_path, capsys):
    assert run(tmp_path, "--method", "set", "--density", "0.3", "--out",
               str(tmp_path / "x")) == 0
    summary = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert summary["method"] == "set" and summary["epochs"] == 2
    assert abs(summary["density"] - 0.3) < 0.02
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "done: test accuracy" in out


def test_run_folder_derived_from_settings(tmp_path):
    assert run(tmp_path, "--method", "static", "--density", "0.5") == 0
    folders = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(folders) == 1
    assert folders[0].startswith("lenet300_synthetic_static") and "density0.5" in folders[0]


def test_yaml_config_and_resume(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: lenet300\ndata: synthetic\ndata_options: {n_train: 128, n_test: 32}"
                      "\nepochs: 2\nbatch-size: 32\nmethod: rigl\ndensity: 0.2\nprogress: false\n"
                      "device: cpu\n")
    out = tmp_path / "r"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["train", "--resume", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--density", "0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "lenet301"], "lenet301"),
    (["--data", "imagenet"], "imagenet"),
    (["--method", "rigel"], "unknown method 'rigel'"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--desnity", "0.1"], "did you mean 'density'"),
    (["--data", "mnist"], "bad options for data set 'mnist'"),
    (["--method-option", "alpha"], "KEY=VALUE"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    try:
        code = run(tmp_path, *args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_data_folder(tmp_path, capsys):
    code = main(["train", "--model", "lenet300", "--data", "mnist", "--data-dir",
                 str(tmp_path / "nonexistent"), "--no-progress", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "Traceback" not in err


def test_resume_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lenet300" in out and "synthetic" in out and "rigl" in out and "grasp" in out
    assert "srigl" in out and "block:4x4" in out


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("sparsetrain")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sparsetrain"]
    result = subprocess.run([*command, "list"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "models:" in result.stdout
    module = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--model", "x"],
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 2 and "Traceback" not in module.stderr


def test_sweep_and_report(tmp_path, capsys):
    args = ["sweep", "--model", "lenet300", "--data", "synthetic", "--data-option", "n_train=64",
            "--data-option", "n_test=16", "--epochs", "1", "--batch-size", "32", "--no-progress",
            "--grid", "method=dense,static,rigl", "--grid", "density=0.5,0.2",
            "--sweep-dir", str(tmp_path / "sweep")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| rigl | erk | 0.2 |" in out and "report written" in out
    assert (tmp_path / "sweep" / "report" / "report.html").exists()
    assert main(args) == 0
    assert "5 already finished, 0 to train" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()
    assert main(["sweep", "--model", "lenet300"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "lenet300", "--data", "synthetic", "--nproc", "0"],
     "--nproc must be a positive integer, got 0; --nproc is the number of training processes"),
    (["sweep", "--model", "lenet300", "--data", "synthetic", "--grid", "seed=0,1", "--jobs", "0"],
     "--jobs must be a positive integer, got 0; --jobs is the number of runs"),
])
def test_process_counts_are_checked(tmp_path, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
