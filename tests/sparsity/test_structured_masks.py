"""Random initial active sets within a structure, against the obvious rule: in every row or
group the positions first in the layer's random order; blocks first in the blocks' order."""

import math

import pytest
import torch

from sparsetrain.sparsity.groups import group_counts, group_of, group_positions, n_groups
from sparsetrain.sparsity.masks import structured_initial_positions
from sparsetrain.sparsity.permutation import INIT, RandomOrder
from sparsetrain.sparsity.structure import parse_structure


def reference(structure, shape, count, seed, layer):
    s = parse_structure(structure)
    if s.kind == "block":
        order = RandomOrder(n_groups(s, shape), seed, INIT, layer)
        ranks = order.rank(torch.arange(n_groups(s, shape)))
        blocks = sorted(range(n_groups(s, shape)), key=lambda b: int(ranks[b]))
        first = sorted(blocks[:count // (s.rows * s.cols)])
        return group_positions(s, shape, torch.tensor(first))
    order = RandomOrder(math.prod(shape), seed, INIT, layer)
    ranks = order.rank(torch.arange(math.prod(shape)))
    groups = group_of(s, shape, torch.arange(math.prod(shape)))
    k = count // n_groups(s, shape)
    chosen = []
    for g in range(n_groups(s, shape)):
        members = (groups == g).nonzero().squeeze(1).tolist()
        members.sort(key=lambda p: int(ranks[p]))
        chosen += members[:k]
    return torch.tensor(sorted(chosen))


@pytest.mark.parametrize("structure,shape,count", [
    ("fan-in", (12, 40), 12 * 7), ("fan-in", (6, 3, 2, 2), 6 * 5), ("2:4", (8, 16), 64),
    ("1:4", (4, 8, 3, 3), 72), ("block:2x4", (8, 16), 48), ("block:4x1", (8, 2, 3, 3), 48)])
def test_structured_initial_sets_follow_the_random_order(structure, shape, count):
    got = structured_initial_positions(parse_structure(structure), shape, count, 7, 3)
    assert torch.equal(got, reference(structure, shape, count, 7, 3))
    counts = group_counts(parse_structure(structure), shape, got)
    assert got.numel() == count and int(counts.max()) == int(counts[counts > 0].min())


def test_a_count_the_structure_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        structured_initial_positions(parse_structure("fan-in"), (4, 8), 10, 0, 0)
