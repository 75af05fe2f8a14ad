import torch

from sparsetrain.sparsity.selection import drop_and_grow, random_mask, top_k_mask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_top_k_mask_picks_the_largest():
    scores = torch.tensor([0.1, 5.0, -2.0, 3.0, 0.0])
    assert top_k_mask(scores, 2, gen()).tolist() == [False, True, False, True, False]
    assert not top_k_mask(scores, 0, gen()).any()


def test_ties_are_broken_at_random_but_reproducibly():
    scores = torch.zeros(1000)
    a, b, c = (top_k_mask(scores, 100, gen(s)) for s in (1, 1, 2))
    assert int(a.sum()) == 100
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # uniform: each half gets about half of the picks
    assert 30 < int(a[:500].sum()) < 70


def test_random_mask_has_exact_count():
    m = random_mask(torch.Size([7, 9]), 20, gen(), torch.device("cpu"))
    assert m.shape == (7, 9) and m.dtype == torch.bool and int(m.sum()) == 20


def test_drop_and_grow_reference():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    weights = torch.tensor([0.5, -0.1, 0.9, 0.2, 0, 0, 0, 0])
    grow = torch.tensor([9.0, 9.0, 9.0, 9.0, 1.0, 4.0, 3.0, 2.0])
    new = drop_and_grow(mask, weights.abs(), grow, 2, gen())
    # drops |w| = 0.1 and 0.2 (positions 1, 3); grow among positions not kept: 1 and 3 score 9
    assert new.tolist() == [True, True, True, True, False, False, False, False]
    new = drop_and_grow(mask, weights.abs(), grow, 2, gen(), allow_regrowth=False)
    assert new.tolist() == [True, False, True, False, False, True, True, False]
    assert int(new.sum()) == 4


def test_drop_and_grow_clamps_to_what_is_possible():
    mask = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    new = drop_and_grow(mask, torch.rand(4), torch.rand(4), 3, gen(), allow_regrowth=False)
    assert int(new.sum()) == 3 and bool(new[3])
