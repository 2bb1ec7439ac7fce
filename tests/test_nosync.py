"""On a GPU, a training step does not make the host wait for the GPU.

Each wait drains the GPU's queue and leaves it idle while the host prepares the next work
(the optimizer's launches, Lightning's hooks, the next batch). CUDA's synchronize calls are
counted with torch's sync debug mode over steady-state optimizer steps of the real path:
DataModule, SFTModule on a 4-bit base, PerfMonitor, TensorBoard logging.
"""

import collections
import dataclasses
import functools
import linecache
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from qlora_lightning import GSM8KDataModule, PerfMonitor
from qlora_lightning.optim import AdamW8bit
from tests.conftest import EXAMPLES, TINY_LLAMA, sft_module, tiny_spec, tokenizer_at

pytestmark = pytest.mark.gpu

FIRST, LAST = 3, 6  # optimizer steps watched (after compilation and allocator warm-up)


class SyncCounter(Callback):
    """Counts the synchronizing CUDA calls made from the start of step FIRST to the end of step LAST."""

    def __init__(self):
        self.calls: list[str] = []
        self._catcher = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == FIRST and self._catcher is None:
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == LAST + 1 and self._catcher is not None and not self.calls:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self.calls = [f"{w.filename}:{w.lineno}: {linecache.getline(w.filename, w.lineno).strip()}"
                          for w in self._records if "synchroniz" in str(w.message)] or ["none"]


def _fit(optimizer, checkpointing, cpu_embeddings: bool, tmp_path) -> list[str]:
    module = sft_module(base=dataclasses.replace(tiny_spec(), compute_dtype="bfloat16", cpu_embeddings=cpu_embeddings),
                        optimizer=optimizer, gradient_checkpointing=checkpointing, loss_chunk_size=16)
    data = GSM8KDataModule(path=str(EXAMPLES / "gsm8k_train.jsonl"), tokenizer=tokenizer_at(TINY_LLAMA),
                           num_samples=20, batch_size=2)
    counter = SyncCounter()
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=LAST + 2,
                      logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path), callbacks=[PerfMonitor(warmup_steps=1), counter])
    trainer.fit(module, datamodule=data)
    return [c for c in counter.calls if c != "none"]


@pytest.mark.parametrize("checkpointing,cpu_embeddings", [(True, False), ("offload", True)])
def test_a_step_with_fused_adamw_never_waits_for_the_gpu(checkpointing, cpu_embeddings, tmp_path):
    fused = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)
    calls = _fit(fused, checkpointing, cpu_embeddings, tmp_path)
    assert not calls, collections.Counter(calls)


def test_a_step_with_8bit_adamw_waits_once_for_the_nonfinite_check(tmp_path):
    calls = _fit(functools.partial(AdamW8bit, lr=1e-3), True, False, tmp_path)
    assert len(calls) == LAST - FIRST + 1, collections.Counter(calls)
