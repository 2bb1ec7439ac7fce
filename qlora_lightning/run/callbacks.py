"""Throughput and memory: tokens/s, samples/s, MFU and peak GPU memory, honestly measured.

Per optimizer step (all its micro-batches), timed on the GPU between events recorded at the
ends of consecutive steps, the first ``warmup_steps`` steps excluded and time spent in
validation left out. A step's figures are read one step late, when its events are behind the
work already queued: measuring never makes the host wait for the GPU (which would leave the GPU
idle while the host prepares the next step, and slow the run it measures).
Under DDP or FSDP the counts are the sums of what each rank processed (all-gathered each
step, not one rank's multiplied by the world size) and peak memory is reported per rank.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from qlora_lightning.data.packing import real_tokens_and_examples
from qlora_lightning.speed.checkpointing import COPY_WAITS
from qlora_lightning.speed.collector import CollectorClock
from qlora_lightning.speed.lagged import Mark, copy_to_host

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "T4": 65.0,
    "V100": 125.0,
}
_GIB = 2**30


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Datasheet bf16 peak FLOP/s for a CUDA device name, or None when unknown."""
    for (
        key,
        tflops,
    ) in _PEAK_BF16_TFLOPS.items():  # longer names first would matter only for "L40" vs "L4"
        if key in device_name:
            return tflops * 1e12
    return None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(matmul parameters, embedding parameters), read from the layers' shapes.

    Shapes, not parameters: a packed 4-bit weight holds two values per byte, and under FSDP a
    rank's parameters are flat shards. A head tied to the embedding counts in both: its matmul
    is real work. Norm weights and biases (no matmul) are left out.
    """
    matmul = embedding = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit and LoRA's A/B included
            matmul += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Embedding):
            embedding += module.num_embeddings * module.embedding_dim
    return matmul, embedding


def train_flops_per_token(matmul_params: int, n_layers: int, attn_dim: int, span: float) -> float:
    """Model FLOPs per trained token for LoRA over frozen weights.

    Forward 2N, backward 2N (activation gradients only: frozen weights get no weight
    gradient); recomputation under checkpointing is not counted (model FLOPs, not hardware
    FLOPs). Attention scores and values add 4*L*S*d forward and twice that backward, where S is
    the ``span`` each token attends to (``attended_positions``).
    """
    return 4.0 * matmul_params + 12.0 * n_layers * span * attn_dim


def attended_positions(config, seq_len: int) -> float:
    """Positions one token attends to, averaged over the layers: the sequence, or a sliding window.

    Model FLOPs count only this useful work, also where a kernel computes the blocks that the
    window masks out (sdpa with a dense mask): otherwise MFU would rise with wasted work.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return float(seq_len)
    # Models that mix layer types name them (Gemma 2/3); others slide in every layer (Mistral).
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    spans = [min(seq_len, window) if kind == "sliding_attention" else seq_len for kind in types]
    return sum(spans) / len(spans)


def all_ranks(trainer: Trainer, values: list[float]) -> torch.Tensor:
    """(world size, len(values)) CPU float64 tensor: ``values`` of every rank, in rank order.

    One all-gather; every rank must call it at the same point. Without a process group
    (one device) it is this rank's row alone.
    """
    local = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(local).reshape(-1, len(values)).cpu()


def peak_memory_metrics(alloc_gib: torch.Tensor, reserved_gib: torch.Tensor) -> dict[str, float]:
    """``perf/peak_{alloc,reserved}_gib`` (the largest rank) and, over several ranks, one per
    rank."""
    metrics = {
        "perf/peak_alloc_gib": alloc_gib.max().item(),
        "perf/peak_reserved_gib": reserved_gib.max().item(),
    }
    if len(alloc_gib) > 1:
        for rank, (alloc, reserved) in enumerate(zip(alloc_gib.tolist(), reserved_gib.tolist())):
            metrics[f"perf/peak_alloc_gib_rank{rank}"] = alloc
            metrics[f"perf/peak_reserved_gib_rank{rank}"] = reserved
    return metrics


