"""SparseTrainer: sparse training through the real transformers.Trainer, on a tiny GPT-2."""

from __future__ import annotations

import importlib
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (GPT2Config, GPT2LMHeadModel, TrainerCallback,  # noqa: E402
                          TrainingArguments)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.integrations.huggingface import SPARSIFIER_NAME, SparseTrainer  # noqa: E402
from sparsetrain.sparsity.masks import active_count  # noqa: E402

DENSITY = 0.3


def rigl(**settings) -> dict:
    """RigL at DENSITY, dropping a constant fraction, so that every update step changes the
    masks (the default cosine decay drops nothing at t_end)."""
    return {"method": "rigl", "density": DENSITY, "drop_fraction_decay": "constant", **settings}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def dataset(n: int = 16):
    tokens = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in tokens]


class Recorder(TrainerCallback):
    """Per optimizer step ``t``: every gradient the step sees (after clipping) and the masks
    after it (``masks[0]``: the initial ones); and every log event that the callbacks, the
    reporting integrations among them, receive."""

    def __init__(self):
        self.trainer = None
        self.grads, self.masks, self.logs = {}, {}, []

    def _masks(self):
        masks = self.trainer.sparsifier.masks
        return {n: masks[n].clone() for n in masks}

    def on_train_begin(self, args, state, control, **kwargs):
        self.masks[state.global_step] = self._masks()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads[state.global_step + 1] = {
            n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}

    def on_step_end(self, args, state, control, **kwargs):
        self.masks[state.global_step] = self._masks()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(tmp_path, *, sparsity=None, resume=None, model_seed=0, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                    learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=0, max_grad_norm=1.0)
    settings.update(overrides)
    recorder = Recorder()
    trainer = SparseTrainer(
        model=tiny_gpt2(model_seed), args=TrainingArguments(**settings),
        train_dataset=dataset(), callbacks=[recorder],
        sparsity=sparsity or rigl(delta_t=4, t_end=12))
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def conv1d_names(model) -> set[str]:
    return {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, Conv1D)}


def check_invariants(trainer) -> None:
    """Exact per-layer counts (ERK at DENSITY), inactive weights exactly zero, every Conv1D
    weight sparse, the position embedding dense."""
    model, sparsifier = trainer.model, trainer.sparsifier
    params = dict(model.named_parameters())
    assert set(sparsifier.names) == conv1d_names(model) | {"transformer.wte.weight"}
    shapes = {n: tuple(params[n].shape) for n in sparsifier.names}
    expected = st.densities_for_shapes(shapes, DENSITY, "erk")
    for name in sparsifier.names:
        mask, weight = sparsifier.masks[name], params[name].detach()
        assert int(mask.sum()) == active_count(weight.numel(), expected[name]), name
        assert bool((weight[~mask] == 0).all()), name
        assert weight.dtype == torch.float32
    for name in conv1d_names(model):
        assert int(sparsifier.masks[name].sum()) < params[name].numel()
    assert "transformer.wpe.weight" not in sparsifier.names
    assert sparsifier.layer_densities()["transformer.wpe.weight"] == 1.0
    assert bool((params["transformer.wpe.weight"] != 0).all())


def check_updates(trainer, recorder, update_steps) -> None:
    """Masks change at the update steps only, and each update grew the Conv1D positions of
    largest |dense gradient| of its step (non-zero: RigL saw the dense gradient)."""
    sparsifier, steps = trainer.sparsifier, sorted(recorder.masks)
    assert steps == list(range(steps[0], trainer.state.max_steps + 1))
    for t in steps[1:]:
        before, after = recorder.masks[t - 1], recorder.masks[t]
        changed = any(not torch.equal(before[n], after[n]) for n in sparsifier.names)
        assert changed == (t in update_steps), t
    for t in update_steps:
        before, after, grads = recorder.masks[t - 1], recorder.masks[t], recorder.grads[t]
        grew = 0
        for name in conv1d_names(trainer.model):
            grown, passed_over = after[name] & ~before[name], ~after[name] & ~before[name]
            if not grown.any():  # every weight it dropped was grown back
                continue
            grew += 1
            score = grads[name].abs()
            assert float(score[grown].min()) > 0.0, (t, name)
            assert float(score[grown].min()) >= float(score[passed_over].max()), (t, name)
        assert grew > 0, t


def test_rigl_through_trainer(tmp_path):
    trainer, recorder = train(tmp_path)
    sparsifier = trainer.sparsifier
    assert sparsifier.step_count == trainer.state.global_step == 12
    check_invariants(trainer)
    check_updates(trainer, recorder, update_steps={4, 8, 12})
    # the statistics reach every on_log callback (the reporting integrations among them)
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 12
    assert all(abs(log["sparsity/density"] - DENSITY) < 1e-3 for log in train_logs)
    ever = [log["sparsity/ever_active"] for log in train_logs]
    assert ever == sorted(ever) and ever[0] == train_logs[0]["sparsity/density"] < ever[-1]
    assert ever[-1] == sparsifier.ever_active_fraction()


