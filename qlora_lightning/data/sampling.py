"""Samplers whose order is a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``seed + epoch``.

    Lightning calls ``set_epoch`` at every epoch start; together with torchdata's
    ``StatefulDataLoader`` (which records how far into the epoch the loader got) a run
    killed mid-epoch resumes on exactly the batch it would have seen next.
    """

    def __init__(self, data: Sized, seed: int = 0):
        self.data, self.seed, self.epoch = data, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data)


class LengthGroupedSampler(EpochSeededSampler):
    """Batches of similar-length examples (less padding), in an order fixed by ``seed + epoch``.

    transformers' grouping: a random permutation cut into mega-batches of up to 50 batches, each
    sorted by length, the longest batch first (an out-of-memory error shows at once).

    Args:
        lengths: Token count of each example.
        batch_size: Examples per batch, so that each run of ``batch_size`` indices has similar lengths.
        seed: Seed of the permutation (plus the epoch).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        super().__init__(lengths, seed)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.data, self.batch_size, generator=generator))
