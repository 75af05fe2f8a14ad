"""Language modelling through the runner: gpt-mini on a small text corpus, on both backends;
summaries in nats per byte, exact resume, reports, sweeps and TensorBoard event files."""

import hashlib
import json
import math
import sys

import pytest
import torch

import sparsetrain as st
from sparsetrain.cli import main
from sparsetrain.runner import ConfigError, Trainer, make_config
from sparsetrain.runner.report import format_table, summarise, collect_runs, write_report
from sparsetrain.runner.sweep import PRESETS, expand_grid, run_sweep

pytestmark = pytest.mark.filterwarnings(  # a tiny head at density 0.3 has empty rows
    "ignore:backend=.csr.*no active weight:RuntimeWarning")

WORDS = ["def", "return", "self", "import", "for", "in", "if", "else:", "x", "y", "=", "+"]


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds its start-up and waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    """About 4 kB of Python-like lines from a few words, seeded."""
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g))
             for _ in range(160)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(corpus, **overrides):
    base = dict(model="gpt-mini", data="text", data_dir=str(corpus),
                data_options={"context": 16}, width=0.0625, method="rigl", density=0.3,
                epochs=2, batch_size=8, train_size=64, optimizer="adamw", lr=0.03,
                weight_decay=0.0, delta_t=3, log_every=2, checkpoint_every=0, progress=False,
                device="cpu")
    base.update(overrides)
    return base


def quiet(_message):
    pass


