"""The counter-based random orders: bijections, inverses, uniform, reproducible."""

import pytest
import torch

from sparsetrain.sparsity.permutation import RandomOrder, mix32


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 17, 1000, 4097, 65536, 100_003])
def test_a_random_order_is_a_permutation_with_its_inverse(numel):
    order = RandomOrder(numel, 0, 1, 2)
    ranks = torch.arange(numel)
    positions = order.position(ranks)
    assert torch.equal(torch.sort(positions).values, ranks)
    assert torch.equal(order.rank(positions), ranks)


def test_orders_depend_on_every_word_and_only_on_them():
    a = RandomOrder(1000, 5, 1, 2, 3).first(50)
    assert torch.equal(a, RandomOrder(1000, 5, 1, 2, 3).first(50))
    for words in [(6, 1, 2, 3), (5, 2, 2, 3), (5, 1, 3, 3), (5, 1, 2, 4), (-5, 1, 2, 3)]:
        assert not torch.equal(a, RandomOrder(1000, *words).first(50))


def test_first_positions_are_a_uniform_subset():
    counts = torch.zeros(100)
    pairs = torch.zeros(10, 10)
    for s in range(4000):
        first = RandomOrder(100, s).first(10)
        counts[first] += 1
        low = first[first < 10]
        pairs[low.unsqueeze(1), low.unsqueeze(0)] += 1
    # each position is in Binomial(4000, 0.1) subsets: mean 400, variance 360
    chi2 = float(((counts - 400) ** 2 / 360).sum())
    assert 50 < chi2 < 160
    # and pairs of positions come together as often as independence gives (400 * 9 / 99)
    off = pairs[~torch.eye(10, dtype=torch.bool)]
    assert (off - 4000 * 0.1 * 9 / 99).abs().max() < 20


def test_large_layers_and_devices():
    order = RandomOrder(10**10, 1)
    ranks = torch.tensor([0, 1, 2, 10**10 - 1])
    positions = order.position(ranks)
    assert ((positions >= 0) & (positions < 10**10)).all()
    assert torch.equal(order.rank(positions), ranks)
    with pytest.raises(ValueError, match="1 to 2"):
        RandomOrder(0)
    if torch.cuda.is_available():
        assert torch.equal(order.position(ranks.cuda()).cpu(), positions)


def test_the_mixer_is_a_32_bit_bijection_computed_without_overflow():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537 + 12345
    y = mix32(x & 0xFFFFFFFF)
    assert ((y >= 0) & (y < 1 << 32)).all() and torch.unique(y).numel() == x.numel()
    assert int(mix32(torch.tensor([0xFFFFFFFF]))) == _python_mix32(0xFFFFFFFF)


def _python_mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)