def norms(recorder, t):
    """(norm of the active gradients, norm of all gradients) that optimizer step ``t`` saw."""
    sparsifier, grads, masks = recorder.trainer.sparsifier, recorder.grads[t], recorder.masks[t - 1]
    active = [g[masks[n]] if n in sparsifier.names else g for n, g in grads.items()]
    return (float(torch.cat([a.flatten() for a in active]).norm()),
            float(torch.cat([g.flatten() for g in grads.values()]).norm()))


def test_clipping_by_active_gradient_norm(tmp_path):
    max_norm = 0.05
    trainer, recorder = train(tmp_path, max_steps=6, max_grad_norm=max_norm,
                              sparsity=rigl(delta_t=3, t_end=6))
    logged = [log["grad_norm"] for log in recorder.logs if "grad_norm" in log]
    assert len(logged) == 6
    for t, before_clipping in zip(range(1, 7), logged):
        active, every = norms(recorder, t)
        assert before_clipping > 1.5 * max_norm  # so every step was clipped...
        assert active == pytest.approx(max_norm, rel=1e-4)  # ...by the active gradients' norm
        assert every > 1.001 * max_norm  # Trainer's clipping by all gradients did not run
    check_updates(trainer, recorder, update_steps={3, 6})  # clipping kept RigL's choice


def test_logged_grad_norm_without_clipping_is_the_active_norm(tmp_path):
    trainer, recorder = train(tmp_path, max_steps=3, max_grad_norm=0.0)
    logged = [log["grad_norm"] for log in recorder.logs if "grad_norm" in log]
    assert len(logged) == 3
    for t, value in zip(range(1, 4), logged):
        active, every = norms(recorder, t)
        assert value == pytest.approx(active, rel=1e-5) and every > 1.001 * active


def test_gradient_accumulation(tmp_path):
    trainer, recorder = train(tmp_path, max_steps=8, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2,
                              sparsity=rigl(delta_t=4, t_end=8))
    assert trainer.sparsifier.step_count == trainer.state.global_step == 8
    assert trainer.sparsifier.total_steps == 8  # optimizer steps, not micro-batches
    check_invariants(trainer)
    check_updates(trainer, recorder, update_steps={4, 8})


def test_bf16_mixed_precision(tmp_path):
    trainer, recorder = train(tmp_path, bf16=True, max_steps=8,
                              sparsity=rigl(delta_t=4, t_end=8))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.sparsifier.step_count == 8
    check_invariants(trainer)
    check_updates(trainer, recorder, update_steps={4, 8})


def test_exact_resume_before_an_update_step(tmp_path):
    # updates at steps 3, 5, 7, 9, 11; the checkpoint after step 4 holds masks an update
    # changed, and the step right after it is an update
    sparsity = rigl(delta_t=2, t_start=1, t_end=12)
    straight, recorder_a = train(tmp_path / "a", sparsity=sparsity, save_strategy="steps",
                                 save_steps=4)
    checkpoint = tmp_path / "a" / "checkpoint-4"
    saved = torch.load(checkpoint / SPARSIFIER_NAME, weights_only=True)
    assert saved["step_count"] == 4
    # a new Trainer, a model of other initial weights: everything comes from the checkpoint
    resumed, recorder = train(tmp_path / "b", sparsity=sparsity, resume=str(checkpoint),
                              model_seed=1, save_strategy="steps", save_steps=4)
    assert resumed.sparsifier.step_count == 12 and sorted(recorder.masks)[0] == 4
    check_updates(resumed, recorder, update_steps={5, 7, 9, 11})
    a, b = straight.sparsifier.state_dict(), resumed.sparsifier.state_dict()
    initial = recorder_a.masks[0]
    for name in straight.sparsifier.names:
        assert torch.equal(a["positions"][name], b["positions"][name]), name
        assert torch.equal(a["ever_active"][name], b["ever_active"][name]), name
        assert not torch.equal(a["positions"][name], saved["positions"][name]), name
    assert any(not torch.equal(initial[n], recorder.masks[4][n]) for n in initial)
    weights_a, weights_b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_needs_the_sparsifier_state(tmp_path):
    train(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    elsewhere = tmp_path / "copy"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", elsewhere)
    (elsewhere / SPARSIFIER_NAME).unlink()
    with pytest.raises(ValueError, match="holds no sparsifier state"):
        train(tmp_path / "b", max_steps=4, resume=str(elsewhere))


@pytest.mark.parametrize("sparsity, match", [
    ({"density": 0.1}, "needs a 'method'"),
    ({"method": "nope", "density": 0.1}, "unknown method"),
    ({"method": "rigl", "density": 0.1, "total_steps": 5}, "total_steps"),
    ({"method": "rigl", "density": 0.1, "delta": 5}, "invalid settings for RigL"),
    ({"method": "rigl", "density": 0.1, "backend": "csr"}, "backend='masked'"),
])
def test_bad_settings_fail_at_construction(tmp_path, sparsity, match):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=match):
        SparseTrainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), sparsity=sparsity)


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "sparsetrain.integrations.huggingface")
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[huggingface\]'"):
        importlib.import_module("sparsetrain.integrations.huggingface")
