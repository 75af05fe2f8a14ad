"""Selection: which scored entries are kept, separate from how they are scored. O(n), no sort.

One tie rule everywhere: entries are ordered by score, and among equal scores by a tie key, the
rank of the position in a :class:`~sparsetrain.sparsity.permutation.RandomOrder` fixed by (seed,
purpose, step, layer). The lower rank wins. Ties therefore fall at random, yet identically on
every backend and every data-parallel rank, and no layer is ever permuted or sorted: the k-th
score is found by selection (radix selection in the compiled kernels; else ``kthvalue``, on a
sample first where the tensor is large) and only the entries tied with it get a key.

``keys`` arguments are callables ``indices -> int64 keys`` (distinct), called only for the
entries that tie.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import torch

from ..kernels import compiled_kernels
from .permutation import RandomOrder
from .positions import contains

Keys = Callable[[torch.Tensor], torch.Tensor]

#: The dtypes of ``comparable`` scores, all of which the compiled selection kernels take.
COMPARABLE = (torch.float32, torch.float64, torch.int64)

#: Entries of the evenly spaced sample from which a bound of the k-th score is read.
SAMPLE = 1 << 16


def comparable(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float32/float64/int64, 1-D (half types are widened, exactly)."""
    flat = scores.reshape(-1)
    if flat.dtype in (torch.float32, torch.float64, torch.int64):
        return flat
    return flat.to(torch.int64) if not flat.is_floating_point() else flat.float()


def sampled_bound(scores: torch.Tensor, k: int, skip: torch.Tensor | None = None,
                  top: bool = True) -> float:
    """A guess of a score ``t`` with at least ``k`` entries ``>= t`` (``<= t`` where not
    ``top``; outside the sorted offsets ``skip``), close to the k-th largest (smallest): read
    off an evenly spaced sample with a safety margin, so that only about ``k`` entries go on to
    an exact selection. Not checked: the caller counts; ``-inf`` (``inf``) where the tensor is
    too small to sample."""
    n = scores.numel()
    available = n - (0 if skip is None else skip.numel())
    none = -math.inf if top else math.inf
    if n <= 8 * SAMPLE or k <= 0 or k >= available:
        return none
    step = n // SAMPLE
    sample = scores[::step]
    if skip is not None and skip.numel():
        sampled_at = torch.arange(0, n, step, device=scores.device)[:sample.numel()]
        sample = sample[~contains(skip, sampled_at)]
    m = sample.numel()
    p = k / available  # the share beyond the k-th; the sample quantile is off by ~sqrt(p(1-p)/m)
    margin = 0.05 * p + 4 * math.sqrt(p * (1 - p) / max(1, m))
    rank = int(m * max(0.0, 1 - p - margin))  # from the bottom (top), from the top (not top)
    if rank < 1:
        return none
    return float(torch.kthvalue(sample, rank if top else m + 1 - rank).values)


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-D ``scores`` (``1 <= k <= n``), in O(n): by radix
    selection with the compiled kernels (float scores), else by ``kthvalue`` on the entries
    beyond a bound read off a sample, on the side of the k-th (the top or, for ``2k > n``, the
    bottom), where that bound holds."""
    kernels = compiled_kernels() if scores.device.type == "cpu" else None
    if kernels is not None and scores.dtype.is_floating_point:
        kth = kernels.kth_largest(scores.contiguous(), k)
        if kth.numel():  # else a score is NaN
            return kth
    n = scores.numel()
    top = 2 * k <= n  # else the (n - k + 1)-th smallest
    rank = k if top else n - k + 1
    bound = sampled_bound(scores, rank, top=top)
    if not math.isinf(bound):
        near = scores[scores >= bound] if top else scores[scores <= bound]
        if near.numel() >= rank:
            return torch.kthvalue(near, near.numel() - rank + 1 if top else rank).values
    return torch.kthvalue(scores, n - k + 1).values


def top_k(scores: torch.Tensor, k: int, keys: Keys) -> torch.Tensor:
    """Sorted indices of the ``k`` largest entries of ``scores`` (flattened), ties by ``keys``.

    Ordered by (score, key), the larger first; ``keys(indices)`` gives distinct int64 keys of
    the tied entries (the lower key wins). Scores must be finite (or ``-inf``).
    """
    flat = comparable(scores)
    n = flat.numel()
    k = int(k)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    if k >= n:
        return torch.arange(n, device=flat.device)
    kth = _kth_largest(flat, k)
    kernels = compiled_kernels() if flat.device.type == "cpu" else None
    if kernels is not None and flat.dtype in COMPARABLE:
        chosen = kernels.indices_at_least(flat.contiguous(), kth.reshape(1))
    else:
        chosen = (flat >= kth).nonzero().squeeze(1)  # in index order, without a sort
    if chosen.numel() > k:  # more entries tie with the k-th than places are left
        tied = (flat[chosen] == kth).nonzero().squeeze(1)  # offsets in chosen
        need = k - (chosen.numel() - tied.numel())
        tie_keys = keys(chosen[tied])
        threshold = torch.kthvalue(tie_keys, need).values
        keep = torch.ones(chosen.numel(), dtype=torch.bool, device=chosen.device)
        keep[tied[tie_keys > threshold]] = False
        chosen = chosen[keep]
    return chosen


def top_k_mask(scores: torch.Tensor, k: int, keys: Keys) -> torch.Tensor:
    """Boolean mask of the shape of ``scores`` with ones at its ``k`` largest entries."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[top_k(scores, k, keys)] = True
    return mask.view(scores.shape)


