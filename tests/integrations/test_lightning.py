"""SparseTrainingCallback: sparse training through the real lightning.Trainer."""

from __future__ import annotations

import csv
import importlib
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.integrations.lightning import SparseTrainingCallback  # noqa: E402
from sparsetrain.sparsity.masks import active_count  # noqa: E402

DENSITY = 0.3
LAYERS = ["net.0.weight", "net.2.weight", "net.4.weight"]


class TinyModule(pl.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(batch_size: int = 8):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 16, generator=g),
                                          torch.randint(0, 4, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def rigl(**settings) -> dict:
    """RigL at DENSITY dropping a constant fraction: every update step changes the masks."""
    return {"density": DENSITY, "drop_fraction_decay": "constant", **settings}


class Recorder(pl.Callback):
    """Per optimizer step ``t``: the gradients it sees (after clipping), the masks after it
    (``masks[first]``: those it starts from)."""

    def __init__(self, sparse: SparseTrainingCallback):
        self.sparse, self.grads, self.masks = sparse, {}, {}

    def _masks(self):
        masks = self.sparse.sparsifier.masks
        return {n: masks[n].clone() for n in masks}

    def on_train_start(self, trainer, pl_module):
        self.masks[trainer.global_step] = self._masks()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step + 1] = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks[trainer.global_step] = self._masks()


def fit(tmp_path, *, sparsity=None, ckpt_path=None, seed=0, callbacks=(), batch_size=8,
        **trainer_settings):
    sparse = SparseTrainingCallback("rigl", **(sparsity or rigl(delta_t=4, t_end=12)))
    recorder = Recorder(sparse)
    settings = dict(accelerator="cpu", devices=1, max_steps=12, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path),
                    log_every_n_steps=1)
    settings.update(trainer_settings)
    trainer = pl.Trainer(callbacks=[sparse, recorder, *callbacks], **settings)
    module = TinyModule(seed)
    trainer.fit(module, loader(batch_size), ckpt_path=ckpt_path)
    return trainer, module, sparse, recorder


def check_invariants(module, sparsifier) -> None:
    params = dict(module.named_parameters())
    assert sparsifier.names == LAYERS
    expected = st.densities_for_shapes({n: tuple(params[n].shape) for n in LAYERS}, DENSITY,
                                       "erk")
    for name in LAYERS:
        mask, weight = sparsifier.masks[name], params[name].detach()
        assert int(mask.sum()) == active_count(weight.numel(), expected[name]) < weight.numel()
        assert bool((weight[~mask] == 0).all()), name


def check_updates(trainer, recorder, update_steps) -> None:
    """Masks change at the update steps only; each update grew the positions of largest
    |dense gradient| of its step, all of them with a non-zero gradient."""
    steps = sorted(recorder.masks)
    assert steps == list(range(steps[0], trainer.global_step + 1))
    for t in steps[1:]:
        before, after = recorder.masks[t - 1], recorder.masks[t]
        changed = any(not torch.equal(before[n], after[n]) for n in LAYERS)
        assert changed == (t in update_steps), t
    for t in update_steps:
        before, after, grads = recorder.masks[t - 1], recorder.masks[t], recorder.grads[t]
        grew = 0
        for name in LAYERS:
            grown, passed_over = after[name] & ~before[name], ~after[name] & ~before[name]
            if not grown.any():  # every weight it dropped was grown back
                continue
            grew += 1
            score = grads[name].abs()
            assert float(score[grown].min()) > 0.0, (t, name)
            assert float(score[grown].min()) >= float(score[passed_over].max()), (t, name)
        assert grew > 0, t


def test_rigl_through_lightning(tmp_path):
    logger = CSVLogger(str(tmp_path), name="run")
    trainer, module, sparse, recorder = fit(tmp_path, logger=logger)
    sparsifier = sparse.sparsifier
    assert sparsifier.step_count == trainer.global_step == 12
    assert sparsifier.total_steps == 12
    check_invariants(module, sparsifier)
    check_updates(trainer, recorder, update_steps={4, 8, 12})
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsity/density")]
    assert len(rows) == 12
    assert all(abs(float(r["sparsity/density"]) - DENSITY) < 1e-2 for r in rows)
    ever = [float(r["sparsity/ever_active"]) for r in rows]
    assert ever == sorted(ever) and ever[0] < ever[-1]
    assert ever[-1] == pytest.approx(sparsifier.ever_active_fraction())


