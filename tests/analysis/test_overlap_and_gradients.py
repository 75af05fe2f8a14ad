"""Mask overlap counted by hand, and per-layer gradient norms against autograd on one batch."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.analysis import gradient_norms, mask_overlap


def test_jaccard_by_hand():
    a = {"x": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool),
         "y": torch.tensor([1, 0, 1], dtype=torch.bool)}
    b = {"x": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool),
         "y": torch.tensor([1, 0, 1], dtype=torch.bool)}
    o = mask_overlap(a, b)
    assert o.layers == {"x": pytest.approx(1 / 3), "y": 1.0}
    assert (o.shared, o.either) == (3, 5) and o.overall == pytest.approx(3 / 5)
    empty = {"x": torch.zeros(2, 4, dtype=torch.bool)}
    assert mask_overlap(empty, empty).overall == 1.0
    with pytest.raises(ValueError, match="different weights"):
        mask_overlap(a, {"x": a["x"]})
    with pytest.raises(ValueError, match="shapes"):
        mask_overlap({"x": a["x"]}, {"x": a["y"]})


@pytest.mark.parametrize("backend", st.available_backends())
def test_random_masks_overlap_about_d_over_2_minus_d(backend):
    masks = []
    for seed in (0, 1):
        model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 200))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        masks.append(st.Static(model, opt, density=0.1, total_steps=1, seed=seed,
                               backend=backend).masks)
    assert mask_overlap(*masks).overall == pytest.approx(0.1 / 1.9, rel=0.1)
    assert mask_overlap(masks[0], masks[0]).overall == 1.0


def test_gradient_norms_match_one_large_batch_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    model[0].bias.grad = torch.ones(7)  # the model's own gradient, left as it was
    norms = gradient_norms(model, [(x[:5], y[:5]), (x[5:], y[5:])])
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    for name in ("0.weight", "2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert norms[name] == pytest.approx(grad.norm().item(), rel=1e-5)
    assert norms["overall"] == pytest.approx(
        (norms["0.weight"] ** 2 + norms["2.weight"] ** 2) ** 0.5)
    mask = torch.rand(7, 5) < 0.5
    masked = gradient_norms(model, [(x, y)], masks={"0.weight": mask})
    assert masked["0.weight"] == pytest.approx((model[0].weight.grad * mask).norm().item(),
                                               rel=1e-5)
    with pytest.raises(ValueError, match="not sparsifiable"):
        gradient_norms(model, [(x, y)], masks={"0.bias": torch.ones(7, dtype=torch.bool)})
