"""Sorted position sets against Python's set operations."""

import pytest
import torch

from sparsetrain.sparsity.positions import (check_positions, contains, mask_of, merge_sorted,
                                            positions_of, union_sorted)


def test_set_operations_match_python_sets():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.unique(torch.randint(0, 200, (60,), generator=g))
        b = torch.unique(torch.randint(0, 200, (60,), generator=g))
        q = torch.randint(0, 200, (30,), generator=g)
        assert contains(a, q).tolist() == [int(v) in set(a.tolist()) for v in q]
        assert union_sorted(a, b).tolist() == sorted(set(a.tolist()) | set(b.tolist()))
        only_b = b[~contains(a, b)]
        merged, a_at, b_at = merge_sorted(a, only_b)
        assert merged.tolist() == sorted(set(a.tolist()) | set(only_b.tolist()))
        assert torch.equal(merged[a_at], a) and torch.equal(merged[b_at], only_b)
    assert not contains(torch.empty(0, dtype=torch.int64), torch.tensor([1, 2])).any()


def test_masks_and_positions_convert_both_ways():
    mask = torch.rand(5, 3, 2) < 0.4
    positions = positions_of(mask)
    assert torch.equal(mask_of(positions, mask.shape), mask)
    assert torch.equal(check_positions(positions, 30, "p"), positions)
    for bad in (torch.tensor([3, 1]), torch.tensor([0, 30]), torch.tensor([1.0]),
                torch.tensor([[1]])):
        with pytest.raises(ValueError, match="p must"):
            check_positions(bad, 30, "p")
