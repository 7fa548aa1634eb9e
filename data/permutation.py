"""A seeded permutation of range(n) evaluated pointwise, in O(1) memory.

The loader shuffles windows without replacement in every epoch. A materialized permutation of a
100B-token corpus at seq_len 1024 is 10^8 int64 = 800 MB per rank; instead position i of the
permutation is computed on demand by a 4-round Feistel network over the smallest even-bit domain
2^(2h) >= n, with cycle walking to stay below n. A Feistel network is a bijection for any round
function, and cycle walking keeps it one on range(n). Pure integer arithmetic: the same (n, seed,
epoch) gives the same order on any machine and numpy version, which exact resume relies on.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 4


def _splitmix64(x: int) -> int:
    """One step of splitmix64 on Python ints: a well-mixed 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """perm[i] for i in range(n): a bijection of range(n) fixed by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2 * half bits cover range(n)
        key = _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))
        self._consts = tuple(
            np.uint64(c)
            for c in (self._half, (1 << self._half) - 1, 27, 30, 31, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
        )
        self._keys = []
        for _ in range(_ROUNDS):
            key = _splitmix64(key)
            self._keys.append(np.uint64(key))

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted values at `positions` (int array, each in range(n)), as int64."""
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside a permutation of {self.n}")
        y = self._feistel(x)
        outside = y >= self.n
        while outside.any():  # cycle walking: the cycle through x < n must come back below n
            y[outside] = self._feistel(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        # uint64 array arithmetic wraps silently, which is what the mixing wants.
        half, mask, s27, s30, s31, m1, m2 = self._consts
        left, right = x >> half, x & mask
        for key in self._keys:
            f = right ^ key  # splitmix64's finalizer as the round function
            f = (f ^ (f >> s30)) * m1
            f = (f ^ (f >> s27)) * m2
            f ^= f >> s31
            left, right = right, left ^ (f & mask)
        return (left << half) | right
