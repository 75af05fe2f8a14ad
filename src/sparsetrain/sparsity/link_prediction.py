"""CH3-L3 link prediction on the bipartite graph of a sparse layer (Cannistraci-Hebb theory).

A weight of shape ``(out, ...)`` is seen as its matrix view, ``rows = out`` by
``cols = numel / out`` (a convolution's columns are its (input channel, kernel position)
taps, in the flat order): rows and columns are the two sides of a bipartite graph and the
active weights are its links; flat position ``p`` is the link (``p // cols``, ``p % cols``).

The CH3-L3 score of a pair (row ``r``, column ``c``) that is not linked (Zhang et al., ICLR 2024,
Section 3.2, after Muscoloni et al.'s CH3 model; the authors' code,
biomedical-cybernetics/Cannistraci-Hebb-training, ``CH_scores_mex.c``, model 3 on paths of
length 3) is a sum over the paths of length three ``r - z2 - z1 - c`` (``z2`` a column linked
to ``r``, ``z1`` a row linked to ``z2`` and to ``c``):

    CH3-L3(r, c) = sum over the paths of  1 / sqrt((1 + de(z1)) * (1 + de(z2)))

The pair's local community is the set of the intermediate nodes of all its paths, and
``de(z)``, the external degree of ``z``, counts the links of ``z`` to nodes that are neither in
the local community nor ``r`` or ``c``. In a bipartite graph and for an unlinked pair this is
``1 + de(z1) = deg(z1) - |N(z1) & N(r)|`` (the links of ``z1`` into the community are those to
the columns of ``r``, and one more goes to ``c``) and ``1 + de(z2) = deg(z2) - |N(z2) & N(c)|``.
``ch3_l3_pairs`` computes exactly this, every path once.

Numbers: a term is held as the integer ``round(2**E / sqrt(a * b))`` (``a``, ``b`` the two
factors above; ``score_table``), with ``E`` as large as keeps every sum below ``2**53``, and the
terms are summed as integers. The sums then do not depend on the order of the terms (the
compiled kernels and the torch versions give the same numbers), pairs whose paths have the
same factors tie exactly, and the scores are exact in float64; ``scale = 2**E`` turns them back
into the formula's values (to about ``1e-8`` relative at density 0.05 of a 4096 x 4096 layer).

Cost: one term per path. All the unlinked pairs of a layer have ``l3_paths(graph)`` paths, about
``rows * d**3`` for degree ``d`` (the ``O(N d^3)`` of the papers): 3.5e10 at density 0.05 of a
4096 x 4096 layer. ``l3_rows`` computes a cheaper index of every pair on the same paths, the L3
index of Kovacs et al. (Nature Communications 2019), ``sum 1 / sqrt(deg(z1) deg(z2))`` (CH3 with
the full degrees in place of the external ones), as ``A diag(wc) A^T diag(wr) A`` in
``rows * nnz`` operations, from which a method can choose the candidates worth an exact score.
The common-column counts ``|N(z2) & N(c)|`` are one ``cols x cols`` int32 table
(``common_columns``). The compiled kernels (``backends/csrc/graph_kernels.cpp``) do the work;
without them the torch versions give the same integers, expanding the paths in chunks of
``CHUNK`` (``l3_rows`` and ``common_columns`` then use dense float products of the 0/1 matrix,
exact on integers), much more slowly.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch

from ..kernels import compiled_kernels

#: Entries the torch versions expand at once.
CHUNK = 1 << 21


class Graph(NamedTuple):
    """The bipartite graph of a layer: the CSR structure of its matrix view and that of the
    transpose (int32; the rows of each column in order), and ``t_perm``, the link (CSR) index of
    each entry of the transpose."""

    rows: int
    cols: int
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor


def matrix_view(shape) -> tuple[int, int]:
    """(rows, cols) of the graph of a weight of ``shape``: ``shape[0]`` by the rest."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"the graph of a weight needs 2 or more dimensions, not {shape}")
    return shape[0], math.prod(shape[1:])