class PerfMonitor(Callback):
    """Logs ``perf/*`` to the trainer's logger and writes a JSON run summary next to the logs.

    Args:
        warmup_steps: Optimizer steps left out of the statistics (compilation, allocator warm-up),
            at the start of every process: a resumed run warms up again.
        peak_tflops: bf16 peak of the GPU in TFLOP/s for MFU; looked up from the device name when
            None.
        summary_file: File name of the JSON summary, written in the logger's directory.
        offload_waits: Time the GPU's waits for offloaded activations (``perf/offload_wait_s``): two
            CUDA events per activation brought back, a few microseconds of host time each. Under
            ``offload_all`` at small batches, where hundreds come back per step and the host sets
            the pace, that may be a few milliseconds a step (an estimate; not measured yet).
    """

    def __init__(
        self,
        warmup_steps: int = 2,
        peak_tflops: Optional[float] = None,
        summary_file: str = "run_summary.json",
        offload_waits: bool = True,
    ):
        super().__init__()
        self.warmup_steps, self.peak_tflops, self.summary_file = (
            warmup_steps,
            peak_tflops,
            summary_file,
        )
        self.offload_waits = offload_waits
        self.steps: list[dict] = []
        self._window = self._new_window()
        self._start: Optional[Mark] = None  # the end of the previous step
        # Measured steps not yet recorded.
        self._pending: deque[tuple[int, dict, Mark, Mark]] = deque()
        self._train_start: Optional[float] = None
        self._train_seconds = 0.0
        # Training time of the run before it was resumed (from the checkpoint)
        self._earlier_seconds = 0.0
        # The step training started from in this process (a resumed run's: the checkpoint's)
        self._first_step = 0
        self._trainer: Optional[Trainer] = None  # for state_dict, which Lightning calls without it
        self._stepped = False
        # (world, 3) GiB, gathered at the end of training.
        self._peaks_per_rank: Optional[torch.Tensor] = None
        # The model (weights, adapter) once the strategy placed it.
        self._start_alloc_gib: Optional[float] = None
        self._collector = CollectorClock()  # host time in Python's garbage collector (collector.py)
        self._gc_seconds = 0.0  # its reading at the end of the previous step

    @staticmethod
    def _new_window() -> dict:
        return {
            "tokens": 0,
            "padded_tokens": 0,
            "samples": 0,
            "max_len": 0,
            "tainted": False,
            "gc_s": 0.0,
            "copy_waits": [],
        }

    def _sync(self, trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def _on_cuda(self, trainer: Trainer) -> bool:
        return trainer.strategy.root_device.type == "cuda"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        """The steps measured so far and the training time, so that a resumed run's summary covers
        the whole run.

        The step just measured is recorded first (its end event is behind the work the checkpoint
        already waited for): the resumed run starts after it and would never measure it. Every rank
        saves checkpoints, so the all-gather in ``_record`` is reached by all.
        """
        while self._pending:
            self._record(self._trainer, *self._pending.popleft())
        running = time.perf_counter() - self._train_start if self._train_start is not None else 0.0
        return {"steps": list(self.steps), "train_seconds": self._earlier_seconds + running}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])
        self._earlier_seconds = state_dict["train_seconds"]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._on_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            # Before any activation or optimizer state: what the weights take (per shard under
            # FSDP).
            self._start_alloc_gib = torch.cuda.memory_allocated(trainer.strategy.root_device) / _GIB
        self._sync(trainer)
        self._collector.start()
        COPY_WAITS.enabled = self.offload_waits and self._on_cuda(trainer)
        self._gc_seconds = self._collector.seconds
        self._train_start = time.perf_counter()
        self._first_step = trainer.global_step
        self._start = Mark(trainer.strategy.root_device)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer
    ) -> None:
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        w = self._window
        ids = batch["input_ids"]  # (B, T): B rows of examples or packs, padding included
        real, examples = real_tokens_and_examples(batch)
        w["tokens"] = w["tokens"] + real  # a device tensor when counted from a mask: summed there
        w["padded_tokens"] += ids.numel()
        w["samples"] += examples
        # Attention span for the FLOP count: the longest example of a padding-free row, else the
        # row.
        w["max_len"] = max(w["max_len"], int(batch.get("max_length_q", ids.shape[1])))
        if not self._stepped:  # still accumulating micro-batches of this optimizer step
            return
        self._stepped = False
        if isinstance(w["tokens"], torch.Tensor):
            w["tokens"] = copy_to_host(w["tokens"])
        w["gc_s"], self._gc_seconds = (
            self._collector.seconds - self._gc_seconds,
            self._collector.seconds,
        )
        w["copy_waits"] = COPY_WAITS.take()
        end = Mark(trainer.strategy.root_device)
        step = trainer.global_step  # already incremented by this optimizer step
        if step > self._first_step + self.warmup_steps and not w["tainted"]:
            assert self._start is not None  # marked in on_train_start
            self._pending.append((step, w, self._start, end))
        self._start, self._window = end, self._new_window()
        # The step before: its end is behind the work just queued, so waiting for it keeps the GPU
        # busy.
        while len(self._pending) > 1:
            self._record(trainer, *self._pending.popleft())

    def _record(self, trainer: Trainer, step: int, w: dict, start: Mark, end: Mark) -> None:
        # Ranks see different examples (and, with packing or dynamic padding, different token
        # counts): add up what each really processed. The step lasts as long as its slowest rank.
        seconds = end.seconds_since(start)
        peaks = self._peak_memory_gib(trainer)
        values = [int(w["tokens"]), w["padded_tokens"], w["samples"], seconds, *peaks]
        ranks = (
            all_ranks(trainer, values)
            if trainer.world_size > 1
            else torch.tensor([values], dtype=torch.float64)
        )
        tokens, padded_tokens, samples = ranks[:, :3].sum(dim=0).tolist()
        seconds = ranks[:, 3].max().item()
        metrics = {
            "perf/step_time_s": seconds,
            "perf/tokens_per_sec": tokens / seconds,
            "perf/padded_tokens_per_sec": padded_tokens / seconds,
            "perf/samples_per_sec": samples / seconds,
            "perf/real_token_fraction": tokens / max(padded_tokens, 1),
            # This rank's host seconds in the garbage collector during the step: a stall the GPU
            # likely waited out, when a step is slower than its neighbours.
            "perf/gc_pause_s": w["gc_s"],
        }
        if w["copy_waits"]:  # the step's events are done: its end was waited for above
            # GPU seconds the compute stream waited for offloaded activations to come back.
            metrics["perf/offload_wait_s"] = COPY_WAITS.seconds(w["copy_waits"])
        flops = self._flops_per_token(trainer.lightning_module, w["max_len"])
        peak = self._peak_flops(trainer)
        if flops and peak:
            # Padded tokens are computed too, but only real tokens count as useful work.
            metrics["perf/mfu"] = flops * tokens / seconds / (peak * trainer.world_size)
        if peaks:
            metrics.update(peak_memory_metrics(ranks[:, 4], ranks[:, 5]))
        self.steps.append(metrics)
        # Straight to the loggers: LightningModule.log would turn each float into a GPU tensor,
        # a copy that waits for the GPU.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _peak_memory_gib(self, trainer: Trainer) -> list[float]:
        """[allocated, reserved] peak GiB of this rank's GPU so far; [] on the CPU."""
        if not self._on_cuda(trainer):
            return []
        device = trainer.strategy.root_device
        return [
            torch.cuda.max_memory_allocated(device) / _GIB,
            torch.cuda.max_memory_reserved(device) / _GIB,
        ]

    def _flops_per_token(self, pl_module: LightningModule, seq_len: int) -> Optional[float]:
        model = getattr(pl_module, "model", None)
        config = getattr(model, "config", None)
        if config is None:
            return None
        if not hasattr(self, "_matmul_params"):
            self._matmul_params = count_params(model)[0]
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        return train_flops_per_token(
            self._matmul_params,
            config.num_hidden_layers,
            heads * head_dim,
            attended_positions(config, seq_len),
        )

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
            self._start = Mark(trainer.strategy.root_device)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)
        self._collector.stop()
        COPY_WAITS.enabled = False
        self._train_seconds = (
            self._earlier_seconds + time.perf_counter() - (self._train_start or time.perf_counter())
        )
        while self._pending:
            self._record(trainer, *self._pending.popleft())
        peaks = self._peak_memory_gib(trainer)
        # Every rank takes part (a collective); rank 0 writes.
        self._peaks_per_rank = (
            all_ranks(trainer, [*peaks, self._start_alloc_gib or 0.0]) if peaks else None
        )
        # A broadcast under DDP/FSDP: every rank.
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.write_summary(trainer, pl_module, directory)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._collector.stop()
        COPY_WAITS.enabled = False

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The run in one JSON-friendly dict: what ran, how fast, how much memory, final losses."""

        def median(key: str) -> Optional[float]:
            values = [s[key] for s in self.steps if key in s]
            return statistics.median(values) if values else None

        on_cuda = self._on_cuda(trainer)
        device = trainer.strategy.root_device
        not_measured = "not measured (CPU run)"
        # Allocated and reserved GiB per rank, gathered in on_train_end; this rank's alone before
        # that. A tensor wherever it is read below (on CUDA); None only where it is not.
        peaks: Any = self._peaks_per_rank
        if peaks is None and on_cuda:
            peaks = torch.tensor([[*self._peak_memory_gib(trainer), self._start_alloc_gib or 0.0]])
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        datamodule = trainer.datamodule
        return {
            "model": pl_module.describe()
            if hasattr(pl_module, "describe")
            else type(pl_module).__name__,
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
            "gc_pause_s_max": max((s["perf/gc_pause_s"] for s in self.steps), default=None),
            "offload_wait_s_max": max(
                (s["perf/offload_wait_s"] for s in self.steps if "perf/offload_wait_s" in s),
                default=None,
            ),
            "peak_alloc_gib": peaks[:, 0].max().item() if on_cuda else not_measured,
            "peak_reserved_gib": peaks[:, 1].max().item() if on_cuda else not_measured,
            "peak_alloc_gib_per_rank": peaks[:, 0].tolist() if on_cuda else not_measured,
            "peak_reserved_gib_per_rank": peaks[:, 1].tolist() if on_cuda else not_measured,
            # Allocated when training started: the weights and adapter as placed (sharded under
            # FSDP).
            "model_alloc_gib_per_rank": peaks[:, 2].tolist() if on_cuda else not_measured,
            "final_train_loss": metrics.get("train/loss"),
            "final_val_loss": metrics.get("val/loss"),
        }

    def write_summary(
        self, trainer: Trainer, pl_module: LightningModule, directory: Optional[Path] = None
    ) -> Path:
        """Write the summary JSON in ``directory`` (default: the log directory) and return its
        path."""
        directory = Path(directory or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.summary_file
        path.write_text(json.dumps(self.summary(trainer, pl_module), indent=2, default=str) + "\n")
        log.info("run summary: %s", path)
        return path
