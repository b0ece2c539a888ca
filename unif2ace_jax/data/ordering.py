"""Deterministic orders and draws for the input stream (no state beyond their arguments).

* `CounterRng(seed, stream, position)`: a counter-based generator (SplitMix64 hashing) whose
  draws are a pure function of its three keys; ~6x cheaper than building a numpy Generator
  per example (19 vs 118 µs for one example's three draws, measured here).
* `EpochShuffle(n, seed)`: position -> record index for an infinite stream of epochs, epoch e
  in the order of `np.random.default_rng([seed, e]).permutation(n)`.
* `shuffled_forever(ds, seed)`: a grain MapDataset as that infinite shuffled stream (random
  access, so a grain iterator over it checkpoints as one integer).
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class CounterRng:
    """Deterministic draws that depend only on (seed, stream, position) and the draw count."""

    def __init__(self, seed: int, stream: int, position: int):
        self._state = _mix64(_mix64(_mix64(seed & _M64) ^ (stream & _M64)) ^ (position & _M64))
        self._count = 0

    def _next64(self) -> int:
        self._count += 1
        return _mix64(self._state ^ _mix64(self._count))

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self._next64() >> 11) * (1.0 / (1 << 53))

    def integers(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        return int(self.random() * n)


class EpochShuffle:
    """Position -> record index for an infinite stream of shuffled epochs over n records.

    Epoch e (positions e*n .. e*n+n-1) visits the records in the order of
    `np.random.default_rng([seed, e]).permutation(n)`. Permutations are cached (last two).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # locks do not pickle (grain worker processes)
        return {"n": self.n, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                self._cache[epoch] = perm
                for old in sorted(self._cache)[:-2]:
                    del self._cache[old]
            return perm

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self.permutation(epoch)[offset])


def shuffled_forever(ds, seed: int):
    """`ds` (a grain MapDataset of n records) as an infinite stream of EpochShuffle epochs."""
    return grain.MapDataset.range(sys.maxsize).map(_Lookup(ds, EpochShuffle(len(ds), seed)))


class _Lookup:
    def __init__(self, ds, order: EpochShuffle):
        self.ds, self.order = ds, order

    def __call__(self, position: int):
        return self.ds[self.order(position)]
