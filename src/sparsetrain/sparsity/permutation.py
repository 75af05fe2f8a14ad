"""Counter-based random orders of a layer's positions: the one source of randomness of selection.

A :class:`RandomOrder` is a pseudo-random permutation of ``range(numel)`` chosen by a few integer
words (the seed, what it is for, the step, the layer). It is computed, never stored: the
``i``-th position of the order and the rank of any position are pure functions of those words,
O(1) per entry, on any device. So every backend and every data-parallel rank that asks for the
same words gets the same order, with no generator state to carry and no ``randperm`` of a layer.

It serves three purposes:

- tie keys: among equal scores, the position of lower rank wins (``rank`` is a bijection, so keys
  never tie);
- random growth (SET) and random initial masks: the first free positions in the order, which
  form a uniformly random subset;
- the random score of a position, ``-rank``, where a score must be written out.

The permutation is a balanced Feistel network of four rounds on ``2h`` bits (``4^h >= numel``)
whose round function is a 32-bit integer mixer keyed from the words, restricted to
``range(numel)`` by cycle-walking. Every product is split so that it stays below 2**63: int64
arithmetic never overflows.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
ROUNDS = 4
MAX_NUMEL = 1 << 62
CHUNK = 1 << 18

#: What an order is for; part of the words, so that the orders of different purposes are
#: independent.
INIT, DROP, GROW, PRUNE, SHUFFLE = 1, 2, 3, 4, 5


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(*words: int) -> int:
    """A 64-bit key mixed from integer ``words`` (any sign, any size)."""
    h = 0x243F6A8885A308D3
    for w in words:
        h = _splitmix64(h ^ (int(w) & _M64))
    return h


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)`` without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xor-shift-multiply) of ``x`` in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class RandomOrder:
    """A pseudo-random permutation of ``range(numel)`` fixed by ``words``.

    ``position(ranks)`` gives the positions at those ranks of the order, ``rank(positions)`` the
    inverse; both take and return int64 tensors (on the device of the input).
    """

    def __init__(self, numel: int, *words: int):
        numel = int(numel)
        if not 0 < numel <= MAX_NUMEL:
            raise ValueError(f"a random order needs 1 to 2**62 positions, got {numel}")
        self.numel = numel
        bits = max(2, (numel - 1).bit_length())
        self.half = (bits + 1) // 2
        self._mask = (1 << self.half) - 1
        key = stream_key(*words)
        self._keys = [stream_key(key, r) & _M32 for r in range(ROUNDS)]

    def _encrypt(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self.half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (mix32(right ^ k) & self._mask)
        return (left << self.half) | right

    def _decrypt(self, y: torch.Tensor) -> torch.Tensor:
        left, right = y >> self.half, y & self._mask
        for k in reversed(self._keys):
            left, right = right ^ (mix32(left ^ k) & self._mask), left
        return (left << self.half) | right

    def _walk(self, x: torch.Tensor, step) -> torch.Tensor:
        """``step`` applied until the value falls inside ``range(numel)`` (cycle-walking)."""
        y = step(x)
        outside = (y >= self.numel).nonzero().squeeze(1)
        while outside.numel():
            again = step(y[outside])
            y[outside] = again
            outside = outside[again >= self.numel]
        return y

    def _apply(self, values: torch.Tensor, step) -> torch.Tensor:
        """``step`` cycle-walked over the flattened int64 ``values``, in chunks of ``CHUNK``
        (the temporaries then stay small enough for the C allocator to reuse them)."""
        values = torch.as_tensor(values).reshape(-1).to(torch.int64)
        if values.numel() <= CHUNK:
            return self._walk(values, step) if values.numel() else values.clone()
        return torch.cat([self._walk(part, step) for part in values.split(CHUNK)])

    def position(self, ranks: torch.Tensor) -> torch.Tensor:
        """The positions at ``ranks`` (each in ``range(numel)``) of the order."""
        return self._apply(ranks, self._encrypt)

    def rank(self, positions: torch.Tensor) -> torch.Tensor:
        """The ranks of ``positions`` (each in ``range(numel)``) in the order."""
        return self._apply(positions, self._decrypt)

    def first(self, count: int, device=None) -> torch.Tensor:
        """The first ``count`` positions of the order, sorted: a uniformly random subset."""
        ranks = torch.arange(int(count), dtype=torch.int64, device=device)
        return torch.sort(self.position(ranks)).values
