"""Sorted position sets against Python's set operations, with the compiled kernels and with
torch's operations (the ``kernels`` fixture), and the two against each other."""

import pytest
import torch

import sparsetrain.kernels as kernels_module
from sparsetrain.sparsity.positions import (check_positions, contains, mask_of, match_sorted,
                                            merge_sorted, positions_of, union_sorted)


def test_set_operations_match_python_sets(kernels):
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
    assert contains(torch.tensor([1, 4]), torch.tensor([[4, 0], [1, 5]])).tolist() == [
        [True, False], [True, False]]


def set_pairs():
    """Pairs of sorted sets of distinct positions, large enough for the kernels' threads: empty,
    disjoint, interleaved, nested, equal, one after the other, random overlaps."""
    g = torch.Generator().manual_seed(1)

    def draw(n, high):
        return torch.unique(torch.randint(0, high, (n,), generator=g))

    big, empty = draw(90_000, 400_000), torch.empty(0, dtype=torch.int64)
    evens = torch.arange(0, 200_000, 2)
    yield big, empty
    yield empty, big
    yield empty, empty
    yield evens, evens + 1
    yield evens, evens[::3].clone()
    yield big, big.clone()
    yield evens, evens + 200_000
    yield evens + 200_000, evens
    yield big[:5], big
    for n, m in ((70_000, 60_000), (100_000, 3_000), (2_000, 100_000), (50, 40)):
        yield draw(n, 300_000), draw(m, 300_000)


def test_linear_set_operations_match_python_sets(kernels):
    for a, b in set_pairs():
        index = {v: i for i, v in enumerate(a.tolist())}
        listed = b.tolist()
        assert contains(a, b).tolist() == [v in index for v in listed]
        where, missing = match_sorted(a, b)
        assert where.tolist() == [index.get(v, -1) for v in listed]
        assert missing.tolist() == [v for v in listed if v not in index]
        union = union_sorted(a, b)
        assert union.tolist() == sorted(set(index) | set(listed))
        merged, a_at, b_at = merge_sorted(a, missing)
        assert torch.equal(merged, union)
        assert torch.equal(merged[a_at], a) and torch.equal(merged[b_at], missing)


def test_compiled_kernels_give_what_torch_gives(monkeypatch):
    kernels = kernels_module.compiled_kernels()
    if kernels is None:
        pytest.skip("the compiled kernels cannot be built here")
    g = torch.Generator().manual_seed(2)
    for a, b in set_pairs():
        queries = torch.randint(-3, 400_005, (50_000,), generator=g)  # any order, repeats
        def results():  # merge_sorted(a, b) with overlaps: an equal b goes first
            return [contains(a, b), contains(a, queries), *match_sorted(a, b),
                    union_sorted(a, b), *merge_sorted(a, b[~contains(a, b)]),
                    *merge_sorted(a, b)]

        compiled = results()
        with monkeypatch.context() as m:
            m.setattr(kernels_module, "_KERNELS", False)
            fallback = results()
        assert all(torch.equal(x, y) for x, y in zip(compiled, fallback))
        values = torch.randn(a.numel(), generator=g, dtype=torch.float64)
        where = match_sorted(a, b)[0]
        expected = torch.where(where >= 0, values[where.clamp(min=0)] if a.numel() else 0.0,
                               torch.zeros((), dtype=torch.float64))
        assert torch.equal(kernels.gather_or_zero(values, where), expected)


def test_masks_and_positions_convert_both_ways():
    mask = torch.rand(5, 3, 2) < 0.4
    positions = positions_of(mask)
    assert torch.equal(mask_of(positions, mask.shape), mask)
    assert torch.equal(check_positions(positions, 30, "p"), positions)
    for bad in (torch.tensor([3, 1]), torch.tensor([0, 30]), torch.tensor([1.0]),
                torch.tensor([[1]])):
        with pytest.raises(ValueError, match="p must"):
            check_positions(bad, 30, "p")
