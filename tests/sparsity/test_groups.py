"""``top_per_group`` against a full sort of every row by (score, key), with the compiled
kernels and with torch's operations (the ``kernels`` fixture)."""

import pytest
import torch

from sparsetrain.sparsity.groups import top_per_group


def reference(scores: torch.Tensor, need: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    for g in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]),
                       key=lambda c: (-float(scores[g, c]), int(keys[g, c])))
        chosen[g, order[:int(need[g])]] = True
    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [None, 3])  # distinct scores, or many ties
@pytest.mark.parametrize("rows,width", [(7, 16), (300, 128)])  # the second: threaded
def test_top_per_group_matches_a_full_sort(rows, width, levels, dtype, kernels):
    gen = torch.Generator().manual_seed(rows + width)
    if levels is None:
        scores = torch.randn(rows, width, generator=gen, dtype=dtype)
    else:
        scores = torch.randint(0, levels, (rows, width), generator=gen).to(dtype)
        scores[scores == 0] = -0.0  # -0 ties with +0
    scores[0, :3] = -torch.inf  # never taken while others are left
    need = torch.randint(0, width - 3 + 1, (rows,), generator=gen)
    need[1] = 0
    need[2] = width - 3
    keys = torch.stack([torch.randperm(width, generator=gen) for _ in range(rows)])
    got = top_per_group(scores, need, lambda r, c: keys[r, c])
    assert torch.equal(got, reference(scores, need, keys))
    assert torch.equal(got.sum(1), need)
    assert not got[0, :3].any()
