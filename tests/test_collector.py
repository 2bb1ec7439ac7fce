"""The garbage collector's clock (``perf/gc_pause_s``) and ``FreezeHeap``, under a real Trainer."""

from __future__ import annotations

import gc
import weakref

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from qlora_lightning.speed.collector import CollectorClock, FreezeHeap


def test_clock_times_collections_while_started():
    clock = CollectorClock()
    clock.start()
    gc.collect()
    gc.collect()
    clock.stop()
    assert clock.collections == 2 and clock.seconds > 0
    gc.collect()  # stopped: not counted
    assert clock.collections == 2


class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Cycle:
    def __init__(self):
        self.me = self


class _Marker:
    """An object the collector tracks (an instance with a __dict__)."""


def _frozen(obj) -> bool:
    # gc.get_objects() walks the collector's generations, not the frozen (permanent) one.
    return not any(o is obj for o in gc.get_objects())


class _Probe(Callback):
    """Objects made at steps 1 and 4, looked for at step 6; a reference cycle made at step 4."""

    def __init__(self):
        self.first_count, self.early, self.late, self.cycle, self.seen = None, None, None, None, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.first_count is None:
            self.first_count = gc.get_freeze_count()
        if step == 1 and self.early is None:
            self.early = _Marker()  # alive at the freeze after step 2
        if step == 4 and self.late is None:
            self.late = _Marker()
            self.cycle = weakref.ref(_Cycle())  # garbage at once, freed by the collector only
        if step == 6 and not self.seen:
            gc.collect()
            self.seen = {
                "early frozen": _frozen(self.early),
                "late frozen": _frozen(self.late),
                "cycle freed": self.cycle() is None,
            }


def test_freeze_heap_freezes_during_warm_up_only_and_gives_the_heap_back(tmp_path):
    probe = _Probe()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=8,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[FreezeHeap(after_steps=2), probe],
    )
    trainer.fit(
        _Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=1)
    )
    assert probe.first_count > 0  # the heap at the start
    # What training makes after the warm-up steps is not frozen, and its garbage is still collected.
    assert probe.seen == {"early frozen": True, "late frozen": False, "cycle freed": True}
    assert not _frozen(probe.early) and gc.get_freeze_count() == 0  # given back when training ends
