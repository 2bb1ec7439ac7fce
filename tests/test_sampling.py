"""The epoch-seeded samplers under torchdata's StatefulDataLoader: a saved loader resumes on the
batch it would have given next, in any epoch, and one saved at the end of an epoch starts the
next."""

from __future__ import annotations

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from qlora_lightning.data.sampling import EpochSeededSampler, LengthGroupedSampler

N, BATCH = 10, 3  # 4 batches per epoch, the last one short


def _sampler(kind: str):
    return (
        EpochSeededSampler(range(N), seed=7)
        if kind == "plain"
        else LengthGroupedSampler([i % 5 + 1 for i in range(N)], batch_size=BATCH, seed=7)
    )


def _loader(kind: str) -> StatefulDataLoader:
    return StatefulDataLoader(list(range(N)), batch_size=BATCH, sampler=_sampler(kind))


def _epoch(loader: StatefulDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does at every epoch start
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("kind", ["plain", "grouped"])
@pytest.mark.parametrize("epoch, consumed", [(0, 1), (1, 2), (1, 4), (2, 0)])
def test_a_restored_loader_gives_the_batches_an_uninterrupted_one_would(kind, epoch, consumed):
    straight = _loader(kind)
    expected = [_epoch(straight, e) for e in range(epoch + 2)]

    interrupted = _loader(kind)
    for e in range(epoch):
        _epoch(interrupted, e)
    interrupted.sampler.set_epoch(epoch)
    batches = iter(interrupted)
    for _ in range(consumed):
        next(batches)
    state = interrupted.state_dict()

    resumed = _loader(kind)
    resumed.load_state_dict(state)
    # Resuming, Lightning starts the loader's iterator (which applies the saved state) and only
    # then calls set_epoch; a sampler that did not save its epoch replays epoch 0's order here.
    batches = iter(resumed)
    if consumed < len(expected[epoch]):  # Lightning finishes the interrupted epoch first
        resumed.sampler.set_epoch(epoch)
        assert [b.tolist() for b in batches] == expected[epoch][consumed:]
        assert _epoch(resumed, epoch + 1) == expected[epoch + 1]
    else:  # saved at the end of the epoch: the next one starts whole, in its own order
        resumed.sampler.set_epoch(epoch + 1)
        assert [b.tolist() for b in resumed] == expected[epoch + 1]


def test_each_epoch_has_its_own_order_and_every_index_once():
    loader = _loader("plain")
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert first != second
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(N))


@pytest.mark.parametrize("kind", ["plain", "grouped"])
def test_ranks_share_one_permutation_in_equal_parts(kind):
    ranks = 3
    shards = []
    for rank in range(ranks):
        sampler = (
            EpochSeededSampler(range(N), seed=7, num_replicas=ranks, rank=rank)
            if kind == "plain"
            else LengthGroupedSampler(
                [i % 5 + 1 for i in range(N)],
                batch_size=BATCH,
                seed=7,
                num_replicas=ranks,
                rank=rank,
            )
        )
        sampler.set_epoch(1)
        shards.append(list(sampler))
    # Ceil(10 / 3), two indices repeated.
    assert {len(shard) for shard in shards} == {len(sampler)} == {4}
    whole = sampler.order()
    assert [i for step in zip(*shards) for i in step][
        :N
    ] == whole  # rank r takes every 3rd index from r
    assert sorted(set(sum(shards, []))) == list(range(N))
