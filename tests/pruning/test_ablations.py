"""The sanity checks of pruning at initialisation: shuffled masks keep exact per-layer counts,
re-initialised weights keep the masks; both through the runner, with exact resume."""

import pytest
import torch

from sparsetrain.pruning import shuffle_masks
from sparsetrain.runner import ConfigError, Trainer
from sparsetrain.runner.config import PRUNE_AT_INIT_METHODS

from ..runner.test_train import check_resume, config, quiet


def test_shuffle_keeps_every_layer_count_and_moves_the_weights():
    torch.manual_seed(0)
    masks = {"a": torch.rand(30, 40) < 0.1, "b": torch.rand(7, 3, 3, 3) < 0.5,
             "c": torch.zeros(5, 5, dtype=torch.bool), "d": torch.ones(4, 4, dtype=torch.bool)}
    shuffled = shuffle_masks(masks, seed=3)
    for name, mask in masks.items():
        assert shuffled[name].shape == mask.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(mask.sum())
    assert not torch.equal(shuffled["a"], masks["a"]) and not torch.equal(shuffled["b"], masks["b"])
    assert torch.equal(shuffled["d"], masks["d"])            # a full layer stays full
    again = shuffle_masks(masks, seed=3)
    assert all(torch.equal(again[n], shuffled[n]) for n in masks)   # the seed decides
    other = shuffle_masks(masks, seed=4)
    assert not torch.equal(other["a"], shuffled["a"])


def test_shuffled_positions_are_uniform():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:100] = True                                # all at the start of the layer
    hits = torch.zeros(1000)
    for seed in range(200):
        hits += shuffle_masks({"w": mask}, seed)["w"].float()
    # each position is active in 10% of the draws: 20 of 200 (binomial sd about 4.2)
    assert hits[:100].mean() == pytest.approx(20, abs=2) and hits[100:].mean() == \
        pytest.approx(20, abs=1)


@pytest.mark.parametrize("method", PRUNE_AT_INIT_METHODS)
def test_runner_shuffle_keeps_the_layer_densities(tmp_path, method):
    plain = Trainer(config(method=method), tmp_path / "a", log=quiet)
    shuffled = Trainer(config(method=method, prune_ablation="shuffle"), tmp_path / "b",
                       log=quiet)
    a, b = plain.sparsifier.masks, shuffled.sparsifier.masks
    assert {n: int(m.sum()) for n, m in a.items()} == {n: int(m.sum()) for n, m in b.items()}
    assert any(not torch.equal(a[n], b[n]) for n in a)
    weights = dict(plain.model.named_parameters())
    for n, p in shuffled.model.named_parameters():  # the same initial draw under new masks
        if n in b:
            both = a[n] & b[n]
            assert torch.equal(p.detach()[both], weights[n].detach()[both])
            assert not p.detach()[~b[n]].any() and p.detach()[b[n] & ~a[n]].abs().min() > 0


@pytest.mark.parametrize("method", PRUNE_AT_INIT_METHODS)
def test_runner_reinit_keeps_the_masks_and_draws_new_weights(tmp_path, method):
    plain = Trainer(config(method=method), tmp_path / "a", log=quiet)
    fresh = Trainer(config(method=method, prune_ablation="reinit"), tmp_path / "b", log=quiet)
    a, b = plain.sparsifier.masks, fresh.sparsifier.masks
    assert all(torch.equal(a[n], b[n]) for n in a)
    weights = dict(plain.model.named_parameters())
    for n, p in fresh.model.named_parameters():
        assert not torch.equal(p.detach(), weights[n].detach()) or not p.detach().any()
        if n in b:
            assert not p.detach()[~b[n]].any()       # inactive weights are zero
            # drawn from the same initialiser: the same scale
            assert p.detach()[b[n]].std().item() == pytest.approx(
                weights[n].detach()[a[n]].std().item(), rel=0.3)


@pytest.mark.parametrize("ablation", ["shuffle", "reinit"])
def test_an_ablated_run_resumes_exactly(tmp_path, ablation):
    check_resume(tmp_path, 9, method="snip", prune_ablation=ablation)


@pytest.mark.parametrize("settings, match", [
    ({"method": "rigl", "prune_ablation": "shuffle"}, "does not prune at initialisation"),
    ({"method": "snip", "prune_ablation": "permute"}, "prune_ablation"),
])
def test_bad_ablations_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        config(**settings)
