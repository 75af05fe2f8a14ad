"""Pruning at initialisation within a structure: the masks hold the structure exactly, keep
the best-scored weights within it, and a structure that does not fit is refused."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.pruning.prune import mask_density
from sparsetrain.sparsity.permutation import PRUNE, RandomOrder
from sparsetrain.sparsity.selection import order_keys
from sparsetrain.sparsity.structure import count_for, parse_structure, structured_top_k


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))]


@pytest.mark.parametrize("method", ["magnitude", "snip", "synflow"])
def test_two_four_keeps_two_of_every_four_inputs(method):
    masks = st.prune_at_init(mlp(), method, 0.5, batches(), structure="2:4")
    for mask in masks.values():
        assert (mask.view(mask.shape[0], -1, 4).sum(2) == 2).all()
    assert mask_density(masks) == 0.5


def test_fan_in_and_blocks_hold_their_structure():
    masks = st.prune_at_init(mlp(), "snip", 0.25, batches(), structure="fan-in")
    for mask in masks.values():
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] >= 1
    masks = st.prune_at_init(mlp(), "magnitude", 0.25, scope="layer", structure="block:4x4")
    for mask in masks.values():
        rows, cols = mask.shape
        per_block = mask.view(rows // 4, 4, cols // 4, 4).sum((1, 3))
        assert ((per_block == 0) | (per_block == 16)).all() and per_block.sum() > 0


def test_the_structured_masks_are_the_best_scored_within_the_structure():
    model = mlp()
    masks = st.prune_at_init(model, "magnitude", 0.25, scope="layer", structure="fan-in")
    s = parse_structure("fan-in")
    for i, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if "weight" in n):
        score = p.detach().abs().double()
        unstructured = st.sparsity.masks.active_count(p.numel(), 0.25)
        count = count_for(s, tuple(p.shape), unstructured)
        keys = order_keys(RandomOrder(p.numel(), PRUNE, 0, 1, i))
        expected = torch.zeros(p.numel(), dtype=torch.bool)
        expected[structured_top_k(s, score, count, keys)] = True
        assert torch.equal(masks[name].view(-1), expected), name


def test_structures_that_do_not_fit_are_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"0\.weight: 2:4 keeps density 0.5, not 0.1"):
        st.prune_at_init(mlp(), "magnitude", 0.1, structure="2:4")
    with pytest.raises(ValueError, match=r"4\.weight \(4, 8\): block:8x1 does not tile it"):
        st.prune_at_init(mlp(), "magnitude", 0.1, structure="block:8x1")
    with pytest.raises(ValueError, match="unknown structure"):
        st.prune_at_init(mlp(), "magnitude", 0.1, structure="diagonal")
