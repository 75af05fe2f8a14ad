"""CH3-L3 link prediction (sparsity/link_prediction.py) against a slow reference that follows the
definition: every path of length 3 enumerated on the graph, the local community as the set of
their intermediate nodes, external degrees counted link by link; compiled and torch alike."""

import math

import pytest
import torch

import sparsetrain.kernels as kernels_module
from sparsetrain.sparsity import link_prediction as lp


def neighbours(mask: torch.Tensor):
    """Adjacency lists of the bipartite graph of a (rows, cols) bool mask: rows are nodes
    0..rows-1, columns rows..rows+cols-1."""
    rows, cols = mask.shape
    adj = [set() for _ in range(rows + cols)]
    for r, c in mask.nonzero().tolist():
        adj[r].add(rows + c)
        adj[rows + c].add(r)
    return adj


def reference_terms(mask: torch.Tensor, r: int, c: int) -> list[float]:
    """The CH3-L3 terms of the unlinked pair (r, c), by definition."""
    rows = mask.shape[0]
    adj = neighbours(mask)
    u, v = r, rows + c
    paths = [(a, b) for a in adj[u] for b in adj[a]
             if b not in (u, v) and a != v and v in adj[b]]
    community = {z for path in paths for z in path}
    terms = []
    for path in paths:
        external = [sum(1 for n in adj[z] if n not in community and n not in (u, v))
                    for z in path]
        terms.append(1.0 / math.sqrt((1 + external[0]) * (1 + external[1])))
    return terms


def reference(mask: torch.Tensor) -> torch.Tensor:
    """CH3-L3 of every unlinked pair (0 at the links), each a correctly rounded sum."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            if not mask[r, c]:
                out[r, c] = math.fsum(reference_terms(mask, r, c))
    return out


def positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def random_mask(seed: int, rows: int, cols: int, density: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


def test_a_hand_computed_score(kernels):
    # rows 0, 1, 2; columns 0, 1, 2. For the pair (row 1, col 0) the one path is
    # row1 - col1 - row0 - col0; its community is {col1, row0}; row0's links go to col0 (an end)
    # and col1 (inside): de = 0; col1's go to row0 (inside), row1 (an end) and row2: de = 1.
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    scores = lp.ch3_l3(positions(mask), (3, 3))
    assert scores[1, 0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert scores[1, 2] == pytest.approx(1 / math.sqrt(2), rel=1e-12)  # row1-col1-row2-col2
    # row0 - col1 - row2 - col2: row2's links go to col1 (inside) and col2 (an end), de = 0;
    # col1's to row0 (an end), row2 (inside) and row1: de = 1
    assert scores[0, 2] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert scores[2, 0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert scores[1, 0] == scores[1, 2] == scores[0, 2]  # the same factors: an exact tie
    assert bool((scores[mask] == 0).all())
    torch.testing.assert_close(scores, reference(mask), rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(12))
def test_scores_match_the_definition(kernels, seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows, cols = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
    mask = random_mask(seed, rows, cols, 0.15 + 0.7 * float(torch.rand(1, generator=g)))
    torch.testing.assert_close(lp.ch3_l3(positions(mask), (rows, cols)), reference(mask),
                               rtol=1e-12, atol=1e-15)


def test_a_convolution_is_its_matrix_view(kernels):
    mask = random_mask(3, 4, 2 * 3 * 3, 0.3)
    conv = lp.ch3_l3(positions(mask), (4, 2, 3, 3))
    torch.testing.assert_close(conv, reference(mask), rtol=1e-12, atol=1e-15)


def rotation_mask(n: int) -> torch.Tensor:
    """Row i linked to columns i and i + 1 (mod n): rotating rows and columns together maps the
    graph onto itself, so pairs (i, i + k) have equal scores for each k."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, i] = mask[i, (i + 1) % n] = True
    mask[0, 3] = mask[2, 5] = mask[4, 1] = True  # keeps a rotation by 2 only
    return mask


