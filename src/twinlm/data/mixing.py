"""Source mixing: which training blocks each epoch reads, drawn by the sources' weights.

A weight is a share of the training **tokens**; every block holds `seq_len` tokens, so it is also a share of
the blocks. An epoch reads `epoch_blocks` blocks (default: as many as the data holds), source i contributing
its share by largest remainders (the counts add up exactly). Each source is read as an endless stream of its
blocks in shuffled passes (pass p shuffled by (seed, source, p)), and epoch e takes the next blocks of that
stream: a source drawn below its size shows new blocks every epoch, one drawn above it repeats every block
as evenly as possible. The epoch's blocks are shuffled by (seed, epoch) and dealt to the processes like
torch's DistributedSampler (drop_last). All of it is a pure function of (seed, epoch), so a resumed run reads
exactly the blocks of the uninterrupted one, and `blocks_read` can count them afterwards without any state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["MixtureSampler", "apportion", "blocks_per_source"]


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders (ties to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts.tolist()


class MixtureSampler(Sampler[int]):
    """Indices into the concatenation of the sources' blocks (source i's `sizes[i]` blocks after source
    i-1's), mixed by `weights`, for one process of `world` (see the module docstring)."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int,
        rank: int = 0,
        world: int = 1,
        epoch_blocks: int | None = None,
    ) -> None:
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        if any(w > 0 and n == 0 for n, w in zip(sizes, weights, strict=True)):
            raise ValueError("a source with a positive weight has no blocks")
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = apportion(epoch_blocks or sum(self.sizes), weights)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        """Blocks start .. start+count-1 of a source's endless stream of shuffled passes (local indices)."""
        n = self.sizes[source]
        parts, position = [], start
        while position < start + count:
            passed, within = divmod(position, n)
            order = np.random.default_rng([self.seed, source, passed]).permutation(n)
            take = order[within : within + (start + count - position)]
            parts.append(take)
            position += len(take)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Every block of an epoch (all processes), in the order they are dealt."""
        chosen = [
            self.offsets[i] + self._stream(i, epoch * k, k) for i, k in enumerate(self.per_epoch) if k > 0
        ]
        mixed = np.concatenate(chosen)
        return mixed[np.random.default_rng([self.seed, 1 << 20, epoch]).permutation(len(mixed))]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        usable = len(indices) // self.world * self.world
        return iter(indices[self.rank : usable : self.world].tolist())

    def __len__(self) -> int:
        return sum(self.per_epoch) // self.world


def blocks_per_source(indices: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """How many of `indices` (into the concatenated sources) fall in each source."""
    bounds = np.cumsum(np.asarray(sizes, dtype=np.int64))
    which = np.searchsorted(bounds, np.asarray(indices, dtype=np.int64), side="right")
    return np.bincount(which, minlength=len(sizes)).tolist()
