"""The training loop: metrics, summary, checkpoints and exact resume after an interruption."""

import json
import os
import signal

import pytest
import torch

import sparsetrain as st
from sparsetrain.runner import ConfigError, Trainer, TrainingError, make_config
from sparsetrain.runner.config import PRUNE_AT_INIT_METHODS

SYNTHETIC = {"n_train": 200, "n_test": 50, "input_shape": [1, 8, 8], "num_classes": 4}


def config(**overrides):
    settings = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="rigl",
                    density=0.2, epochs=3, batch_size=32, lr=0.05, delta_t=3, log_every=4,
                    checkpoint_every=0, progress=False, device="cpu")
    settings.update(overrides)
    return make_config(settings)


def quiet(_message):
    pass


def final_state(trainer):
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    masks = {} if trainer.sparsifier is None else {
        k: v.clone() for k, v in trainer.sparsifier.masks.items()}
    return weights, masks


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), f"weight {k} differs"
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), f"mask {k} differs"


def test_run_writes_metrics_summary_and_checkpoint(tmp_path):
    trainer = Trainer(config(), tmp_path / "run", log=quiet)
    summary = trainer.train()
    for key in ("test_accuracy", "best_test_accuracy", "density", "method", "model", "data",
                "epochs", "wall_time_s", "layer_densities"):
        assert key in summary
    assert summary["steps"] == trainer.total_steps == 21
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert abs(summary["density"] - 0.2) < 0.01
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [4, 8, 12, 16, 20]
    for r in trains:
        assert {"step", "epoch", "loss", "accuracy", "lr", "density", "wall_time_s"} <= set(r)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["run"]["finished"] and checkpoint["run"]["step"] == 21
    assert (tmp_path / "run" / "config.yaml").exists()


def test_a_finished_run_is_not_trained_again(tmp_path):
    Trainer(config(), tmp_path / "run", log=quiet).train()
    again = Trainer(config(), tmp_path / "run", resume=True, log=quiet)
    assert again.state.finished
    assert again.train()["steps"] == 21


# Every registered method on every backend it runs on, stopped at step 10 (mid-epoch, right
# after the update of step 9), plus the cases that need a stop of their own: an epoch end, the
# step before an update, a run pruned at initialisation by each method on each backend, and a
# dense run.
RESUME_CASES = ([(m, b, 10) for m, b in st.supported_pairs()]
                + [("rigl", "masked", 7)]  # at an epoch end
                # one step before an update, whose grow step reads the gradient of the next step
                + [("rigl", b, 11) for b in st.available_backends()]
                + [(m, b, 9) for m in PRUNE_AT_INIT_METHODS
                   for b in st.available_backends()]
                + [("dense", "masked", 16)])


@pytest.mark.filterwarnings("ignore:backend='csr'.*no active weight")  # SNIP empties some units
@pytest.mark.parametrize("method, backend, stop_at", RESUME_CASES)
def test_interrupted_and_resumed_equals_straight_through(tmp_path, method, backend, stop_at):
    check_resume(tmp_path, stop_at, method=method, backend=backend)


def check_resume(tmp_path, stop_at, **overrides):
    straight = Trainer(config(**overrides), tmp_path / "a", log=quiet)
    straight.train()
    first = Trainer(config(**overrides), tmp_path / "b", log=quiet)

    def stop(trainer):
        if trainer.state.step == stop_at:
            trainer.request_stop()

    assert first.train(on_step=stop) is None
    assert first.state.step == stop_at
    resumed = Trainer(config(**overrides), tmp_path / "b", resume=True, log=quiet)
    assert resumed.state.step == stop_at
    summary = resumed.train()
    assert summary["steps"] == 21
    assert_same(final_state(straight), final_state(resumed))
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").open()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").open()]
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in lines_a]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in lines_b]


def test_resume_with_augmentation_and_adam(tmp_path):
    settings = dict(data_options=dict(SYNTHETIC, input_shape=[3, 32, 32]), train_size=96,
                    batch_size=32,
                    epochs=2, augment=True, optimizer="adam", lr=1e-3, warmup_epochs=0.5,
                    label_smoothing=0.1)
    straight = Trainer(config(**settings), tmp_path / "a", log=quiet)
    straight.train()
    first = Trainer(config(**settings), tmp_path / "b", log=quiet)
    first.train(on_step=lambda t: t.state.step == 4 and t.request_stop())
    resumed = Trainer(config(**settings), tmp_path / "b", resume=True, log=quiet)
    resumed.train()
    assert_same(final_state(straight), final_state(resumed))


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path):
    trainer = Trainer(config(), tmp_path / "run", log=quiet)

    def interrupt(t):
        if t.state.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    assert trainer.train(on_step=interrupt) is None
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["run"]["step"] == 5 and not checkpoint["run"]["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_refuses_a_different_configuration(tmp_path):
    trainer = Trainer(config(), tmp_path / "run", log=quiet)
    trainer.train(on_step=lambda t: t.state.step == 3 and t.request_stop())
    with pytest.raises(ConfigError, match="different configuration.*density"):
        Trainer(config(density=0.3), tmp_path / "run", resume=True, log=quiet)
    # where and how visibly it runs may change
    Trainer(config(log_every=7, progress=True), tmp_path / "run", resume=True, log=quiet)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(config(), tmp_path / "empty", resume=True, log=quiet)


def test_corrupt_checkpoint(tmp_path):
    trainer = Trainer(config(), tmp_path / "run", log=quiet)
    trainer.train(on_step=lambda t: t.state.step == 3 and t.request_stop())
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="cannot be read"):
        Trainer(config(), tmp_path / "run", resume=True, log=quiet)