def _kernels():
    kernels = compiled_kernels()
    return kernels if kernels is not None and hasattr(kernels, "ch3_l3_pairs") else None


def bipartite_graph(positions: torch.Tensor, shape) -> Graph:
    """The graph of a weight of ``shape`` whose active set is ``positions`` (sorted flat)."""
    from ..backends.csr_ops import row_pointers, transpose  # CSR helpers (counting sort)

    rows, cols = matrix_view(shape)
    if max(rows, cols, positions.numel()) >= 2 ** 31:
        raise ValueError(f"a layer of {rows} x {cols} with {positions.numel()} links is too "
                         "large for the graph's int32 indices")
    positions = positions.to(device="cpu", dtype=torch.int64)
    row = torch.div(positions, cols, rounding_mode="floor")
    crow = row_pointers(row, rows)
    col = (positions - row * cols).to(torch.int32)
    t_crow, t_row, t_perm = transpose(crow, col, cols)
    return Graph(rows, cols, crow, col, t_crow, t_row, t_perm)


def degrees(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(links of every row, links of every column), int64."""
    return ((graph.crow[1:] - graph.crow[:-1]).long(),
            (graph.t_crow[1:] - graph.t_crow[:-1]).long())


def l3_paths(graph: Graph) -> int:
    """Terms of the CH3-L3 scores of all the unlinked pairs: the paths ``r - z2 - z1 - c``
    with ``r != z1`` and ``c != z2``, counted through their middle links (z1, z2)."""
    if graph.col.numel() == 0:
        return 0
    deg_r, deg_c = degrees(graph)
    link_row = torch.repeat_interleave(torch.arange(graph.rows), deg_r)
    return int(((deg_r[link_row] - 1) * (deg_c[graph.col.long()] - 1)).sum())


def _paths_per_pair(graph: Graph) -> int:
    """More than the paths between any row and column (``max deg(r) * max deg(c)``)."""
    deg_r, deg_c = degrees(graph)
    top_r = int(deg_r.max()) if deg_r.numel() else 0
    top_c = int(deg_c.max()) if deg_c.numel() else 0
    return max(1, top_r * top_c)


def score_table(graph: Graph) -> tuple[torch.Tensor, float]:
    """``(g, scale)``: ``g[m] = round(scale / sqrt(m))`` (int64, ``g[0] = 0``) for every product
    ``m`` of the two factors a path can have, and ``scale = 2**E`` with ``E`` (at most 52) as
    large as keeps every score of the graph below ``2**53``."""
    deg_r, deg_c = degrees(graph)
    top_r = int(deg_r.max()) if deg_r.numel() else 0
    top_c = int(deg_c.max()) if deg_c.numel() else 0
    scale = float(2 ** max(1, min(52, 53 - _paths_per_pair(graph).bit_length())))
    m = torch.arange(top_r * top_c + 1, dtype=torch.float64)
    m[0] = 1.0
    g = torch.floor(scale / torch.sqrt(m) + 0.5).to(torch.int64)
    g[0] = 0
    return g, scale


def l3_weights(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """``(wr, wc)``: ``round(2**F / sqrt(deg))`` of every row and every column (int64, 0 for no
    link), with ``F`` as large as keeps every L3 index of the graph below ``2**53``."""
    deg_r, deg_c = degrees(graph)
    scale = float(2 ** max(1, (53 - _paths_per_pair(graph).bit_length()) // 2))

    def weight(deg: torch.Tensor) -> torch.Tensor:
        w = torch.floor(scale / torch.sqrt(deg.clamp(min=1).double()) + 0.5).to(torch.int64)
        return torch.where(deg > 0, w, torch.zeros_like(w))

    return weight(deg_r), weight(deg_c)


def common_columns(graph: Graph) -> torch.Tensor:
    """``cc[a, b]``: the rows linked to both column ``a`` and column ``b`` (int32, cols x
    cols)."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.ch3_common_columns(graph.crow, graph.col, graph.t_crow, graph.t_row)
    cc = torch.zeros(graph.cols, graph.cols, dtype=torch.int32)
    deg_r, _ = degrees(graph)
    step = max(1, CHUNK // max(1, graph.cols))
    for r0 in range(0, graph.rows, step):  # sums of 0/1 products below 2**24: exact
        r1 = min(graph.rows, r0 + step)
        dense = _dense(graph, r0, r1, torch.float32)
        cc += (dense.T @ dense).round_().to(torch.int32)
    return cc


def _dense(graph: Graph, r0: int, r1: int, dtype) -> torch.Tensor:
    """Rows ``r0 .. r1 - 1`` of the 0/1 matrix of the graph."""
    deg_r, _ = degrees(graph)
    dense = torch.zeros(r1 - r0, graph.cols, dtype=dtype)
    lo, hi = int(graph.crow[r0]), int(graph.crow[r1])
    local = torch.repeat_interleave(torch.arange(r1 - r0), deg_r[r0:r1])
    dense[local, graph.col[lo:hi].long()] = 1
    return dense


def l3_rows(graph: Graph, wr: torch.Tensor, wc: torch.Tensor,
            block_rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(r0, r1, scores)`` for consecutive blocks of at most ``block_rows`` rows: the int64
    ``(A diag(wc) A^T diag(wr) A)[r0:r1]``, at an unlinked pair the sum over its paths of
    ``wc[z2] * wr[z1]`` (with ``l3_weights``, the L3 index times ``4**F``)."""
    kernels = _kernels()
    step = max(1, int(block_rows))
    if kernels is not None:
        for r0 in range(0, graph.rows, step):
            r1 = min(graph.rows, r0 + step)
            yield r0, r1, kernels.l3_rows(graph.crow, graph.col, graph.t_crow, graph.t_row,
                                          wr, wc, r0, r1)
        return
    # integers below 2**53 in float64: the products are exact whatever the order of the sums
    full = _dense(graph, 0, graph.rows, torch.float64)
    weighted = full * wr.double()[:, None]
    for r0 in range(0, graph.rows, step):
        r1 = min(graph.rows, r0 + step)
        through = (full[r0:r1] * wc.double()[None, :]) @ full.T
        yield r0, r1, (through @ weighted).round_().to(torch.int64)


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, owner)``: ``starts[i] + 0, 1, ..., counts[i] - 1`` for every ``i`` in turn,
    and the ``i`` each comes from."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    return starts[owner] + torch.arange(owner.numel()) - first[owner], owner


def ch3_l3_pairs(graph: Graph, positions: torch.Tensor, cc: torch.Tensor,
                 g: torch.Tensor) -> torch.Tensor:
    """The integer CH3-L3 score (int64; ``scale`` of ``score_table`` per unit) of each of the
    sorted flat ``positions``, which must not be links, given ``cc = common_columns(graph)`` and
    ``g`` of ``score_table(graph)``."""
    positions = positions.to(device="cpu", dtype=torch.int64).contiguous()
    kernels = _kernels()
    if kernels is not None:
        return kernels.ch3_l3_pairs(graph.crow, graph.col, graph.t_crow, graph.t_row, cc, g,
                                    positions)
    out = torch.zeros(positions.numel(), dtype=torch.int64)
    if positions.numel() == 0:
        return out
    deg_r, deg_c = degrees(graph)
    row = torch.div(positions, graph.cols, rounding_mode="floor")
    rows, first = torch.unique_consecutive(row, return_counts=True)
    # rows whose wedges (r, z2, z1) fit a chunk, taken together
    wedges = torch.cumsum(_wedges_per_row(graph)[rows], 0)
    bounds = torch.cumsum(first, 0)
    lo = 0
    while lo < rows.numel():
        done = int(wedges[lo - 1]) if lo else 0
        hi = int(torch.searchsorted(wedges, torch.tensor(done + CHUNK), right=True))
        hi = min(rows.numel(), max(lo + 1, hi))
        a, b = (int(bounds[lo - 1]) if lo else 0), int(bounds[hi - 1])
        out[a:b] = _pairs_torch(graph, positions[a:b], rows[lo:hi], deg_r, deg_c, cc, g)
        lo = hi
    return out


def _wedges_per_row(graph: Graph) -> torch.Tensor:
    """``sum over the columns z2 of r of deg(z2)`` for every row r."""
    deg_r, deg_c = degrees(graph)
    per_link = deg_c[graph.col.long()]
    link_row = torch.repeat_interleave(torch.arange(graph.rows), deg_r)
    return torch.zeros(graph.rows, dtype=torch.int64).index_add_(0, link_row, per_link)


def _pairs_torch(graph, positions, rows, deg_r, deg_c, cc, g) -> torch.Tensor:
    """``ch3_l3_pairs`` of the pairs of ``rows`` (sorted, distinct) with torch's operations."""
    n_rows = graph.rows
    crow, col = graph.crow.long(), graph.col.long()
    t_crow, t_row = graph.t_crow.long(), graph.t_row.long()
    # the wedges r - z2 - z1 of these rows, grouped by (r, z1)
    k, which = _expand(crow[rows], deg_r[rows])
    z2 = col[k]
    j, link = _expand(t_crow[z2], deg_c[z2])
    key = which[link] * n_rows + t_row[j]
    key, order = torch.sort(key, stable=True)
    wedge_z2 = z2[link][order]
    keys, shared = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(shared, 0) - shared
    out = torch.zeros(positions.numel(), dtype=torch.int64)
    if keys.numel() == 0:  # no paths of length 3 at all
        return out
    # each pair (r, c) with each row z1 of c, z1 != r, that shares a column with r
    row = torch.div(positions, graph.cols, rounding_mode="floor")
    c = positions - row * graph.cols
    at = torch.searchsorted(rows, row)  # the pair's row among `rows`
    for part in torch.arange(positions.numel()).split(max(1, CHUNK // max(1, graph.rows))):
        j1, own = _expand(t_crow[c[part]], deg_c[c[part]])
        pair, z1 = part[own], t_row[j1]
        want = at[pair] * n_rows + z1
        where = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
        found = (keys[where] == want) & (z1 != row[pair])
        pair, z1, where = pair[found], z1[found], where[found]
        a = deg_r[z1] - shared[where]
        step = max(1, CHUNK // max(1, int(deg_r.max()) if deg_r.numel() else 1))
        for sub in torch.arange(pair.numel()).split(step):
            e, own2 = _expand(starts[where[sub]], shared[where[sub]])
            p, z2 = pair[sub][own2], wedge_z2[e]
            keep = z2 != c[p]
            p, z2, a2 = p[keep], z2[keep], a[sub][own2][keep]
            m = a2 * (deg_c[z2] - cc[z2, c[p]].long())
            out.index_add_(0, p, g[m])
    return out


def ch3_l3(positions: torch.Tensor, shape) -> torch.Tensor:
    """The CH3-L3 score of every unlinked pair of a weight of ``shape`` with active set
    ``positions`` (sorted flat), as a float64 tensor of its matrix view (0 at the links):
    every path summed. For small layers, users and tests (one score per pair)."""
    graph = bipartite_graph(positions, shape)
    g, scale = score_table(graph)
    numel = graph.rows * graph.cols
    free = torch.ones(numel, dtype=torch.bool)
    free[positions.to(device="cpu", dtype=torch.int64)] = False
    pairs = free.nonzero().squeeze(1)
    scores = torch.zeros(numel, dtype=torch.float64)
    scores[pairs] = ch3_l3_pairs(graph, pairs, common_columns(graph), g).double() / scale
    return scores.view(graph.rows, graph.cols)
