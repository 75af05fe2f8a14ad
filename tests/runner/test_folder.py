"""The run folder: its file names (used by the trainer, report and sweep alike), metrics
truncation on resume, atomic writes and checkpoint loading."""

import json

import pytest
import torch

from sparsetrain.runner import ConfigError, Trainer, make_config, run_folder
from sparsetrain.backends import dense_state_dict as st_dense
from sparsetrain.runner import folder
from sparsetrain.runner.report import collect_runs
from sparsetrain.runner.sweep import expand_grid, run_sweep

SYNTHETIC = {"n_train": 64, "n_test": 16, "input_shape": [1, 6, 6], "num_classes": 3}
BASE = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="static",
            density=0.5, epochs=1, batch_size=32, log_every=1, progress=False, device="cpu")


def quiet(_message):
    pass


def test_a_trained_run_holds_exactly_the_named_files(tmp_path):
    Trainer(make_config(BASE), tmp_path / "run", log=quiet).train()
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {folder.CONFIG, folder.METRICS, folder.CHECKPOINT, folder.SUMMARY,
                     folder.INITIAL, folder.LOCK}
    assert folder.is_finished(tmp_path / "run") and folder.is_run_folder(tmp_path / "run")
    assert folder.read_summary(tmp_path / "run")["method"] == "static"


def test_report_and_sweep_find_runs_by_these_names(tmp_path):
    cells = expand_grid(BASE, {"density": [0.5, 0.2]})
    folders = run_sweep(cells, tmp_path / "sweep", log=quiet)
    assert all(folder.is_finished(f) for f in folders)
    assert all({p.name for p in f.iterdir()} == {folder.CONFIG, folder.METRICS,
                                                 folder.CHECKPOINT, folder.SUMMARY,
                                                 folder.INITIAL, folder.TRAIN_LOG, folder.LOCK}
               for f in folders)
    runs = collect_runs([tmp_path / "sweep"])
    assert sorted(r["folder"] for r in runs) == sorted(folders) == folder.find_run_folders(
        tmp_path / "sweep")
    assert all(r["summary"] == folder.read_summary(r["folder"]) and len(r["evals"]) == 1
               for r in runs)
    # a run without its summary is unfinished for the report and trained again by the sweep
    (folders[1] / folder.SUMMARY).unlink()
    runs = {r["folder"]: r for r in collect_runs([tmp_path / "sweep"])}
    assert runs[folders[1]]["summary"] is None and runs[folders[0]]["summary"] is not None
    messages = []
    run_sweep(cells, tmp_path / "sweep", log=messages.append)
    assert "1 already finished, 1 to train" in messages[0]
    assert folder.is_finished(folders[1])


def test_run_folder_is_out_or_derived_from_the_settings(tmp_path):
    assert run_folder(make_config(BASE, {"out": str(tmp_path / "x")})) == tmp_path / "x"
    config = make_config(BASE, {"runs_dir": str(tmp_path)})
    assert run_folder(config) == tmp_path / config.run_name()


def test_metrics_are_truncated_to_the_checkpoint_step(tmp_path):
    lines = [{"kind": "train", "step": s} for s in (1, 2, 3, 4)] + [{"kind": "eval", "step": 4}]
    for record in lines:
        folder.append_metrics(tmp_path, record)
    with open(tmp_path / folder.METRICS, "a") as f:
        f.write('{"kind": "train", "st')  # cut short by an interruption
    assert folder.read_metrics(tmp_path) == lines
    folder.truncate_metrics(tmp_path, 2)
    assert folder.read_metrics(tmp_path) == lines[:2]
    assert (tmp_path / folder.METRICS).read_text().endswith("}\n")
    folder.truncate_metrics(tmp_path / "missing", 2)  # nothing to truncate: no error
    assert folder.read_metrics(tmp_path / "missing") == []


