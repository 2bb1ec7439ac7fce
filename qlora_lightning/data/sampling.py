"""Samplers whose order is a pure function of (seed, epoch), so a resumed run sees the same
batches."""

from __future__ import annotations

import math
from typing import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededSampler(DistributedSampler):
    """A random permutation per epoch, seeded by ``seed + epoch``, that records where it is.

    Lightning calls ``set_epoch`` at every epoch start. torchdata's ``StatefulDataLoader`` saves
    ``state_dict()`` with each checkpoint and restores it before the epoch's iterator starts, so a
    run killed anywhere resumes on exactly the batch it would have seen next: the epoch travels
    with the position (otherwise a restored position would be replayed in a fresh sampler's
    epoch 0 order), and a position at the end of an epoch resumes at the start of the next one.

    Over several ranks each takes every ``num_replicas``-th index of the one permutation (padded
    by repeating its start to equal shares, as ``DistributedSampler`` does). Being a
    ``DistributedSampler``, it is not wrapped by Lightning, whose wrapper would keep neither the
    epoch nor the position in a checkpoint.

    Args:
        data: The dataset (only its length is used).
        seed: Seed of the permutation (plus the epoch).
        num_replicas: Ranks sharing the data.
        rank: This rank.
    """

    def __init__(self, data: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        # Not DistributedSampler.__init__, which asks the process group; everything it sets is set
        # here.
        self.dataset, self.seed, self.epoch = data, seed, 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(len(data) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._yielded = 0  # indices handed out in the current epoch
        self._resume_at = 0  # where the next iterator starts (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        # A new epoch starts at its beginning; a restored position was another's.
        if epoch != self.epoch:
            self._yielded = self._resume_at = 0
        self.epoch = epoch

    def order(self) -> list[int]:
        """This epoch's order of all the indices, the same on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # equal shares
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for index in order[self.rank :: self.num_replicas][start:]:
            self._yielded += 1
            yield index

    def state_dict(self) -> dict:
        if self._yielded >= len(self):  # the epoch is done: resume at the start of the next one
            return {"epoch": self.epoch + 1, "yielded": 0}
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = state["epoch"], state["yielded"]

    def __len__(self) -> int:
        return self.num_samples


class LengthGroupedSampler(EpochSeededSampler):
    """Batches of similar-length examples (less padding), in an order fixed by ``seed + epoch``.

    transformers' grouping: a random permutation cut into mega-batches of up to 50 batches, each
    sorted by length, the longest batch first (an out-of-memory error shows at once). Over several
    ranks the groups are ``batch_size x num_replicas`` long, so each rank's batches stay similar
    too.

    Args:
        lengths: Token count of each example.
        batch_size: Examples per batch, so that each run of ``batch_size`` indices has similar
            lengths.
        seed: Seed of the permutation (plus the epoch).
        num_replicas: Ranks sharing the data.
        rank: This rank.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(lengths, seed, num_replicas, rank)
        self.batch_size = batch_size

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return get_length_grouped_indices(
            self.dataset, self.batch_size * self.num_replicas, generator=generator
        )