def test_clipping_by_active_gradient_norm(tmp_path):
    max_norm = 0.05
    trainer, module, sparse, recorder = fit(tmp_path, gradient_clip_val=max_norm, max_steps=6,
                                            sparsity=rigl(delta_t=3, t_end=6))
    for t in range(1, 7):
        grads, masks = recorder.grads[t], recorder.masks[t - 1]
        active = torch.cat([(g[masks[n]] if n in LAYERS else g).flatten()
                            for n, g in grads.items()])
        every = torch.cat([g.flatten() for g in grads.values()])
        assert float(active.norm()) == pytest.approx(max_norm, rel=1e-4), t
        assert float(every.norm()) > 1.001 * max_norm, t  # Lightning did not clip by all
    check_updates(trainer, recorder, update_steps={3, 6})
    assert trainer.gradient_clip_val == max_norm  # given back after fitting


def test_gradient_accumulation(tmp_path):
    trainer, module, sparse, recorder = fit(tmp_path, accumulate_grad_batches=2, max_steps=6,
                                            batch_size=4, sparsity=rigl(delta_t=3, t_end=6))
    assert sparse.sparsifier.step_count == trainer.global_step == 6
    assert sparse.sparsifier.total_steps == 6  # optimizer steps, not batches
    check_invariants(module, sparse.sparsifier)
    check_updates(trainer, recorder, update_steps={3, 6})


def test_bf16_mixed_precision(tmp_path):
    trainer, module, sparse, recorder = fit(tmp_path, precision="bf16-mixed", max_steps=8,
                                            sparsity=rigl(delta_t=4, t_end=8))
    assert sparse.sparsifier.step_count == 8
    check_invariants(module, sparse.sparsifier)
    check_updates(trainer, recorder, update_steps={4, 8})


def test_exact_resume_before_an_update_step(tmp_path):
    # updates at steps 3, 5, 7, 9, 11; the checkpoint after step 4 holds masks an update
    # changed, and the step right after it is an update
    sparsity = rigl(delta_t=2, t_start=1, t_end=12)
    # saved after step 4, the last batch of the first epoch (Lightning replays a batch when it
    # resumes from a checkpoint saved at on_train_epoch_end, sparse or not)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4,
                                  save_top_k=-1)
    _, straight, sparse_a, recorder_a = fit(tmp_path / "a", sparsity=sparsity,
                                            enable_checkpointing=True, callbacks=[checkpoints])
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"]["SparseTrainingCallback"]
    assert saved["sparsifier"]["step_count"] == 4
    trainer, resumed, sparse_b, recorder = fit(tmp_path / "b", sparsity=sparsity, seed=1,
                                               ckpt_path=str(path))
    assert sparse_b.sparsifier.step_count == 12 and sorted(recorder.masks)[0] == 4
    check_updates(trainer, recorder, update_steps={5, 7, 9, 11})
    a, b = sparse_a.sparsifier.state_dict(), sparse_b.sparsifier.state_dict()
    for name in LAYERS:
        assert torch.equal(a["positions"][name], b["positions"][name]), name
        assert torch.equal(a["ever_active"][name], b["ever_active"][name]), name
        assert not torch.equal(a["positions"][name], saved["sparsifier"]["positions"][name])
    assert any(not torch.equal(recorder_a.masks[0][n], recorder.masks[4][n]) for n in LAYERS)
    weights_a, weights_b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_needs_the_sparsifier_state(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader())
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    with pytest.raises(ValueError, match="holds no sparsifier state"):
        fit(tmp_path, max_steps=4, ckpt_path=str(tmp_path / "dense.ckpt"))


@pytest.mark.parametrize("method, settings, match", [
    ("nope", {"density": 0.1}, "unknown method"),
    ("rigl", {"density": 0.1, "total_steps": 5}, "total_steps"),
    ("rigl", {"density": 0.1, "delta": 5}, "invalid settings for RigL"),
    ("rigl", {}, "density"),
    ("rigl", {"density": 0.1, "backend": "csr"}, "backend='masked'"),
])
def test_bad_settings_fail_at_construction(method, settings, match):
    with pytest.raises(ValueError, match=match):
        SparseTrainingCallback(method, **settings)


def test_missing_lightning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "sparsetrain.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[lightning\]'"):
        importlib.import_module("sparsetrain.integrations.lightning")
