"""``perf/offload_wait_s``: how long the compute stream waited for offloaded activations to come
back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_lightning.data import GSM8KDataModule
from qlora_lightning.run.callbacks import PerfMonitor
from qlora_lightning.speed import checkpointing
from qlora_lightning.speed.checkpointing import CopyWaits
from tests.conftest import EXAMPLES, TINY_LLAMA, sft_module, tiny_spec, tokenizer_at


def test_off_it_records_nothing_and_touches_no_device():
    waits = CopyWaits()
    start = waits.mark(stream=None)
    waits.add(start, stream=None)
    assert start is None and waits.take() == []


@pytest.mark.gpu
def test_it_times_the_wait_for_the_side_stream_and_only_that():
    waits, compute, side = CopyWaits(), torch.cuda.current_stream(), torch.cuda.Stream()
    waits.enabled = True
    torch.cuda._sleep(50_000_000)  # the clock ramps up: a sleep kernel counts cycles, not seconds
    torch.cuda.synchronize()
    # A sleep on the side stream, timed there, which the compute stream then waits for.
    begin, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(side):
        begin.record(side)
        torch.cuda._sleep(50_000_000)
        ready.record(side)
    start = waits.mark(compute)
    compute.wait_event(ready)
    waits.add(start, compute)
    # Nothing to wait for: the side stream is idle by now.
    torch.cuda.synchronize()
    start = waits.mark(compute)
    compute.wait_event(ready)
    waits.add(start, compute)
    slept, idle = waits.take()
    torch.cuda.synchronize()
    asleep = begin.elapsed_time(ready) / 1e3
    assert 0.8 * asleep < CopyWaits.seconds([slept]) < 1.1 * asleep
    assert CopyWaits.seconds([idle]) < 0.05 * asleep


@pytest.mark.gpu
def test_perf_monitor_logs_the_waits_of_offloaded_training(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    # The tiny model's layer inputs are kilobytes.
    monkeypatch.setattr(checkpointing, "MIN_OFFLOAD_BYTES", 0)
    module = sft_module(
        base=dataclasses.replace(tiny_spec(), compute_dtype="bfloat16", compile_layers=False),
        gradient_checkpointing="offload_halves",
    )
    data = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=8,
        batch_size=2,
    )
    monitor = PerfMonitor(warmup_steps=1)
    Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[monitor],
    ).fit(module, datamodule=data)
    waits = [s["perf/offload_wait_s"] for s in monitor.steps]
    assert len(waits) == len(monitor.steps) == 3 and all(
        0 <= w < s["perf/step_time_s"] for w, s in zip(waits, monitor.steps)
    )