def records(folder, kind):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").open()) if r["kind"] == kind]


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_training_reports_nats_per_byte(corpus, tmp_path, backend):
    trainer = Trainer(make_config(settings(corpus, backend=backend)), tmp_path / "run", log=quiet)
    csr_layers = [m for m in trainer.model.modules() if isinstance(m, st.backends.CSRLinear)]
    assert len(csr_layers) == (17 if backend == "csr" else 0)  # 4 x 4 projections and the head
    summary = trainer.train()
    assert summary["data_kind"] == "sequence" and summary["steps"] == 16
    loss = summary["test_loss"]
    assert summary["test_nats_per_byte"] == loss and loss < math.log(256) - 1  # learnt something
    assert summary["test_bits_per_byte"] == pytest.approx(loss / math.log(2))
    assert 0 < summary["test_accuracy"] <= 1
    assert summary["data_info"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert summary["density"] == pytest.approx(0.3, abs=0.03)
    # sparse weights make the weight products cheaper, never attention: between the two
    assert 0.3 < summary["inference_flops_vs_dense"] < 1
    evals = records(tmp_path / "run", "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and evals[-1]["test_loss"] == loss
    for r in records(tmp_path / "run", "train"):
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0


def final_state(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.sparsifier.masks.items()})


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_resume_is_exact(corpus, tmp_path, backend):
    config = make_config(settings(corpus, backend=backend))
    straight = Trainer(config, tmp_path / "straight", log=quiet)
    straight.train()
    stopped = Trainer(config, tmp_path / "stopped", log=quiet)
    assert stopped.train(on_step=lambda t: t.state.step == 5 and t.request_stop()) is None
    resumed = Trainer(config, tmp_path / "stopped", resume=True, log=quiet)
    assert resumed.state.step == 5
    summary = resumed.train()
    a, b = final_state(straight), final_state(resumed)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert summary["test_loss"] == json.loads((tmp_path / "straight" / "summary.json")
                                              .read_text())["test_loss"]


@pytest.mark.parametrize("method", ["snip", "grasp"])  # GraSP: a second derivative of attention
def test_pruning_at_initialisation_scores_every_position(corpus, tmp_path, method):
    summary = Trainer(make_config(settings(corpus, method=method, epochs=1)), tmp_path / "run",
                      log=quiet).train()
    assert summary["density"] == pytest.approx(0.3, abs=0.01)


def test_resuming_on_another_corpus_is_refused(corpus, tmp_path):
    config = make_config(settings(corpus))
    Trainer(config, tmp_path / "run", log=quiet).train(
        on_step=lambda t: t.state.step == 3 and t.request_stop())
    corpus.write_text(corpus.read_text().upper())
    with pytest.raises(ConfigError, match="SHA-256 .* but the data loaded now has"):
        Trainer(config, tmp_path / "run", resume=True, log=quiet)


@pytest.mark.parametrize("overrides, match", [
    (dict(data="synthetic", data_dir=None, data_options={}),
     "'gpt-mini' reads tokens.*--data text"),
    (dict(model="lenet300"), "'lenet300' reads features, but data set 'text' holds sequence"),
    (dict(augment=True), "'text' has no augmentation"),
])
def test_model_and_data_must_fit(corpus, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(make_config(settings(corpus, **overrides)), tmp_path / "run", log=quiet)


def cli_args(corpus, out, *extra):
    s = settings(corpus)
    return ["train", "--model", "gpt-mini", "--data", "text", "--data-dir", str(corpus),
            "--data-option", "context=16", "--width", str(s["width"]), "--epochs", "2",
            "--batch-size", "8", "--train-size", "64", "--optimizer", "adamw", "--lr", "0.03",
            "--weight-decay", "0", "--delta-t", "3", "--log-every", "2",
            "--checkpoint-every", "4", "--no-progress", "--device", "cpu", "--out", str(out),
            *extra]


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_cli_tensorboard_and_report(corpus, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    runs = tmp_path / "runs"
    assert main(cli_args(corpus, runs / "rigl", "--method", "rigl", "--density", "0.3",
                         "--tensorboard")) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "nats/byte" in out and "next-byte accuracy" in out
    board = scalars(runs / "rigl")
    assert {"train/loss", "train/accuracy", "train/lr", "eval/loss", "eval/accuracy",
            "eval/bits_per_byte", "density/overall", "density/ever_active",
            "density/blocks.0.qkv.weight", "density/head.weight"} <= set(board)
    trains, evals = records(runs / "rigl", "train"), records(runs / "rigl", "eval")
    assert [s for s, _ in board["train/loss"]] == [r["step"] for r in trains]
    assert [v for _, v in board["train/loss"]] == pytest.approx([r["loss"] for r in trains])
    assert [v for _, v in board["eval/loss"]] == pytest.approx([r["test_loss"] for r in evals])
    assert [v for _, v in board["density/ever_active"]] == \
        pytest.approx([r["ever_active"] for r in evals])
    assert board["eval/bits_per_byte"][-1][1] == pytest.approx(evals[-1]["test_loss"] / math.log(2))

    assert main(cli_args(corpus, runs / "dense", "--method", "dense")) == 0
    assert not (runs / "dense" / "tensorboard").exists()
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "validation loss, nats/byte (mean ± std, n)" in table and "| gpt-mini | rigl |" in table
    report = (tmp_path / "report" / "report.md").read_text()
    assert "nats per byte" in report and hashlib.sha256(corpus.read_bytes()).hexdigest() in report
    for name in ("loss_vs_density.png", "loss_vs_train_flops.png", "loss_curves.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"({name})" in report
    assert not (tmp_path / "report" / "accuracy_vs_density.png").exists()


def test_tensorboard_after_a_crash_and_resume(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    config = make_config(settings(corpus, tensorboard=True, checkpoint_every=4))

    def crash(trainer):
        if trainer.state.step == 7:  # after the checkpoint of step 4 and the log of step 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "run", log=quiet).train(on_step=crash)
    Trainer(config, tmp_path / "run", resume=True, log=quiet).train()
    board, trains = scalars(tmp_path / "run"), records(tmp_path / "run", "train")
    # the events of steps 4 and 6 logged before the crash were purged: each step once
    assert [s for s, _ in board["train/loss"]] == [r["step"] for r in trains] == \
        list(range(2, 17, 2))
    assert [v for _, v in board["train/loss"]] == pytest.approx([r["loss"] for r in trains])


def test_missing_tensorboard_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert main(cli_args(corpus, tmp_path / "run", "--tensorboard")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'sparsetrain[tensorboard]'" in err


def test_sweep_of_text_runs(corpus, tmp_path):
    base = {k: v for k, v in settings(corpus, epochs=1).items() if k != "method"}
    cells = expand_grid(base, {"method": ["dense", "static"], "density": [0.3, 0.2]})
    assert len(cells) == 3  # dense once
    folders = run_sweep(cells, tmp_path / "sweep", log=quiet)
    rows = summarise(collect_runs(folders))
    assert [(r["kind"], r["method"], r["density"]) for r in rows] == [
        ("sequence", "dense", 1.0), ("sequence", "static", 0.3), ("sequence", "static", 0.2)]
    assert all(r["loss"] > 0 for r in rows)
    table = format_table(rows)
    assert "bits/byte" in table and "accuracy (mean ± std, n)" not in table  # no image table
    page = (write_report(folders, tmp_path / "report").parent / "report.html").read_text()
    assert "validation loss, nats/byte" in page


def test_the_lm_preset():
    cells = expand_grid(PRESETS["lm"]["base"], PRESETS["lm"]["grid"])
    assert len(cells) == 3 + 3 * 2 * 3  # dense once per seed
    assert {(c.model, c.data) for c in cells} == {("gpt-mini", "text")}
    assert sorted({c.method for c in cells}) == ["dense", "rigl", "set", "static"]
    assert {c.clip_grad_norm for c in cells} == {1.0}  # unclipped dense runs stall on plateaus