def test_resume_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    config = make_config(BASE, {"epochs": 2, "checkpoint_every": 0})
    trainer = Trainer(config, tmp_path, log=quiet)
    trainer.train(on_step=lambda t: t.state.step == 3 and t.request_stop())
    folder.append_metrics(tmp_path, {"kind": "train", "step": 4})  # logged, not checkpointed
    Trainer(config, tmp_path, resume=True, log=quiet).train(on_step=lambda t: t.request_stop())
    # step 4's training line once (logged again after the resume), then the final evaluation
    assert [r["step"] for r in folder.read_metrics(tmp_path)] == [1, 2, 2, 3, 4, 4]


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    folder.atomic_save({"w": torch.ones(3)}, tmp_path / "a.pt")
    folder.atomic_write_json({"x": 1}, tmp_path / "a.json")
    folder.atomic_write_json({"x": 2}, tmp_path / "a.json")  # replaces the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pt"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.ones(3))


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary_one(tmp_path):
    folder.write_summary(tmp_path, {"ok": True})
    with pytest.raises(TypeError):
        folder.write_summary(tmp_path, {"bad": object()})  # not JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.SUMMARY]
    assert folder.read_summary(tmp_path) == {"ok": True}


def test_checkpoint_loading_errors(tmp_path):
    config = make_config(BASE)
    with pytest.raises(ConfigError, match=f"nothing to resume.*no {folder.CHECKPOINT}"):
        folder.load_checkpoint(tmp_path, config)
    folder.save_checkpoint(tmp_path, {"format": "something-else"})
    with pytest.raises(ConfigError, match="not a sparsetrain run checkpoint"):
        folder.load_checkpoint(tmp_path, config)
    saved = make_config(BASE, {"density": 0.3}).semantic_dict()
    folder.save_checkpoint(tmp_path, {"format": folder.FORMAT, "config": saved})
    with pytest.raises(ConfigError, match="different configuration.*density: saved 0.3, now 0.5"):
        folder.load_checkpoint(tmp_path, config)
    assert folder.load_checkpoint(tmp_path, make_config(BASE, {"density": 0.3}))["config"] == saved
    (tmp_path / folder.CHECKPOINT).write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="cannot be read"):
        folder.load_checkpoint(tmp_path, config)


class Custom:
    """Not a tensor or plain value: refused by ``weights_only=True``."""


def test_checkpoints_load_with_weights_only(tmp_path):
    folder.atomic_save({"format": folder.FORMAT, "x": Custom()}, tmp_path / folder.CHECKPOINT)
    with pytest.raises(ConfigError, match="never unpickles code") as refused:
        folder.load_checkpoint(tmp_path, make_config(BASE))
    assert "weights_only" not in str(refused.value)  # never suggest loading it without


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_the_initial_weights_are_saved_dense_once_and_kept_on_resume(tmp_path, backend):
    config = make_config(BASE, {"method": "rigl", "density": 0.3, "delta_t": 1,
                                "backend": backend, "epochs": 2})
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    start = {k: v.clone() for k, v in st_dense(trainer.model).items()}
    trainer.request_stop()  # stops after the first step, with a checkpoint
    assert trainer.train() is None
    saved = folder.load_initial(tmp_path / "run")
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in start)
    assert saved["fc1.weight"].shape == (300, 36)  # dense on every backend
    Trainer(config, tmp_path / "run", resume=True, log=quiet).train()
    again = folder.load_initial(tmp_path / "run")
    assert all(torch.equal(again[k], start[k]) for k in start)  # not rewritten on resume


def test_initial_weights_are_the_same_on_every_backend(tmp_path):
    states = []
    for backend in ("masked", "csr"):
        config = make_config(BASE, {"method": "rigl", "density": 0.3, "backend": backend})
        Trainer(config, tmp_path / backend, log=quiet).train()
        states.append(folder.load_initial(tmp_path / backend))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_damaged_initial_weights_are_refused_with_a_clear_error(tmp_path):
    assert folder.load_initial(tmp_path) is None  # runs trained before it existed
    (tmp_path / folder.INITIAL).write_bytes(b"not a checkpoint")
    with pytest.raises(folder.RunFolderError, match="delete it"):
        folder.load_initial(tmp_path)
    torch.save({"format": "other", "model": {}}, tmp_path / folder.INITIAL)
    with pytest.raises(folder.RunFolderError, match="not the initial weights"):
        folder.load_initial(tmp_path)
