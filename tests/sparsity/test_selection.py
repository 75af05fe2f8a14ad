"""Selection against a slow, obviously-correct reference: a full sort by (score, tie key)."""

import math

import pytest
import torch

import sparsetrain.kernels as kernels_module
from sparsetrain.sparsity.permutation import RandomOrder
from sparsetrain.sparsity.selection import (RunningTopK, first_free, order_keys, sampled_bound,
                                            select_global, top_k, top_k_mask)


def reference_top_k(scores, k, keys):
    """Sort every entry by (score descending, key ascending) and take the first k."""
    flat = scores.reshape(-1).tolist()
    key = keys(torch.arange(len(flat))).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], key[i]))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


@pytest.mark.parametrize("n,k,levels", [(10, 3, 3), (1000, 1, 5), (1000, 999, 2), (5000, 700, 0),
                                        (700_000, 90_000, 50), (700_000, 650_000, 4),
                                        (700_000, 500_000, 0), (700_000, 150_000, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_top_k_matches_the_full_sort(n, k, levels, dtype, kernels):
    g = torch.Generator().manual_seed(n + k)
    scores = (torch.randint(0, levels, (n,), generator=g).float() if levels
              else torch.randn(n, generator=g))  # levels: many ties
    scores = (scores * 1000).to(dtype) if dtype == torch.int64 else scores.to(dtype)
    keys = order_keys(RandomOrder(n, 7))
    got = top_k(scores, k, keys)
    if n <= 5000:
        assert torch.equal(got, reference_top_k(scores, k, keys))
    else:  # the reference is too slow in Python: check the defining property instead
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[got] = True
        assert got.numel() == k and torch.equal(got, torch.sort(got).values)
        worst_in, best_out = scores[chosen].min(), scores[~chosen].max()
        assert worst_in >= best_out
        tied_in = chosen & (scores == worst_in)
        tied_out = ~chosen & (scores == worst_in)
        if tied_out.any():
            assert keys(tied_in.nonzero().squeeze(1)).max() < keys(
                tied_out.nonzero().squeeze(1)).min()


def test_top_k_with_and_without_the_compiled_kernels_is_the_same(monkeypatch):
    """Also for int64 scores that float64 cannot tell apart (beyond 2^53)."""
    if kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled kernels cannot be built here")
    g = torch.Generator().manual_seed(3)
    n = 600_000
    huge = (1 << 60) + torch.randint(0, 4096, (n,), generator=g)  # 256 a float64
    cases = [(huge, 1000), (huge, 590_000), (torch.randn(n, generator=g), 400_000),
             (torch.randint(0, 3, (n,), generator=g).double(), 200_000)]
    keys = order_keys(RandomOrder(n, 4))
    compiled = [top_k(scores, k, keys) for scores, k in cases]
    monkeypatch.setattr(kernels_module, "_KERNELS", False)
    for (scores, k), got in zip(cases, compiled):
        expected = top_k(scores, k, keys)
        assert torch.equal(got, expected) and got.numel() == k
    top = top_k(huge[:20], 5, keys)  # small: against the full sort
    assert torch.equal(top, reference_top_k(huge[:20], 5, keys))


def test_compiled_kth_largest_is_torchs_kthvalue():
    """Radix selection against ``kthvalue``: ties, zeros of both signs, infinities, subnormals,
    sizes for one thread and for several; an empty answer where a score is NaN."""
    kernels = kernels_module.compiled_kernels()
    if kernels is None:
        pytest.skip("the compiled kernels cannot be built here")
    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 3000, 100_000):
        signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        wide = torch.randn(n, generator=g)
        for x in (wide, wide * 1e-40, torch.randint(-3, 4, (n,), generator=g) * signs,
                  torch.where(torch.rand(n, generator=g) < 0.2, -math.inf, wide.abs()),
                  torch.where(torch.rand(n, generator=g) < 0.2, math.inf, wide),
                  torch.full((n,), 2.5)):
            for dtype in (torch.float32, torch.float64):
                x = x.to(dtype)
                for k in sorted({1, n, (n + 1) // 2, n // 3 + 1}):
                    got = kernels.kth_largest(x, k)
                    assert got.dtype == dtype and got.dim() == 0
                    assert got == torch.kthvalue(x, n - k + 1).values
    x = torch.randn(1000, generator=g)
    x[5] = math.nan
    assert kernels.kth_largest(x, 3).numel() == 0


def test_top_k_edge_cases_and_half_types():
    keys = order_keys(RandomOrder(5, 0))
    scores = torch.tensor([0.1, 5.0, -2.0, 3.0, 0.0])
    assert top_k_mask(scores, 2, keys).tolist() == [False, True, False, True, False]
    assert top_k(scores, 0, keys).numel() == 0
    assert top_k(scores, 9, keys).tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(top_k(scores.bfloat16(), 2, keys), top_k(scores, 2, keys))
    assert top_k(torch.tensor([1.0, -math.inf, 2.0]), 2, order_keys(RandomOrder(3, 0))).tolist() \
        == [0, 2]


def test_ties_are_random_reproducible_and_uniform():
    scores = torch.zeros(1000)
    a, b, c = (top_k_mask(scores, 100, order_keys(RandomOrder(1000, s))) for s in (1, 1, 2))
    assert int(a.sum()) == 100 and torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.zeros(1000)
    for s in range(300):
        counts += top_k_mask(scores, 100, order_keys(RandomOrder(1000, s))).float()
    # each position is picked Binomial(300, 0.1) times: mean 30, variance 27
    chi2 = float(((counts - 30) ** 2 / 27).sum())
    assert 850 < chi2 < 1150 and 8 < counts.min() and counts.max() < 55


def test_sampled_bounds_of_the_kth_largest_and_smallest():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2_000_000, generator=g)
    skip = torch.sort(torch.randperm(2_000_000, generator=g)[:200_000]).values
    keep = torch.ones(2_000_000, dtype=torch.bool)
    keep[skip] = False
    for k in (1, 100, 50_000, 1_000_000):
        for closed in (None, skip):
            eligible = scores if closed is None else scores[keep]
            for top in (True, False):
                t = sampled_bound(scores, k, closed, top=top)
                beyond = int((eligible >= t).sum() if top else (eligible <= t).sum())
                assert beyond >= k
                if k <= 50_000:  # a useful bound: not many more than k go on
                    assert beyond < 3 * k + 5000


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_running_top_k_over_blocks_equals_top_k(block):
    g = torch.Generator().manual_seed(block)
    n, k = 3000, 250
    scores = torch.randint(0, 20, (n,), generator=g).float()
    closed = torch.sort(torch.randperm(n, generator=g)[:400]).values
    order = RandomOrder(n, 3)
    running = RunningTopK(k, order.rank)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        inside = closed[(closed >= lo) & (closed < hi)] - lo
        running.offer(scores[lo:hi], lo, inside)
    open_ = torch.ones(n, dtype=torch.bool)
    open_[closed] = False
    candidates = open_.nonzero().squeeze(1)
    expected = candidates[top_k(scores[candidates], k, order_keys(order, candidates))]
    assert torch.equal(running.result(), expected)


def test_first_free_is_uniform_and_avoids_the_closed():
    closed = torch.tensor([0, 5, 6, 99])
    counts = torch.zeros(100)
    for s in range(400):
        pos = first_free(RandomOrder(100, s), 10, closed)
        assert pos.numel() == 10 and torch.equal(pos, torch.unique(pos))
        assert not torch.isin(pos, closed).any()
        counts[pos] += 1
    assert counts[closed].sum() == 0
    free = counts[~torch.isin(torch.arange(100), closed)]
    expected = 400 * 10 / 96
    assert ((free - expected).abs() < 5 * math.sqrt(expected)).all()
    assert first_free(RandomOrder(100, 0), 96, closed).numel() == 96  # every free position
    with pytest.raises(ValueError, match="cannot choose"):
        first_free(RandomOrder(10, 0), 8, torch.arange(3))


def test_first_free_is_the_top_k_of_minus_rank():
    """Listing the order equals selecting by the score ``-rank`` (the two paths of SET)."""
    order = RandomOrder(5000, 11)
    closed = torch.sort(torch.randperm(5000)[:3000]).values
    open_ = torch.ones(5000, dtype=torch.bool)
    open_[closed] = False
    candidates = open_.nonzero().squeeze(1)
    by_score = candidates[top_k(-order.rank(candidates), 300, order_keys(order, candidates))]
    assert torch.equal(first_free(order, 300, closed), by_score)


def test_select_global_keeps_every_layer_connected():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0]), "b": torch.tensor([0.1, 0.2])}
    with pytest.warns(RuntimeWarning, match="leave no weight"):  # "b" would be left empty
        masks = select_global(scores, 3, 0)
    assert masks["a"].tolist() == [True, True, False] and masks["b"].tolist() == [False, True]
    masks = select_global(scores, 4, 0)
    assert masks["a"].all() and masks["b"].tolist() == [False, True]
    tied = {"a": torch.zeros(50), "b": torch.zeros(50)}
    a, b = select_global(tied, 50, 1), select_global(tied, 50, 1)
    assert torch.equal(a["a"], b["a"]) and 10 < int(a["a"].sum()) < 40  # random, reproducible


def test_running_top_k_with_a_guessed_bound_is_exact_or_says_it_is_not():
    g = torch.Generator().manual_seed(0)
    n = 600_000
    keys = RandomOrder(2 * n, 5).rank
    even = [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2)]
    # a first block far above the second: the bound guessed from it is too high
    skewed = [torch.rand(n, generator=g, dtype=torch.float64) + 10, even[1]]
    for blocks, k, holds in ((even, 50_000, True), (skewed, 500_000, False)):
        expected = top_k(torch.cat(blocks), k, keys)
        running = RunningTopK(k, keys, total=2 * n)
        for i, block in enumerate(blocks):
            running.offer(block, i * n, torch.empty(0, dtype=torch.int64))
        assert running.complete() == holds
        if holds:
            assert running.guess > -math.inf  # the guess was used
            assert torch.equal(running.result(), expected)
        plain = RunningTopK(k, keys)
        for i, block in enumerate(blocks):
            plain.offer(block, i * n, torch.empty(0, dtype=torch.int64))
        assert plain.complete() and torch.equal(plain.result(), expected)