def test_nan_loss_stops_with_advice(tmp_path):
    trainer = Trainer(config(lr=1e30, optimizer="sgd", method="dense"), tmp_path / "run",
                      log=quiet)
    with pytest.raises(TrainingError, match="lower learning rate"):
        trainer.train()


@pytest.mark.parametrize("override, match", [
    ({"model": "lenet301"}, "lenet301"),
    ({"data": "imagenet"}, "imagenet"),
    ({"method": "rigl2"}, "rigl2"),
    ({"method": "gmp", "method_options": {"alpha": 0.3}}, "method_options"),
])
def test_unknown_names(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        Trainer(config(**override), tmp_path / "run", log=quiet)


def test_schedules():
    from sparsetrain.runner.train import LRSchedule
    c = config(lr_schedule="multistep", lr_milestones=[0.5], warmup_epochs=1, epochs=4)
    s = LRSchedule(c, steps_per_epoch=10, total_steps=40)
    assert [round(s.factor(t), 3) for t in (0, 4, 9, 10, 19, 20, 39)] == [
        0.1, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1]
    cos = LRSchedule(config(lr_schedule="cosine", epochs=4), 10, 40)
    assert cos.factor(0) == 1.0 and abs(cos.factor(20) - 0.5) < 1e-9
    step = LRSchedule(config(lr_schedule="step", lr_step_epochs=1, epochs=4), 10, 40)
    assert [step.factor(t) for t in (9, 10, 25)] == [1.0, 0.1, pytest.approx(0.01)]


def test_flops_and_ever_active_in_the_summary(tmp_path):
    summaries = {m: Trainer(config(method=m), tmp_path / m, log=quiet).train()
                 for m in ("dense", "static", "rigl", "snfs", "small-dense")}
    dense, static, rigl = summaries["dense"], summaries["static"], summaries["rigl"]
    assert dense["train_flops_vs_dense"] == pytest.approx(1.0)
    assert dense["inference_flops_vs_dense"] == 1.0
    examples = 200 * 3
    assert static["train_flops"] == pytest.approx(3 * static["inference_flops"] * examples)
    assert 0.15 < static["inference_flops_vs_dense"] < 0.25
    assert static["ever_active_fraction"] == pytest.approx(static["density"], abs=1e-6)
    assert rigl["ever_active_fraction"] > rigl["density"] + 0.01
    # RigL pays a dense gradient at its few update steps; SNFS at every step
    assert static["train_flops_vs_dense"] < rigl["train_flops_vs_dense"] < \
        summaries["snfs"]["train_flops_vs_dense"]
    small = summaries["small-dense"]
    assert small["width"] < 0.35 and small["density"] == 1.0
    model = Trainer(config(method="small-dense"), tmp_path / "x", log=quiet).model
    from sparsetrain.models import count_parameters
    sparse_nonzeros = sum(int(m.sum()) for m in
                          Trainer(config(method="static"), tmp_path / "y", log=quiet)
                          .sparsifier.masks.values())
    assert abs(count_parameters(model, sparsifiable_only=True) - sparse_nonzeros) < 0.05 * \
        sparse_nonzeros


def test_csr_backend_run_costs_what_the_masked_one_does(tmp_path):
    """Same seed, same run on both backends: the same masks, FLOPs and (within float32 noise)
    accuracy; the CSR run really holds CSR layers, and settings that cannot work on it are
    refused up front."""
    masked = Trainer(config(), tmp_path / "m", log=quiet)
    summary_m = masked.train()
    csr = Trainer(config(backend="csr"), tmp_path / "c", log=quiet)
    summary_c = csr.train()
    from sparsetrain.backends import CSRLinear

    assert any(isinstance(m, CSRLinear) for m in csr.model.modules())
    for key in ("inference_flops", "train_flops", "density"):
        assert summary_c[key] == pytest.approx(summary_m[key], rel=1e-9), key
    assert summary_c["test_accuracy"] == pytest.approx(summary_m["test_accuracy"], abs=0.02)
    assert summary_c["ever_active_fraction"] == summary_m["ever_active_fraction"]
    assert torch.equal(csr.sparsifier.mask_fingerprint(), masked.sparsifier.mask_fingerprint())
    with pytest.raises(ConfigError, match="backend 'csr' holds sparse weights"):
        config(method="dense", backend="csr")
    with pytest.raises(ConfigError, match="backend must be"):
        config(backend="sparse")
    with pytest.raises(ValueError, match="not available on backend='csr'"):
        Trainer(config(method="snfs", backend="csr"), tmp_path / "s", log=quiet)


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    """Settings added later (length, clip_grad_norm, prune_ablation) are missing from older
    checkpoints; there they had their defaults, so the run resumes."""
    from sparsetrain.runner import folder

    straight = Trainer(config(), tmp_path / "a", log=quiet)
    straight.train()
    first = Trainer(config(), tmp_path / "b", log=quiet)
    first.train(on_step=lambda t: t.state.step == 5 and t.request_stop())
    path = tmp_path / "b" / folder.CHECKPOINT
    checkpoint = torch.load(path, weights_only=True)
    for key in ("length", "clip_grad_norm", "prune_ablation"):
        del checkpoint["config"][key]
    checkpoint[folder.DIGEST] = folder.content_digest(checkpoint)
    torch.save(checkpoint, path)
    resumed = Trainer(config(), tmp_path / "b", resume=True, log=quiet)
    resumed.train()
    assert_same(final_state(straight), final_state(resumed))
    with pytest.raises(ConfigError, match="length: saved 1.0, now 2"):
        Trainer(config(length=2), tmp_path / "b", resume=True, log=quiet)
