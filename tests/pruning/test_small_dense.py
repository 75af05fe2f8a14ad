"""small_dense_width and the parameter counts it matches: closed-form MLP widths, errors."""

import pytest
import torch
from torch import nn

from sparsetrain.methods import Static
from sparsetrain.pruning.lottery import LotteryTicket
from sparsetrain.pruning.small_dense import (
    SmallDenseWidth,
    dense_param_count,
    small_dense_width,
    sparse_param_count,
)

IN, OUT, BASE = 20, 10, 64


def hidden(width):
    return max(1, round(BASE * width))


def mlp(width):
    """20 -> h -> 10 with h = round(64 * width): 30 h sparsifiable weights, 31 h + 10 in all."""
    h = hidden(width)
    return nn.Sequential(nn.Linear(IN, h), nn.ReLU(), nn.Linear(h, OUT))


def closest_hidden(target, per_unit, offset=0, h_max=BASE):
    """Brute force: the hidden size whose count is nearest to target (the smaller on a tie)."""
    return min(range(1, h_max + 1), key=lambda h: (abs(per_unit * h + offset - target), h))


def test_dense_param_count_is_known_in_closed_form():
    assert dense_param_count(mlp(0.5)) == 30 * 32
    assert dense_param_count(mlp(0.5), count="all") == 31 * 32 + 10


@pytest.mark.parametrize("h", [1, 2, 17, 37, 63, 64])
def test_an_exact_target_gives_its_width(h):
    found = small_dense_width(mlp, 30 * h)
    assert found == SmallDenseWidth(width=found.width, params=30 * h, target=30 * h)
    assert hidden(found.width) == h
    assert 0.01 <= found.width <= 1.0


def test_targets_between_counts_get_the_closest_one():
    assert small_dense_width(mlp, 30 * 37 + 14).params == 30 * 37
    assert small_dense_width(mlp, 30 * 37 + 16).params == 30 * 38
    assert small_dense_width(mlp, 30 * 37 + 15).params == 30 * 37  # tie: the smaller count
    for target in range(30, 30 * BASE + 1, 41):
        found = small_dense_width(mlp, target)
        h = closest_hidden(target, 30)
        assert (found.params, hidden(found.width)) == (30 * h, h), target


def test_count_all_counts_biases_too():
    for target in [41, 31 * 37 + 10, 31 * 37 + 25, 31 * 64 + 10]:
        found = small_dense_width(mlp, target, count="all")
        h = closest_hidden(target, 31, offset=10)
        assert found.params == 31 * h + 10 and hidden(found.width) == h


def test_a_wider_range_reaches_larger_targets():
    found = small_dense_width(mlp, 30 * 100, high=2.0)
    assert hidden(found.width) == 100 and found.params == 3000


def test_matches_the_non_zeros_of_a_sparse_model():
    torch.manual_seed(0)
    model = mlp(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Static(model, opt, density=0.25, distribution="uniform", total_steps=10)
    target = sparse_param_count(model, sparsifier)
    assert target == round(0.25 * IN * BASE) + round(0.25 * BASE * OUT)
    found = small_dense_width(mlp, target)
    assert found.params == 30 * closest_hidden(target, 30) and found.target == target


@pytest.mark.parametrize("target", [29, 30 * BASE + 1, 10**9])
def test_unreachable_targets_raise(target):
    with pytest.raises(ValueError, match="not reachable"):
        small_dense_width(mlp, target)


def test_a_factory_whose_count_falls_is_detected():
    with pytest.raises(ValueError, match="must not decrease"):
        small_dense_width(lambda w: mlp(1.01 - w), 30 * 20)

    def hump(width):  # grows to 50 hidden units at width 0.5, then shrinks to 40 at width 1
        h = round(100 * width) if width <= 0.5 else 50 - round(20 * (width - 0.5))
        return nn.Sequential(nn.Linear(IN, max(1, h)), nn.ReLU(), nn.Linear(max(1, h), OUT))

    with pytest.raises(ValueError, match="must not decrease"):
        small_dense_width(hump, 30 * 30)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_params": 0}, "target_params"),
        ({"target_params": -5}, "target_params"),
        ({"target_params": 100.0}, "target_params"),
        ({"target_params": True}, "target_params"),
        ({"target_params": 300, "count": "weights"}, "count"),
        ({"target_params": 300, "low": 0.0}, "low"),
        ({"target_params": 300, "high": float("inf")}, "high"),
        ({"target_params": 300, "low": 1.0, "high": 0.5}, "below high"),
        ({"target_params": 300, "tolerance": 0}, "tolerance"),
        ({"target_params": 300, "max_evaluations": 1}, "max_evaluations"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_dense_width(mlp, **kwargs)


def test_bad_factories():
    with pytest.raises(ValueError, match="callable"):
        small_dense_width("mlp", 300)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        small_dense_width(lambda w: 3, 300)


def test_max_evaluations_bounds_the_work():
    built = []

    def counting(width):
        built.append(width)
        return mlp(width)

    found = small_dense_width(counting, 30 * 37 + 7, max_evaluations=5)
    assert len(built) == 5
    assert found.params in {30 * hidden(w) for w in built}


# --- sparse_param_count ----------------------------------------------------------------------

def test_sparse_param_count_from_masks_sparsifiers_and_tickets():
    torch.manual_seed(0)
    model = mlp(1.0)
    assert sparse_param_count(model) == 30 * BASE
    assert sparse_param_count(model, count="all") == 31 * BASE + 10
    masks = {"0.weight": torch.zeros(BASE, IN, dtype=torch.bool)}
    masks["0.weight"][0, :5] = True
    assert sparse_param_count(model, masks) == 5 + BASE * OUT  # "2.weight" has no mask: dense
    assert sparse_param_count(model, masks, count="all") == 5 + BASE * OUT + BASE + OUT
    as_numbers = {"0.weight": masks["0.weight"].float()}
    assert sparse_param_count(model, as_numbers) == 5 + BASE * OUT

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Static(model, opt, density=0.1, distribution="uniform", total_steps=10,
                        dense_layers=["2"])
    assert sparse_param_count(model, sparsifier) == round(0.1 * BASE * IN) + BASE * OUT

    ticket = LotteryTicket(mlp(1.0), rounds=1, prune_fraction=0.5)
    ticket.end_round()
    assert sparse_param_count(ticket.model, ticket) == round(0.5 * 30 * BASE)


def test_shared_weights_count_once():
    embedding = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    assert dense_param_count(model) == 400
    assert dense_param_count(model, count="all") == 400


def test_sparse_param_count_errors():
    model = mlp(1.0)
    with pytest.raises(ValueError, match="not a sparsifiable weight"):
        sparse_param_count(model, {"0.bias": torch.ones(BASE, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        sparse_param_count(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks must be"):
        sparse_param_count(model, [1, 2])
    with pytest.raises(ValueError, match="count"):
        sparse_param_count(model, None, count="nonzero")
    with pytest.raises(ValueError, match="model"):
        dense_param_count("model")
