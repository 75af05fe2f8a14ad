"""Nothing lost: the folder lock, fresh starts, full disks, damaged or altered checkpoints, the
NaN-loss advice and resuming with changed learning-rate settings (in this process; the same
with real processes and signals is in test_processes.py)."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from sparsetrain.runner import ConfigError, Trainer, TrainingError, make_config
from sparsetrain.runner import folder
from sparsetrain.runner.lock import FolderInUse

SYNTHETIC = {"n_train": 96, "n_test": 16, "input_shape": [1, 6, 6], "num_classes": 3}
BASE = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="rigl",
            density=0.3, epochs=2, batch_size=32, delta_t=2, log_every=1, checkpoint_every=2,
            progress=False, device="cpu")


def config(**overrides):
    return make_config({**BASE, **overrides})


def quiet(_message):
    pass


def steps_logged(run, kind="train"):
    return [r["step"] for r in folder.read_metrics(run) if r["kind"] == kind]


# --- 1. one process per folder ------------------------------------------------------------
def test_a_second_trainer_on_a_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    refused = []

    def second(trainer):
        if trainer.state.step == 2:
            with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()}") as exc:
                Trainer(config(), run, resume=True, log=quiet)
            refused.append(exc.value)

    Trainer(config(), run, log=quiet).train(on_step=second)
    assert refused and isinstance(refused[0], ConfigError)  # the CLI's one line, status 2
    Trainer(config(), run, resume=True, log=quiet).train()  # released at the end


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from sparsetrain.runner.lock import FolderLock; "
         f"lock = FolderLock({str(run)!r}).acquire(); print('locked', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderInUse, match=f"process {holder.pid}"):
        Trainer(config(), run, log=quiet)
    holder.kill()
    holder.wait()
    assert Trainer(config(), run, log=quiet).train()["steps"] == 6


# --- 3. fresh starts and metrics ------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_starts_with_fresh_files(tmp_path):
    run = tmp_path / "run"

    def killed(trainer):
        if trainer.state.step == 2:
            raise SystemExit  # gone without a checkpoint, as after kill -9

    with pytest.raises(SystemExit):
        Trainer(config(checkpoint_every=0), run, log=quiet).train(on_step=killed)
    assert steps_logged(run) == [1, 2] and not folder.has_checkpoint(run)  # as after kill -9
    Trainer(config(), run, log=quiet).train()
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    (run / folder.CHECKPOINT).unlink()  # the same folder resumed before any checkpoint
    folder.append_metrics(run, {"kind": "train", "step": 1})
    Trainer(config(), run, resume=True, log=quiet).train()
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_metrics_and_settings_are_replaced_by_rename_not_rewritten(tmp_path):
    run = tmp_path / "run"
    Trainer(config(), run, log=quiet).train(on_step=lambda t: t.state.step == 3
                                            and t.request_stop())
    inodes = {n: os.stat(run / n).st_ino for n in (folder.METRICS, folder.CONFIG)}
    Trainer(config(), run, resume=True, log=quiet).train()
    assert all(os.stat(run / n).st_ino != i for n, i in inodes.items())


# --- 4. a full disk ------------------------------------------------------------------------
def full_disk(*_args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    run = tmp_path / "run"

    def fill_the_disk(trainer):
        if trainer.state.step == 3:
            monkeypatch.setattr(folder.os, "fsync", full_disk)

    with pytest.raises(folder.RunFolderError, match="disk is full.*MB needed.*previous "
                       "checkpoint.pt is intact.*--resume") as exc:
        Trainer(config(), run, log=quiet).train(on_step=fill_the_disk)
    assert str(run / folder.CHECKPOINT) in str(exc.value)
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir() if p.name.endswith("tmp")) == []
    resumed = Trainer(config(), run, resume=True, log=quiet)
    assert resumed.state.step == 2  # the checkpoint before the disk filled up
    assert resumed.train()["steps"] == 6


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    run = tmp_path / "run"
    Trainer(config(), run, log=quiet).train(on_step=lambda t: t.state.step == 2
                                            and t.request_stop())
    stale = [run / ".checkpoint.pt.tmp-4242", run / ".checkpoint.pt.x81kq2.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    Trainer(config(), run, resume=True, log=quiet)
    assert not any(p.exists() for p in stale)


def test_a_link_planted_at_a_temporary_name_is_never_followed(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("precious")
    run.mkdir()
    for name in (folder.SUMMARY, folder.CHECKPOINT, folder.CONFIG, folder.METRICS):
        (run / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    Trainer(config(), run, log=quiet).train()
    assert victim.read_text() == "precious"
    folder.write_summary(run, {"again": True})
    assert victim.read_text() == "precious"


# --- 8. damaged and altered checkpoints -------------------------------------------------------
def stopped_run(tmp_path, step=2):
    run = tmp_path / "run"
    Trainer(config(), run, log=quiet).train(on_step=lambda t: t.state.step == step
                                            and t.request_stop())
    return run


def test_flipped_bytes_are_refused_not_trained_on(tmp_path):
    run = stopped_run(tmp_path)
    path = run / folder.CHECKPOINT
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="is damaged"):
        Trainer(config(), run, resume=True, log=quiet)


def altered(run, change):
    """The run's checkpoint changed by ``change(checkpoint)`` and saved with a fresh digest (as
    a crafted file would be)."""
    checkpoint = torch.load(run / folder.CHECKPOINT, weights_only=True)
    change(checkpoint)
    checkpoint.pop(folder.DIGEST)
    folder.save_checkpoint(run, checkpoint)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["run"].update(step=-7), "step = -7, not a finite, non-negative int"),
    (lambda c: c["run"].update(step=10**9), "step 1000000000 is beyond the end of this run"),
    (lambda c: c["run"].update(step=3, finished=True), "marked finished at step 3 of 6"),
    (lambda c: c["run"].update(wall_time_s=float("nan")), "wall_time_s = nan"),
    (lambda c: c["run"].pop("seen"), r"lacks \['seen'\]"),
    (lambda c: c.pop("optimizer"), r"lacks the entries \['optimizer'\]"),
    (lambda c: c.update(sparsifier=None), "of a run without a sparsifier"),
])
def test_altered_checkpoints_are_refused_in_one_line(tmp_path, change, message):
    run = stopped_run(tmp_path)
    altered(run, change)
    with pytest.raises(ConfigError, match=message) as exc:
        Trainer(config(), run, resume=True, log=quiet)
    assert "\n" not in str(exc.value) and str(run) in str(exc.value)


def test_masks_denser_than_configured_are_refused(tmp_path):
    run = stopped_run(tmp_path)
    altered(run, lambda c: c["sparsifier"]["positions"].update(
        {n: torch.arange(p.numel()) for n, p in c["model"].items() if n.endswith("weight")}))
    with pytest.raises(ConfigError, match="does not fit this run"):
        Trainer(config(), run, resume=True, log=quiet)


# --- 12. the NaN-loss advice and changed learning-rate settings --------------------------------
def test_the_nan_loss_message_is_truthful_about_checkpoints(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint was written yet") as exc:
        Trainer(config(lr=1e30, method="dense"), tmp_path / "a", log=quiet).train()
    assert "last checkpoint" not in str(exc.value)
    run = tmp_path / "b"

    def diverge(trainer):
        if trainer.state.step == 4:
            for group in trainer.optimizer.param_groups:
                group["params"][0].data.fill_(float("inf"))

    with pytest.raises(TrainingError, match=r"last checkpoint, of step 4, is in .*--resume "
                       r".* --override lr=0.01 "):
        Trainer(config(), run, log=quiet).train(on_step=diverge)


def test_a_resumed_run_can_lower_its_learning_rate_and_records_it(tmp_path):
    run = stopped_run(tmp_path, step=3)
    with pytest.raises(ConfigError, match="different configuration.*lr"):
        Trainer(config(lr=0.01), run, resume=True, log=quiet)
    with pytest.raises(ConfigError, match="only its learning-rate settings"):
        Trainer(config(density=0.5), run, resume=True, changed=["density"], log=quiet)
    Trainer(config(lr=0.01), run, resume=True, changed=["lr"], log=quiet).train(
        on_step=lambda t: t.state.step == 4 and t.request_stop())
    assert yaml.safe_load((run / folder.CONFIG).read_text())["lr"] == 0.01
    records = [r for r in folder.read_metrics(run) if r["kind"] == "override"]
    assert records == [{"kind": "override", "step": 3,
                        "changes": {"lr": {"from": 0.1, "to": 0.01}}}]
    lrs = [r["lr"] for r in folder.read_metrics(run) if r["kind"] == "train"]
    assert lrs[3] < 0.01 < lrs[2]  # step 4 trained with the new rate
    # from now on the run is one with the new rate: a plain resume continues it
    assert Trainer(config(lr=0.01), run, resume=True, log=quiet).train()["steps"] == 6
    assert json.loads((run / folder.SUMMARY).read_text())["config"]["lr"] == 0.01


def test_override_on_the_command_line(tmp_path, capsys):
    from sparsetrain.cli import main

    run = stopped_run(tmp_path, step=3)
    assert main(["train", "--resume", str(run), "--override", "density=0.5"]) == 2
    assert "only its learning-rate settings" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "new"), "--override", "lr=0.01"]) == 2
    assert "use it with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--override", "lr=0.01",
                 "--override", "warmup-epochs=0.5"]) == 0
    saved = yaml.safe_load((run / folder.CONFIG).read_text())
    assert (saved["lr"], saved["warmup_epochs"]) == (0.01, 0.5)
    changes = [r["changes"] for r in folder.read_metrics(run) if r["kind"] == "override"]
    assert changes == [{"lr": {"from": 0.1, "to": 0.01},
                        "warmup_epochs": {"from": 0.0, "to": 0.5}}]


def test_masks_of_a_pruned_run_denser_than_configured_are_refused(tmp_path):
    run = tmp_path / "run"
    Trainer(config(method="snip"), run, log=quiet).train(on_step=lambda t: t.state.step == 2
                                                         and t.request_stop())
    altered(run, lambda c: c["sparsifier"]["positions"].update(
        {n: torch.arange(p.numel()) for n, p in c["model"].items() if n.endswith("weight")}))
    with pytest.raises(ConfigError, match="not the run's density 0.3"):
        Trainer(config(method="snip"), run, resume=True, log=quiet)
