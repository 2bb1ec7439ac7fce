"""Python's cyclic garbage collector: the host time it takes, and a heap it need not walk.

A full collection walks every container object the process holds. With torch, transformers and
Lightning loaded that is over half a million objects: full collections in the CPU quickstart's
process took 250-290 ms each (``benchmarks/results/2026-11-29_session12``). The host queues no
kernels meanwhile, and the GPU runs dry once the work already queued is done, so a collection that
lands inside a step can lengthen it by nearly as much. ``torch.compile`` adds many
long-lived objects in the first steps, which makes the collector's next full pass likelier.

``CollectorClock`` measures that time (``PerfMonitor`` logs it per step as ``perf/gc_pause_s``);
``FreezeHeap`` takes what exists once training is under way out of the collector's reach.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class CollectorClock:
    """Host seconds spent in the garbage collector while started, from ``gc.callbacks``."""

    def __init__(self):
        self.seconds = 0.0
        self.collections = 0
        self._since: Optional[float] = None

    def start(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        elif self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self.collections += 1
            self._since = None


class FreezeHeap(Callback):
    """Collects once, then freezes (``gc.freeze``) every object alive when training starts and after
    each of its first ``after_steps`` optimizer steps, which hold what compilation and the
    optimizer's first step create. Later collections walk only what training makes since; the
    collector still runs, so the garbage of each step is still freed.

    A frozen object is never collected, so garbage it forms later (rare: the model, the modules
    and the libraries live as long as the run) waits until training ends, when the heap is
    given back to the collector.

    Args:
        after_steps: Optimizer steps after which the heap is frozen again (compilation's warm-up).
    """

    def __init__(self, after_steps: int = 2):
        super().__init__()
        self.after_steps = after_steps
        self._first_step = 0  # the global step training started (or resumed) at
        self._frozen_at = -1  # the global step of the last freeze

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_step = trainer.global_step
        self._freeze(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # counts optimizer steps: unchanged between micro-batches of one
        if step != self._frozen_at and step - self._first_step <= self.after_steps:
            self._freeze(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gc.unfreeze()

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        gc.unfreeze()

    def _freeze(self, step: int) -> None:
        # Collected first: garbage frozen would stay until the end.
        gc.collect()
        gc.freeze()
        self._frozen_at = step
