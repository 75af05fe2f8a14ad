"""Nothing lost, with real processes: two processes on one folder, SIGTERM and SIGHUP (for
train, sweep and data-parallel training), kill -9 before the first checkpoint, and a file-size
limit reached while writing a checkpoint."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsetrain.runner import folder

DATA = ["--data", "synthetic", "--data-option", "n_test=64", "--data-option",
        "input_shape=[1,8,8]", "--data-option", "num_classes=4"]
RUN = ["--model", "lenet300", *DATA, "--method", "rigl", "--density", "0.3", "--batch-size",
       "32", "--delta-t", "5", "--log-every", "1", "--no-progress", "--device", "cpu"]
# long enough to be signalled mid-run (6000 steps), short (16 steps) when it is not
LONG = ["--data-option", "n_train=64000", "--epochs", "3"]
SHORT = ["--data-option", "n_train=256", "--epochs", "2"]


def sparsetrain(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sparsetrain", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_steps(run: Path, steps: int, process, timeout=60):
    """Wait until ``run`` has logged ``steps`` training steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([r for r in folder.read_metrics(run) if r["kind"] == "train"]) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach step {steps}")


def checkpoint_step(run: Path) -> int:
    return torch.load(run / folder.CHECKPOINT, weights_only=True)["run"]["step"]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in folder.read_metrics(run) if r["kind"] == "train"]


def assert_logged_once(run: Path, total: int):
    assert train_steps(run) == list(range(1, total + 1))


def test_two_processes_on_one_folder(tmp_path):
    run = tmp_path / "run"
    first = sparsetrain("train", *RUN, *LONG, "--lr", "0.1", "--out", str(run))
    wait_for_steps(run, 2, first)
    second = sparsetrain("train", *RUN, *LONG, "--lr", "0.02", "--out", str(run))
    status, _, err = finish(second)
    assert status == 2 and err.strip() == (f"sparsetrain: error: {run} is in use by process "
                                           f"{first.pid}; wait for it to finish (or stop it), "
                                           "or pass another folder")
    resumed = sparsetrain("train", "--resume", str(run))  # a second --resume: the same
    status, _, err = finish(resumed)
    assert status == 2 and "in use by process" in err
    first.send_signal(signal.SIGTERM)
    status, _, err = finish(first)
    assert status == 143
    assert "lr: 0.1\n" in (run / folder.CONFIG).read_text()
    steps = train_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one process wrote them


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_cleanly_with_a_checkpoint(tmp_path, signum, status):
    run = tmp_path / "run"
    process = sparsetrain("train", *RUN, *LONG, "--out", str(run), "--checkpoint-every", "0")
    wait_for_steps(run, 3, process)
    process.send_signal(signum)
    code, out, err = finish(process)
    assert code == status, err
    assert f"{signal.Signals(signum).name}: finishing this step" in out
    steps = train_steps(run)
    assert checkpoint_step(run) == steps[-1] > 0
    # a requeued job continues where it stopped
    resumed = sparsetrain("train", "--resume", str(run))
    wait_for_steps(run, steps[-1] + 2, resumed)
    resumed.send_signal(signal.SIGTERM)
    assert finish(resumed)[0] == 143
    assert_logged_once(run, len(train_steps(run)))


def test_sweep_stops_every_cell_cleanly_on_sigterm_and_continues(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["sweep", *RUN, *LONG, "--grid", "seed=0,1", "--jobs", "2", "--sweep-dir",
            str(sweep)]
    process = sparsetrain(*args)
    deadline = time.monotonic() + 60
    while len(folder.find_run_folders(sweep)) < 2 or not all(
            train_steps(r) for r in folder.find_run_folders(sweep)):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    status, out, err = finish(process)
    assert status == 143, err
    assert "sweep stopped by SIGTERM" in err
    runs = folder.find_run_folders(sweep)
    assert len(runs) == 2
    for run in runs:
        assert checkpoint_step(run) == train_steps(run)[-1] > 0
        assert not folder.is_finished(run)


def test_two_sweeps_on_one_folder_share_the_cells(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["sweep", *RUN, *SHORT, "--grid", "seed=0,1,2", "--sweep-dir", str(sweep)]
    first, second = sparsetrain(*args), sparsetrain(*args)
    results = [finish(first), finish(second)]
    assert [r[0] for r in results] == [0, 0], results
    runs = folder.find_run_folders(sweep)
    assert len(runs) == 3
    for run in runs:
        log = (run / folder.TRAIN_LOG).read_text()
        assert log.count("done: test accuracy") == 1, log  # trained once
        assert_logged_once(run, 16)


def test_a_run_killed_before_its_first_checkpoint_is_started_again(tmp_path):
    run = tmp_path / "run"
    process = sparsetrain("train", *RUN, *LONG, "--out", str(run), "--checkpoint-every", "0")
    wait_for_steps(run, 3, process)
    process.kill()
    process.wait()
    assert not folder.has_checkpoint(run) and train_steps(run)
    again = sparsetrain("train", "--resume", str(run), *SHORT)  # what a requeue runs
    status, _, err = finish(again)
    assert status == 0, err
    assert_logged_once(run, 16)


def limit_file_size(limit=300_000):
    # the run's initial weights (about 200 kB) fit, its checkpoint (about 500 kB) does not
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_file_size_limit_reached_while_checkpointing(tmp_path):
    run = tmp_path / "run"
    process = sparsetrain("train", *RUN, *SHORT, "--out", str(run), preexec_fn=limit_file_size)
    status, _, err = finish(process)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"sparsetrain: error: cannot write {run / folder.CHECKPOINT}: "
                               "the disk is full or a size limit was reached")
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


def test_a_file_size_limit_reached_at_the_start(tmp_path):
    run = tmp_path / "run"
    process = sparsetrain("train", *RUN, *SHORT, "--out", str(run),
                          preexec_fn=lambda: limit_file_size(100_000))
    status, _, err = finish(process)
    assert status == 2 and "Traceback" not in err
    assert err.startswith(f"sparsetrain: error: cannot write {run / folder.INITIAL}: ")
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    again = sparsetrain("train", "--resume", str(run), *SHORT)  # with space again
    status, _, err = finish(again)
    assert status == 0, err
    assert folder.load_initial(run) is not None and folder.is_finished(run)


def test_sigterm_under_data_parallel_training(tmp_path):
    run = tmp_path / "run"
    process = sparsetrain("train", *RUN, *LONG, "--out", str(run), "--nproc", "2",
                          "--checkpoint-every", "0")
    wait_for_steps(run, 3, process, timeout=120)
    process.send_signal(signal.SIGTERM)
    status, out, err = finish(process)
    assert status == 143, err
    steps = train_steps(run)
    assert checkpoint_step(run) == steps[-1] > 0
    assert_logged_once(run, steps[-1])
