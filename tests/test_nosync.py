"""On a GPU, a training step makes the host wait for the GPU only where it cannot be avoided.

Each wait drains the GPU's queue and leaves it idle while the host prepares the next work
(the optimizer's launches, Lightning's hooks, the next batch). CUDA's synchronizing calls are
counted with torch's sync debug mode over steady-state optimizer steps of the real path: pinned
batches, unpadded or padded on the right, carrying their host-side counts (as the DataModules make
them), SFTModule on a 4-bit base with compiled layers, PerfMonitor, TensorBoard logging.

Neither transformers' mask building (its checks for packed sequences and for padding, answered on
the host: ``qlora_lightning.speed.masks``) nor the chunked loss (its labelled positions, found on
the batch's host copy) waits. An optimizer that cannot skip a step on the GPU needs the host's
decision: one wait per optimizer step.
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
from torch.utils.data import DataLoader

from qlora_lightning import PerfMonitor
from qlora_lightning.speed.optim import AdamW8bit
from tests.conftest import sft_module, tiny_spec

pytestmark = pytest.mark.gpu

FIRST, LAST = 3, 6  # optimizer steps watched (after compilation and allocator warm-up)
WATCHED = LAST - FIRST + 1


class SyncCounter(Callback):
    """Where the synchronizing CUDA calls from the start of step FIRST to the end of step LAST came
    from."""

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
        if trainer.global_step == LAST + 1 and self._catcher:
            self._catcher.__exit__(None, None, None)
            torch.cuda.set_sync_debug_mode("default")
            self._catcher = False  # done: never again
            calls = [
                f"{w.filename}:{w.lineno}: {linecache.getline(w.filename, w.lineno).strip()}"
                for w in self._records
                if "synchroniz" in str(w.message)
            ]
            # Switching the mode itself was seen to warn once, on a process's first switch.
            self.calls = [call for call in calls if "set_sync_debug_mode" not in call]


def _batches(n: int, padded: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 512, (2, 64), generator=g)
        mask = torch.ones_like(ids)
        if padded:  # the second row is 16 tokens shorter, padded on the right
            mask[1, -16:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
                "num_real_tokens": int(mask.sum()),
                "num_examples": 2,
            }
        )
    return out


def _sync_calls(
    optimizer, checkpointing, cpu_embeddings: bool, loss_chunk_size, tmp_path, padded: bool = False
) -> list[str]:
    base = dataclasses.replace(tiny_spec(), compute_dtype="bfloat16", cpu_embeddings=cpu_embeddings)
    module = sft_module(
        base=base,
        optimizer=optimizer,
        gradient_checkpointing=checkpointing,
        loss_chunk_size=loss_chunk_size,
    )
    counter = SyncCounter()
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=LAST + 2,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[PerfMonitor(warmup_steps=1), counter],
    )
    trainer.fit(
        module,
        train_dataloaders=DataLoader(_batches(LAST + 2, padded), batch_size=None, pin_memory=True),
    )
    return counter.calls


def _by_file(calls: list[str]) -> dict[str, int]:
    return dict(collections.Counter(call.split(":")[0].rsplit("/", 1)[-1] for call in calls))


FUSED = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)


@pytest.mark.parametrize("checkpointing,cpu_embeddings", [(True, False), ("offload", True)])
def test_a_step_with_fused_adamw_never_waits(checkpointing, cpu_embeddings, tmp_path):
    calls = _sync_calls(FUSED, checkpointing, cpu_embeddings, None, tmp_path)
    assert calls == [], collections.Counter(calls)


def test_the_chunked_loss_never_waits(tmp_path):
    calls = _sync_calls(FUSED, "offload", True, 16, tmp_path)
    assert calls == [], collections.Counter(calls)


def test_a_padded_batch_never_waits(tmp_path):
    calls = _sync_calls(FUSED, "offload", True, 16, tmp_path, padded=True)
    assert calls == [], collections.Counter(calls)


def test_a_step_with_8bit_adamw_waits_once_for_the_nonfinite_check(tmp_path):
    calls = _sync_calls(functools.partial(AdamW8bit, lr=1e-3), True, False, None, tmp_path)
    assert _by_file(calls) == {"base.py": WATCHED}, collections.Counter(calls)