def order_keys(order: RandomOrder, positions: torch.Tensor | None = None) -> Keys:
    """Tie keys from ``order``: the rank of each entry's position (``positions[i]`` for entry
    ``i``, or ``i`` itself)."""
    if positions is None:
        return order.rank
    return lambda indices: order.rank(positions[indices])


def at_least(scores: torch.Tensor, floor: float, skip: torch.Tensor) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """``(scores[i], i)`` for the entries of the 1-D ``scores`` that are ``>= floor``, except
    the sorted offsets ``skip``; in index order. (One fused pass with the compiled kernels.)"""
    kernels = compiled_kernels() if scores.device.type == "cpu" else None
    if (kernels is not None and scores.dtype in (torch.float32, torch.float64)
            and scores.is_contiguous()):
        return kernels.candidates_at_least(scores, floor, skip.to(scores.device).contiguous())
    chosen = scores >= floor
    if skip.numel():
        chosen[skip] = False
    index = chosen.nonzero().squeeze(1)
    return scores[index], index


class RunningTopK:
    """The ``k`` largest (score, key) among candidates offered block by block, in O(k + block)
    memory: each block is cut to the few entries that can still make it, and the kept
    candidates are cut back to the best ``k`` whenever they reach ``2k``."""

    def __init__(self, k: int, keys: Callable[[torch.Tensor], torch.Tensor],
                 total: int | None = None):
        """``keys(positions)`` gives the distinct int64 tie keys of positions. With ``total``,
        the number of candidates all blocks will offer, the first block's scores give a guess
        of a bound on the k-th largest over all of them (its share of the k, with a margin):
        candidates below it are not kept, and ``complete()`` says whether the guess held (at
        least k candidates reached it); where it did not, offer the blocks again to a
        ``RunningTopK`` without ``total``."""
        self.k = int(k)
        self.keys = keys
        self.total = total
        self.guess = -math.inf
        self._guessed = total is None
        self.floor = -math.inf  # once k are held: the smallest score held
        self._scores: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []
        self._pending = 0
        self._held = 0

    def _guess(self, scores: torch.Tensor, skip: torch.Tensor) -> float:
        available = scores.numel() - skip.numel()
        if not self.total or available <= 0:
            return -math.inf
        expected = math.ceil(self.k * min(1.0, available / self.total) * 1.25) + 256
        return sampled_bound(scores, expected, skip) if expected < available else -math.inf

    def complete(self) -> bool:
        """Whether the candidates held are the exact top k (always, unless a guessed bound
        was too high: fewer than k candidates reached it)."""
        return self.guess == -math.inf or self._held + self._pending >= self.k

    def offer(self, scores: torch.Tensor, lo: int, skip: torch.Tensor) -> None:
        """Offer the 1-D ``scores`` of the positions ``lo, lo + 1, ...``, except the sorted
        offsets ``skip`` (closed positions)."""
        if self.k <= 0:
            return
        if not self._guessed:
            self._guessed, self.guess = True, self._guess(scores, skip)
        found = None
        if self.guess > self.floor:
            found = at_least(scores, self.guess, skip)
        elif self.floor == -math.inf and scores.numel() > self.k:
            # below its own block's k-th an entry cannot make it: a bound from a sample,
            # good if at least k entries reach it
            bound = sampled_bound(scores, self.k, skip)
            if bound > -math.inf:
                found = at_least(scores, bound, skip)
                if found[1].numel() < self.k:
                    found = None
        if found is None:
            found = at_least(scores, self.floor, skip)
        values, offsets = found
        self._scores.append(comparable(values))
        self._positions.append(offsets + lo)
        self._pending += offsets.numel()
        if self._held + self._pending >= 2 * self.k:
            self._reduce()

    def _reduce(self) -> None:
        # blocks are offered in position order, so the candidates stay sorted by position
        scores = torch.cat(self._scores)
        positions = torch.cat(self._positions)
        best = top_k(scores, self.k, lambda i: self.keys(positions[i]))
        self._scores, self._positions = [scores[best]], [positions[best]]
        self._held, self._pending = best.numel(), 0
        if best.numel() == self.k:
            self.floor = float(scores[best].min())

    def result(self) -> torch.Tensor:
        """The positions of the ``k`` best candidates (fewer if fewer were offered), sorted."""
        return self.result_with_scores()[0]

    def result_with_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``result()`` and the (comparable) scores of those positions."""
        if self.k <= 0 or not self._positions:
            return torch.empty(0, dtype=torch.int64), torch.empty(0)
        self._reduce()
        return self._positions[0], self._scores[0]


def first_free(order: RandomOrder, k: int, closed: torch.Tensor,
               device: torch.device | None = None) -> torch.Tensor:
    """The first ``k`` positions of ``order`` that are not in the sorted ``closed``, sorted.

    A uniformly random ``k``-subset of the free positions; the work is about
    ``k * numel / free`` positions, never the whole layer unless it is nearly full.
    """
    numel = order.numel
    free = numel - closed.numel()
    if k > free:
        raise ValueError(f"cannot choose {k} of the {free} free positions")
    chosen, start, need = [], 0, int(k)
    closed = closed.to(device) if device is not None else closed
    while need > 0:
        count = min(numel - start, int(need * 1.25 * numel / free) + 64)
        ranks = torch.arange(start, start + count, dtype=torch.int64, device=closed.device)
        drawn = order.position(ranks)
        drawn = drawn[~contains(closed, drawn)][:need]
        chosen.append(drawn)
        need -= drawn.numel()
        start += count
    if not chosen:
        return torch.empty(0, dtype=torch.int64, device=closed.device)
    return torch.sort(torch.cat(chosen)).values


def select_global(scores: Mapping[str, torch.Tensor], n_keep: int, *words: int,
                  stacklevel: int = 3) -> dict[str, torch.Tensor]:
    """Masks (name -> bool) keeping the ``n_keep`` highest scores over all tensors at once.

    Ties are broken by one random order over all the tensors' entries (fixed by ``words``,
    e.g. the seed and the round).
    Every tensor keeps at least one entry: a layer left with no weight would cut the network in
    two ("layer collapse"). When the plain selection would leave a tensor empty, every tensor's
    best-scored entry is kept first (with a warning) and the rest of the budget goes to the
    highest other scores, so the total stays exactly ``n_keep`` and no tensor is empty.
    (Reserving only the empty ones could push another tensor's single entry out.) Scores of
    ``-inf`` mark entries that must not be kept unless nothing else is left.
    """
    from .permutation import PRUNE

    names = list(scores)
    if n_keep < len(names):
        raise ValueError(f"cannot keep {n_keep} weights in {len(names)} layers, at least one each")
    device = scores[names[0]].device
    flat = torch.cat([scores[n].reshape(-1).to(device=device, dtype=torch.float64)
                      for n in names])
    sizes = [scores[n].numel() for n in names]
    keys = order_keys(RandomOrder(flat.numel(), PRUNE, *words))

    def split(indices: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        keep[indices] = True
        return {n: part.view(scores[n].shape).to(scores[n].device)
                for n, part in zip(names, torch.split(keep, sizes))}

    masks = split(top_k(flat, n_keep, keys))
    empty = [n for n in names if not bool(masks[n].any())]
    if not empty:
        return masks
    warnings.warn(
        f"keeping the {n_keep} best-scored weights over all layers would leave no weight in "
        f"{empty}; each layer keeps its best-scored weight so the network stays connected",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    reserved = flat.clone()
    offset = 0
    for size in sizes:
        part = flat[offset:offset + size]
        best = top_k(part, 1, lambda i, o=offset: keys(i + o))
        reserved[offset + best] = math.inf
        offset += size
    return split(top_k(reserved, n_keep, keys))
