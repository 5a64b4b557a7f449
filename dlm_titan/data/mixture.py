"""Which source (prefix) each global sample comes from, keyed by its position in the sample stream.

SMDM draws a source per sample from a running ``random.Random``, so the draw depends on how many samples came
before it on this rank: neither layout invariant nor resumable without replay. Here the stream is cut into
blocks of ``BLOCK`` positions; each block holds exactly ``count[s]`` samples of source ``s`` (largest-remainder
rounding of ``weight[s] * BLOCK``) in an order given by a permutation seeded by ``(seed, block)``. So

- the source of position ``g`` is a pure function of ``(seed, g)`` (layout invariant, O(1) to resume), and
- the k-th sample of source ``s`` is at a known place, so each source is read as its own epoch-wise stream:
  ``index_in_source = block * count[s] + (number of earlier positions of s in the block)``.

This is stratified sampling: frequencies equal the weights to ``0.5 / BLOCK`` per block, with the same
per-batch randomness as independent draws.
"""

from __future__ import annotations

import numpy as np

from dlm_titan.errors import UserError

from .permutation import hash_key

BLOCK = 10_000


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Integer counts per source summing to ``block``, proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(over="ignore"):
        overflow = not np.isfinite(w.sum())
    if overflow:  # finite weights can sum to inf (2 x 1e308); only then rescale, so ordinary weights keep their
        w = w / w.max()  # exact counts (a resumed run's sample layout)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    # ties broken by source order, so the result is deterministic
    order = sorted(range(len(w)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in order[:short]:
        counts[s] += 1
    return counts


class SourceMixture:
    """Position -> (source, index within that source's stream) for a weighted mixture.

    Args:
        weights: non-negative weights per source, not all zero.
        seed: run seed.
        block: positions per stratified block.
    """

    def __init__(self, weights: list[float], seed: int, block: int = BLOCK):
        self.counts = block_counts(weights, block)
        starved = [w for w, c in zip(weights, self.counts, strict=True) if w > 0 and c == 0]
        if starved:  # a source that would silently never be read
            raise UserError(f"data.train_weights: weight {starved[0]:g} is below 1/{2 * block} of their sum, so its "
                            f"source would never be sampled (counts are whole samples per block of {block}); raise "
                            "it or set it to 0")
        self.block = block
        self.seed = seed
        self._base = np.repeat(np.arange(len(self.counts)), self.counts)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, rank of the slot among its source's slots) for block ``b``."""
        if b not in self._cache:
            rng = np.random.default_rng(hash_key(self.seed, 0x6D6978, b))
            source = rng.permutation(self._base)
            rank = np.empty(self.block, dtype=np.int64)
            for s, c in enumerate(self.counts):
                rank[source == s] = np.arange(c)
            if len(self._cache) >= 4:  # a micro-batch touches at most two blocks; keep a few
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = (source, rank)
        return self._cache[b]

    def __call__(self, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source id and index within the source for each global stream position (int64 arrays)."""
        position = np.asarray(position, dtype=np.int64)
        source = np.empty_like(position)
        index = np.empty_like(position)
        blocks = position // self.block
        for b in np.unique(blocks):
            sel = blocks == b
            src, rank = self._layout(int(b))
            slot = position[sel] - b * self.block
            source[sel] = src[slot]
            index[sel] = b * self.counts[src[slot]] + rank[slot]
        return source, index
