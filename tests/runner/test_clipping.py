"""``clip_grad_norm`` in the runner: the norm of the active gradients is clipped on every
backend, dense runs clip every gradient, RigL still updates its masks, and resume stays exact."""

import pytest
import torch

import sparsetrain as st
from sparsetrain.runner import Trainer

from .test_train import check_resume, config, quiet

MAX_NORM = 0.05


def active_norm(sparsifier) -> float:
    """The 2-norm of the gradients the optimizer holds, sparsified weights counting their active
    positions only (read through the backend's public accessors)."""
    backend = sparsifier.backend
    sparse = {id(backend.gradient_parameter(n)): n for n in backend.names}
    total = 0.0
    for group in sparsifier.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = backend.active_gradient(sparse[id(p)]) if id(p) in sparse else p.grad
            total += float(g.double().pow(2).sum())
    return total ** 0.5


@pytest.mark.parametrize("backend", st.available_backends())
def test_every_step_clips_the_norm_of_the_active_gradients(tmp_path, backend):
    trainer = Trainer(config(clip_grad_norm=MAX_NORM, backend=backend), tmp_path / "run",
                      log=quiet)
    sparsifier = trainer.sparsifier
    clip = sparsifier.clip_grad_norm_
    seen = []

    def spy(max_norm, *args, **kwargs):
        before = float(clip(max_norm, *args, **kwargs))
        seen.append((max_norm, before, active_norm(sparsifier)))
        return before

    sparsifier.clip_grad_norm_ = spy
    trainer.train()
    assert len(seen) == trainer.total_steps
    assert all(m == MAX_NORM for m, _, _ in seen)
    assert sum(before > MAX_NORM for _, before, _ in seen) > len(seen) // 2  # it did clip
    for _, before, after in seen:
        assert after <= MAX_NORM * (1 + 1e-4)
        if before <= MAX_NORM:
            assert after == pytest.approx(before, rel=1e-6)
        else:
            assert after == pytest.approx(MAX_NORM, rel=1e-4)


def test_dense_runs_clip_every_gradient(tmp_path, monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = clip(parameters, max_norm, *args, **kwargs)
        after = sum(float(p.grad.double().pow(2).sum()) for p in parameters
                    if p.grad is not None) ** 0.5
        calls.append((max_norm, float(before), after, len(parameters)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer = Trainer(config(method="dense", clip_grad_norm=MAX_NORM), tmp_path / "run",
                      log=quiet)
    trainer.train()
    n_params = len(list(trainer.model.parameters()))
    assert len(calls) == trainer.total_steps
    for max_norm, before, after, n in calls:
        assert max_norm == MAX_NORM and n == n_params
        assert after <= MAX_NORM * (1 + 1e-4)


@pytest.mark.parametrize("backend", st.available_backends())
def test_clipped_rigl_still_updates_its_masks(tmp_path, backend):
    """Clipping scales every gradient alike, the inactive ones included, so RigL's updates still
    find gradients to grow from (that they grow the largest is tested in
    tests/methods/test_training_loop.py): the active sets move."""
    trainer = Trainer(config(clip_grad_norm=MAX_NORM, backend=backend), tmp_path / "run",
                      log=quiet)
    first = {k: v.clone() for k, v in trainer.sparsifier.masks.items()}
    summary = trainer.train()
    moved = sum(int((first[k] & ~m).sum()) for k, m in trainer.sparsifier.masks.items())
    assert moved > 0
    assert summary["ever_active_fraction"] > summary["density"] + 0.01


@pytest.mark.parametrize("backend", st.available_backends())
def test_clipped_run_resumes_exactly(tmp_path, backend):
    check_resume(tmp_path, 5, clip_grad_norm=MAX_NORM, backend=backend)
