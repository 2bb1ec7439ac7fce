"""Throughput and memory: tokens/s, samples/s, MFU and peak GPU memory, honestly measured.

Per optimizer step (all its micro-batches), with the GPU synchronized before each clock
read, the first ``warmup_steps`` steps excluded and time spent in validation left out.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from qlora_lightning.data.packing import real_tokens_and_examples

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                     "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}
_GIB = 2**30


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Datasheet bf16 peak FLOP/s for a CUDA device name, or None when unknown."""
    for key, tflops in _PEAK_BF16_TFLOPS.items():  # longer names first would matter only for "L40" vs "L4"
        if key in device_name:
            return tflops * 1e12
    return None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(matmul parameters, embedding parameters), counting 4-bit packed weights at their real size."""
    matmul = embedding = 0
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        if id(p) in embedding_weights:
            embedding += n
        else:
            matmul += n
    return matmul, embedding


def train_flops_per_token(matmul_params: int, n_layers: int, attn_dim: int, seq_len: int) -> float:
    """Model FLOPs per trained token for LoRA over frozen weights.

    Forward 2N, backward 2N (activation gradients only: frozen weights get no weight
    gradient); recomputation under checkpointing is not counted (model FLOPs, not hardware
    FLOPs). Attention scores and values add 4*L*T*d forward and twice that backward.
    """
    return 4.0 * matmul_params + 12.0 * n_layers * seq_len * attn_dim


class PerfMonitor(Callback):
    """Logs ``perf/*`` to the trainer's logger and writes a JSON run summary next to the logs.

    Args:
        warmup_steps: Optimizer steps left out of the statistics (compilation, allocator warm-up).
        peak_tflops: bf16 peak of the GPU in TFLOP/s for MFU; looked up from the device name when None.
        summary_file: File name of the JSON summary, written in the logger's directory.
    """

    def __init__(self, warmup_steps: int = 2, peak_tflops: Optional[float] = None,
                 summary_file: str = "run_summary.json"):
        super().__init__()
        self.warmup_steps, self.peak_tflops, self.summary_file = warmup_steps, peak_tflops, summary_file
        self.steps: list[dict] = []
        self._window = self._new_window()
        self._clock: Optional[float] = None
        self._train_start: Optional[float] = None
        self._train_seconds = 0.0
        self._stepped = False

    @staticmethod
    def _new_window() -> dict:
        return {"tokens": 0, "padded_tokens": 0, "samples": 0, "max_len": 0, "tainted": False}

    def _sync(self, trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def _on_cuda(self, trainer: Trainer) -> bool:
        return trainer.strategy.root_device.type == "cuda"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._on_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self._sync(trainer)
        self._clock = self._train_start = time.perf_counter()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self._stepped = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        w = self._window
        ids = batch["input_ids"]  # (B, T): B rows of examples or packs, padding included
        real, examples = real_tokens_and_examples(batch)
        w["tokens"] += real
        w["padded_tokens"] += ids.numel()
        w["samples"] += examples
        # Attention span for the FLOP count: the longest example of a padding-free row, else the row.
        w["max_len"] = max(w["max_len"], int(batch.get("max_length_q", ids.shape[1])))
        if not self._stepped:  # still accumulating micro-batches of this optimizer step
            return
        self._stepped = False
        self._sync(trainer)
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        step = trainer.global_step  # already incremented by this optimizer step
        if step > self.warmup_steps and not w["tainted"]:
            self._record(trainer, pl_module, w, seconds)
        self._window = self._new_window()

    def _record(self, trainer: Trainer, pl_module: LightningModule, w: dict, seconds: float) -> None:
        world = trainer.world_size
        metrics = {
            "perf/step_time_s": seconds,
            "perf/tokens_per_sec": w["tokens"] * world / seconds,
            "perf/padded_tokens_per_sec": w["padded_tokens"] * world / seconds,
            "perf/samples_per_sec": w["samples"] * world / seconds,
            "perf/real_token_fraction": w["tokens"] / max(w["padded_tokens"], 1),
        }
        flops = self._flops_per_token(pl_module, w["max_len"])
        peak = self._peak_flops(trainer)
        if flops and peak:
            # Padded tokens are computed too, but only real tokens count as useful work.
            metrics["perf/mfu"] = flops * w["tokens"] / seconds / peak
        if self._on_cuda(trainer):
            device = trainer.strategy.root_device
            metrics["perf/peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / _GIB
            metrics["perf/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / _GIB
        self.steps.append(metrics)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def _flops_per_token(self, pl_module: LightningModule, seq_len: int) -> Optional[float]:
        model = getattr(pl_module, "model", None)
        config = getattr(model, "config", None)
        if config is None:
            return None
        if not hasattr(self, "_matmul_params"):
            self._matmul_params = count_params(model)[0]
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        return train_flops_per_token(self._matmul_params, config.num_hidden_layers, heads * head_dim, seq_len)

    def _peak_flops(self, trainer: Trainer) -> Optional[float]:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        if self._on_cuda(trainer):
            return peak_bf16_flops(torch.cuda.get_device_name(trainer.strategy.root_device))
        return None

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training:
            self._window["tainted"] = True  # validation ran inside this step's wall time

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training:
            self._sync(trainer)
            self._clock = time.perf_counter()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)
        self._train_seconds = time.perf_counter() - (self._train_start or time.perf_counter())
        if trainer.is_global_zero:
            self.write_summary(trainer, pl_module)

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The run in one JSON-friendly dict: what ran, how fast, how much memory, final losses."""
        def median(key: str) -> Optional[float]:
            values = [s[key] for s in self.steps if key in s]
            return statistics.median(values) if values else None

        on_cuda = self._on_cuda(trainer)
        device = trainer.strategy.root_device
        not_measured = "not measured (CPU run)"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        datamodule = trainer.datamodule
        return {
            "model": pl_module.describe() if hasattr(pl_module, "describe") else type(pl_module).__name__,
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "optimizer_steps": trainer.global_step,
            "measured_steps": len(self.steps),
            "train_time_s": self._train_seconds,
            "tokens_per_sec": median("perf/tokens_per_sec"),
            "padded_tokens_per_sec": median("perf/padded_tokens_per_sec"),
            "samples_per_sec": median("perf/samples_per_sec"),
            "step_time_s": median("perf/step_time_s"),
            "mfu": median("perf/mfu"),
            "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / _GIB if on_cuda else not_measured,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB if on_cuda else not_measured,
            "final_train_loss": metrics.get("train/loss"),
            "final_val_loss": metrics.get("val/loss"),
        }

    def write_summary(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write the summary JSON in the log directory and return its path."""
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.summary_file
        path.write_text(json.dumps(self.summary(trainer, pl_module), indent=2, default=str) + "\n")
        log.info("run summary: %s", path)
        return path
