"""Drop and grow rules written once: a user's rule runs on every backend, the same way."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.backends import GradientUnavailable

BACKENDS = st.available_backends()
pytestmark = pytest.mark.filterwarnings("ignore:backend=.csr.*have no active weight")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24, dtype=torch.float64), nn.ReLU(),
                         nn.Linear(24, 4, dtype=torch.float64))


def train(cls, backend, steps=30, **kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = cls(model, opt, density=0.3, total_steps=steps, delta_t=3, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        sp.step()
        history.append({n: sp.active_positions(n).clone() for n in sp.names})
    return history


class GradientTimesWeight(st.RigL):
    """A user's rule: grow by |grad| plus a little of the (zero) weight; drop by |W| * 2."""

    def grow_scores(self, block):
        return block.gradient().abs() + 0.5 * block.weight().abs()

    def drop_scores(self, name):
        return 2 * self.active_positions(name).new_ones(1) * super().drop_scores(name)


class SetByBlocks(st.SET):
    """SET's own score, without the mark that lets selection list the order instead."""

    def grow_scores(self, block):
        return (-self.grow_order(block.name).rank(block.positions())).view(block.shape)


class UndeclaredGradient(st.SET):
    """Reads the gradient after the optimizer step without saying so."""

    def grow_scores(self, block):
        return block.gradient().abs()


def same(a, b):
    return all(all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(a, b))


def test_a_user_rule_runs_alike_on_every_backend():
    runs = [train(GradientTimesWeight, b) for b in BACKENDS]
    assert all(same(runs[0], r) for r in runs[1:])
    assert not same(runs[0], train(st.SET, "masked")), "the rule must have an effect"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_listed_random_order_equals_its_score_computed_by_blocks(backend):
    assert same(train(st.SET, backend), train(SetByBlocks, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_score_reading_an_unkept_gradient_is_refused_clearly(backend):
    with pytest.raises(GradientUnavailable, match="update_reads_gradient = True"):
        train(UndeclaredGradient, backend)
    UndeclaredGradient.update_reads_gradient = True
    try:
        train(UndeclaredGradient, backend)  # declared: the gradient is kept for the update
    finally:
        UndeclaredGradient.update_reads_gradient = False


def test_rigl_with_the_optimizer_step_on_update_grows_from_the_unmasked_gradient():
    runs = [train(st.RigL, b, optimizer_step_on_update=True) for b in BACKENDS]
    assert all(same(runs[0], r) for r in runs[1:])
    assert not same(runs[0], train(st.SET, "masked", optimizer_step_on_update=True))