def test_ties_agree_with_the_reference(kernels):
    mask = rotation_mask(6)
    pos = positions(mask)
    graph = lp.bipartite_graph(pos, (6, 6))
    g, _ = lp.score_table(graph)
    free = (~mask).reshape(-1).nonzero().squeeze(1)
    fast = lp.ch3_l3_pairs(graph, free, lp.common_columns(graph), g).tolist()
    ref = reference(mask).reshape(-1)[free].tolist()
    # equal integers exactly where the reference's correctly rounded sums are equal
    for i in range(len(free)):
        for j in range(len(free)):
            assert (fast[i] == fast[j]) == (ref[i] == ref[j]), (free[i], free[j])
    assert len(set(fast)) < len(fast)  # the symmetry makes ties
    for i in range(0, 36, 1):  # a rotation by 2 rows and 2 columns keeps every score
        r, c = divmod(i, 6)
        j = ((r + 2) % 6) * 6 + (c + 2) % 6
        if not mask.reshape(-1)[i]:
            assert fast[free.tolist().index(i)] == fast[free.tolist().index(j)]


def test_compiled_and_torch_give_the_same_integers(monkeypatch):
    if kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled kernels cannot be built here")
    mask = random_mask(7, 40, 30, 0.2)
    pos = positions(mask)

    def run():
        graph = lp.bipartite_graph(pos, (40, 30))
        g, _ = lp.score_table(graph)
        free = (~mask).reshape(-1).nonzero().squeeze(1)
        wr, wc = lp.l3_weights(graph)
        l3 = torch.cat([b for _, _, b in lp.l3_rows(graph, wr, wc, 7)])
        return lp.common_columns(graph), lp.ch3_l3_pairs(graph, free, lp.common_columns(graph),
                                                         g), l3

    compiled = run()
    monkeypatch.setattr(kernels_module, "_KERNELS", False)
    for a, b in zip(compiled, run()):
        assert torch.equal(a, b)


def test_paths_common_columns_and_the_l3_index(kernels):
    mask = random_mask(5, 9, 7, 0.4)
    pos = positions(mask)
    graph = lp.bipartite_graph(pos, mask.shape)
    a = mask.double()
    torch.testing.assert_close(lp.common_columns(graph).double(), a.T @ a)
    adj = neighbours(mask)
    rows = mask.shape[0]
    paths = sum(1 for r in range(rows) for c in range(mask.shape[1]) if not mask[r, c]
                for z2 in adj[r] for z1 in adj[z2] if z1 != r and rows + c in adj[z1])
    links = [(r, c) for r, c in mask.nonzero().tolist()]
    assert lp.l3_paths(graph) == sum((len(adj[r]) - 1) * (len(adj[rows + c]) - 1)
                                     for r, c in links)
    assert lp.l3_paths(graph) >= paths  # counted through the middle links, at links too
    wr, wc = lp.l3_weights(graph)
    l3 = torch.cat([b for _, _, b in lp.l3_rows(graph, wr, wc, 4)])
    expected = (a * wc.double()) @ a.T @ (a * wr.double()[:, None])
    assert torch.equal(l3, expected.round().long())
    deg_r, deg_c = a.sum(1), a.sum(0)
    scale = float(wr[deg_r.argmax()]) * math.sqrt(float(deg_r.max()))
    approx = (a / deg_c.clamp(min=1).sqrt()) @ a.T @ (a / deg_r.clamp(min=1).sqrt()[:, None])
    torch.testing.assert_close(l3.double() / scale ** 2, approx, rtol=1e-4, atol=1e-4)


def test_scores_are_exact_in_float64_and_scaled():
    mask = random_mask(11, 30, 30, 0.5)
    graph = lp.bipartite_graph(positions(mask), mask.shape)
    g, scale = lp.score_table(graph)
    assert scale == 2.0 ** round(math.log2(scale)) and int(g[1]) == scale
    deg = mask.sum(1).max() * mask.sum(0).max()
    assert int(g.max()) * int(deg) < 2 ** 53


def test_graphs_without_paths_and_empty_graphs(kernels):
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(lp.ch3_l3(positions(mask), (3, 4)), torch.zeros(3, 4, dtype=torch.float64))
    mask[1, 2] = True
    assert torch.equal(lp.ch3_l3(positions(mask), (3, 4)), torch.zeros(3, 4, dtype=torch.float64))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        lp.bipartite_graph(torch.tensor([0, 1]), (5,))
