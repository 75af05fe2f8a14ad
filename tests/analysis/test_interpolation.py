"""The loss along a line, on a quadratic whose loss along any line is known in closed form."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.analysis import interpolate_states, loss_along_line


class Quadratic(nn.Module):
    """Outputs w (broadcast over the batch); the loss is ||w - c||^2 per example."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(len(x), -1)


def test_loss_on_a_quadratic_matches_the_closed_form():
    torch.manual_seed(0)
    a, b, c = (torch.randn(5, dtype=torch.float64) for _ in range(3))
    model = Quadratic(5)
    own = model.w.detach().clone()
    batches = [(torch.zeros(3, 1), c.expand(3, -1)), (torch.zeros(2, 1), c.expand(2, -1))]
    alphas = [-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]
    points = loss_along_line(model, {"w": a}, {"w": b}, batches, alphas=alphas,
                             loss_fn=lambda out, y: ((out - y) ** 2).sum())
    for p, alpha in zip(points, alphas):
        # per example: ||(1 - alpha) a + alpha b - c||^2, a quadratic in alpha
        expected = float((((1 - alpha) * a + alpha * b - c) ** 2).sum())
        assert p.alpha == alpha and p.loss == pytest.approx(expected, rel=1e-12)
    assert torch.equal(model.w.detach(), own)  # the model's weights are restored


def test_line_between_a_sparse_solution_and_its_initialisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.RigL(model, opt, density=0.5, total_steps=20, delta_t=5)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
    end = {k: v.clone() for k, v in model.state_dict().items()}
    points = loss_along_line(model, start, end, [(x, y)])
    assert [p.alpha for p in points] == pytest.approx([i / 10 for i in range(11)])
    model.eval()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert points[-1].loss == pytest.approx(final, rel=1e-6)
    assert points[-1].accuracy == pytest.approx(accuracy)
    assert points[-1].loss < points[0].loss


def test_states_of_different_models_are_refused():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    with pytest.raises(ValueError, match="different entries"):
        interpolate_states(a, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_states(a, {"w": torch.zeros(4), "n": torch.tensor(2)}, 0.5)
    with pytest.raises(ValueError, match="to_masked"):
        interpolate_states({"col": torch.tensor([0, 1])}, {"col": torch.tensor([0, 2])}, 0.5)
    mixed = interpolate_states(a, {"w": torch.ones(3), "n": torch.tensor(5)}, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 0.25)) and int(mixed["n"]) == 5
    with pytest.raises(ValueError, match="at least one batch"):
        loss_along_line(nn.Linear(3, 2), {}, {}, [])
