"""Seeded permutations of ``[0, n)`` evaluated one index at a time, in O(1) memory.

An epoch over SlimPajama has ~3e8 windows; materialising ``rng.permutation(n)`` would cost gigabytes per
worker. A Feistel network is a bijection on ``[0, 2^(2h))`` by construction; "cycle walking" (re-encrypting
values that land outside ``[0, n)``) restricts it to a bijection on ``[0, n)``. Since ``2^(2h) < 4n`` the
expected number of walks per index is below 4.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def mix64(x: int) -> int:
    """splitmix64 finaliser on a Python int (a good 64-bit hash of ``x``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_key(*parts: int) -> int:
    """Combine integers into one 64-bit key (order matters)."""
    h = 0x5EED
    for p in parts:
        h = mix64(h ^ (int(p) & _MASK64))
    return h


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (multiplications wrap mod 2^64, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A keyed pseudo-random permutation of ``[0, n)``: ``perm(i)`` for arrays of indices.

    Args:
        n: domain size (>= 1).
        key: 64-bit key, e.g. ``hash_key(seed, source, epoch)``.
    """

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"permutation domain must be non-empty, got n={n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._round_keys = [np.uint64(hash_key(key, r)) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for k in self._round_keys:
            left, right = right, left ^ (_mix64_array(right ^ k) & self._mask)
        return (left << half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Map indices in ``[0, n)`` (any integer array) to their permuted positions (int64)."""
        x = np.asarray(index, dtype=np.uint64)
        if self.n == 1:
            return np.zeros(x.shape, dtype=np.int64)
        x = self._encrypt(x)
        out_of_range = x >= np.uint64(self.n)
        while out_of_range.any():  # cycle walking
            x[out_of_range] = self._encrypt(x[out_of_range])
            out_of_range = x >= np.uint64(self.n)
        return x.astype(np.int64)
