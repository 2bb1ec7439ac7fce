"""The garbage collector's clock (``perf/gc_pause_s``) and ``FreezeHeap``, under a real Trainer."""

from __future__ import annotations

import gc
import weakref

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from qlora_lightning.collector import CollectorClock, FreezeHeap


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


class _Probe(Callback):
    """Frozen objects after each micro-batch; a reference cycle made at step 4, looked for at step 6."""

    def __init__(self):
        self.frozen, self.cycle = {}, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.frozen[step] = gc.get_freeze_count()
        if step == 4 and self.cycle is None:
            self.cycle = weakref.ref(_Cycle())  # garbage at once, freed by the collector only
        if step == 6:
            gc.collect()
            self.cycle_freed = self.cycle() is None


def test_freeze_heap_freezes_during_warm_up_only_and_gives_the_heap_back(tmp_path):
    probe = _Probe()
    trainer = Trainer(accelerator="cpu", max_steps=8, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[FreezeHeap(after_steps=2), probe])
    trainer.fit(_Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=1))
    frozen = probe.frozen
    assert frozen[0] > 0  # the heap at the start (and after the first micro-batch)
    assert frozen[3] == frozen[8]  # nothing frozen after the warm-up steps
    assert probe.cycle_freed  # what training makes later is still collected
    assert gc.get_freeze_count() == 0  # given back when training ends
