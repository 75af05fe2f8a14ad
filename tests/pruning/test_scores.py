"""Pruning scores against slow, obviously-correct references on tiny models."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import sparsetrain as st
from tests.conftest import batches, tiny_cnn


class TinyMLP(nn.Module):
    def __init__(self, n_in=4, hidden=5, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_data(n_batches=2, batch=6, seed=0, n_in=4, n_out=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, n_in, generator=g, dtype=torch.float64),
             torch.randint(0, n_out, (batch,), generator=g)) for _ in range(n_batches)]


def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP().double()


def test_magnitude_is_abs_weight(model):
    scores = st.pruning_scores(model, "magnitude")
    params = dict(model.named_parameters())
    assert set(scores) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name, score in scores.items():
        assert torch.equal(score, params[name].detach().abs())


def test_random_is_seeded_and_uniform(model):
    a = st.pruning_scores(model, "random", seed=3)
    b = st.pruning_scores(model, "random", seed=3)
    c = st.pruning_scores(model, "random", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    assert all(float(s.min()) >= 0 and float(s.max()) < 1 for s in a.values())


def test_snip_is_connection_sensitivity():
    """SNIP: |dL/dc| at c = 1 for the loss of the network with weights W * c (the paper's form)."""
    model, data = tiny_mlp(), mlp_data()
    scores = st.pruning_scores(model, "snip", data)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = ["fc1.weight", "fc2.weight"]
    gates = {n: torch.ones_like(params[n], requires_grad=True) for n in names}
    total = 0
    for x, y in data:
        gated = dict(params, **{n: params[n] * gates[n] for n in names})
        total = total + nn.functional.cross_entropy(functional_call(model, gated, (x,)), y)
    grads = torch.autograd.grad(total, [gates[n] for n in names])
    for name, g in zip(names, grads):
        torch.testing.assert_close(scores[name], g.abs(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_full_hessian_times_gradient(temperature):
    """GraSP: keep-score W * (H g), with H the full Hessian of the loss over all the weights."""
    model, data = tiny_mlp(), mlp_data()
    scores = st.pruning_scores(model, "grasp", data, temperature=temperature,
                               samples_per_class=None)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = ["fc1.weight", "fc2.weight"]
    sizes = [params[n].numel() for n in names]

    def loss_of(flat):
        parts = dict(params)
        for name, chunk in zip(names, torch.split(flat, sizes)):
            parts[name] = chunk.view(params[name].shape)
        return sum(nn.functional.cross_entropy(functional_call(model, parts, (x,)) / temperature,
                                               y) for x, y in data)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    g = torch.autograd.functional.jacobian(loss_of, flat)
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    hg = hessian @ g
    expected = flat * hg
    for name, part in zip(names, torch.split(expected, sizes)):
        torch.testing.assert_close(scores[name], part.view(params[name].shape),
                                   rtol=1e-8, atol=1e-14)
        assert scores[name].abs().max() > 0


def test_grasp_samples_per_class_scores_two_class_ordered_halves():
    model = tiny_mlp()
    data = mlp_data(n_batches=4, batch=10)
    sampled = st.pruning_scores(model, "grasp", data, samples_per_class=2)
    per_class = {c: [] for c in range(3)}
    for x, y in data:
        for xi, yi in zip(x, y.tolist()):
            if len(per_class[yi]) < 2:
                per_class[yi].append(xi)
    x = torch.stack([xi for c in range(3) for xi in per_class[c]])
    y = torch.tensor([c for c in range(3) for _ in per_class[c]])
    halves = [(x[:3], y[:3]), (x[3:], y[3:])]
    expected = st.pruning_scores(model, "grasp", halves, samples_per_class=None)
    for name in expected:
        torch.testing.assert_close(sampled[name], expected[name])


def test_synflow_matches_closed_form_on_a_two_layer_relu_net():
    """R = 1'(|W2| relu(|W1| 1 + |b1|) + |b2|), so dR/dW1[i, j] = sum_k |W2|[k, i] and
    dR/dW2[k, i] = h_i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    scores = st.pruning_scores(model, "synflow", input_shape=(4,))
    w1, b1 = model[0].weight.detach().double(), model[0].bias.detach().double()
    w2 = model[2].weight.detach().double()
    expected1 = w1.abs() * w2.abs().sum(0)[:, None]
    hidden = w1.abs().sum(1) + b1.abs()
    expected2 = w2.abs() * hidden[None, :]
    torch.testing.assert_close(scores["0.weight"], expected1)
    torch.testing.assert_close(scores["2.weight"], expected2)


def test_synflow_reads_input_shape_from_data(model):
    from_data = st.pruning_scores(model, "synflow", batches(1))
    given = st.pruning_scores(model, "synflow", input_shape=(2, 8, 8))
    for name in given:
        assert torch.equal(from_data[name], given[name])


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("train", [True, False])
def test_model_is_left_untouched(method, train):
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = batches(1)[0]
    model(x)  # non-trivial BatchNorm statistics
    model.train(train)
    model.fc1.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st.pruning_scores(model, method, batches(2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training == train for m in model.modules())
    assert not model.fc1.weight.requires_grad
    assert torch.equal(model.conv1.weight.grad, torch.ones_like(model.conv1.weight))
    assert model.conv2.weight.grad is None


def test_masks_option_scores_the_pruned_network(model):
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()
             if n.endswith("weight") and p.dim() > 1}
    before = [p.detach().clone() for p in model.parameters()]
    scores = st.pruning_scores(model, "synflow", input_shape=(2, 8, 8), masks=masks)
    for name, mask in masks.items():
        assert torch.count_nonzero(scores[name][~mask]) == 0
        assert torch.count_nonzero(scores[name][mask]) > 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# --- bad input -------------------------------------------------------------------------------
def test_unknown_method(model):
    with pytest.raises(ValueError, match="unknown pruning method 'snipp'.*grasp"):
        st.pruning_scores(model, "snipp", batches(1))


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_needed(model, method):
    with pytest.raises(ValueError, match=f"{method}.*needs data"):
        st.pruning_scores(model, method)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_empty_data(model, method):
    with pytest.raises(ValueError, match="yielded no batch"):
        st.pruning_scores(model, method, [])
    with pytest.raises(ValueError, match="pairs of tensors"):
        st.pruning_scores(model, method, [torch.zeros(2)])


def test_unknown_option(model):
    with pytest.raises(ValueError, match="unknown option.*'temprature'.*temperature"):
        st.pruning_scores(model, "grasp", batches(1), temprature=100)


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.LSTM(4, 4),
                                    nn.MultiheadAttention(4, 2)])
def test_synflow_refuses_layers_it_cannot_handle(module):
    model = nn.Sequential(module, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="synflow cannot score"):
        st.pruning_scores(model, "synflow", input_shape=(3,))


def test_synflow_reads_the_input_shape_of_an_mlp_from_its_first_linear():
    model = tiny_mlp()
    without = st.pruning_scores(model, "synflow")
    given = st.pruning_scores(model, "synflow", input_shape=(4,))
    assert set(without) == {"fc1.weight", "fc2.weight"}
    for name in given:
        assert torch.equal(without[name], given[name])
    # a Flatten before the first Linear: the flat shape is an input of the same scores
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    from_images = st.pruning_scores(flat, "synflow", input_shape=(3, 2, 2))
    inferred = st.pruning_scores(flat, "synflow")
    assert all(torch.equal(inferred[n], from_images[n]) for n in from_images)
    masks = st.prune_at_init(model, "synflow", 0.5, iterations=2)  # no data needed either
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * (4 * 5 + 5 * 3))


def test_synflow_needs_an_input_shape_when_the_first_layer_is_not_linear(model):
    with pytest.raises(ValueError, match=r"cannot read it from this model \(its first layer "
                                         r"with weights, 'conv1', is a Conv2d, not a Linear\): "
                                         r"pass input_shape="):
        st.pruning_scores(model, "synflow")


def test_synflow_says_when_the_shape_read_from_the_first_linear_does_not_fit():
    class HeadFirst(nn.Module):  # registers its Linear before the convolution it runs first
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match=r"read the input shape \(4,\) from the first Linear "
                                         r"layer 'head'.*pass input_shape="):
        st.pruning_scores(HeadFirst(), "synflow")
    assert set(st.pruning_scores(HeadFirst(), "synflow", input_shape=(1, 5, 5))) == {
        "head.weight", "conv.weight"}


def test_non_finite_scores_name_the_layer(model):
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="'fc1.weight'.*NaN"):
        st.pruning_scores(model, "magnitude")


def test_grasp_bad_temperature(model):
    with pytest.raises(ValueError, match="temperature"):
        st.pruning_scores(model, "grasp", batches(1), temperature=0)


def test_model_with_nothing_to_prune():
    with pytest.raises(ValueError, match="no weight"):
        st.pruning_scores(nn.Sequential(nn.ReLU()), "magnitude")
