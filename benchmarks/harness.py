"""Speed and memory of QLoRA training: the project's Lightning path against plain transformers + PEFT.

For each architecture (published dims, random weights, NF4-quantized through the normal
loading path) and each batch shape, in one command:

* ``project/<variant>``: ``SFTModule`` under a Lightning ``Trainer`` (bf16-mixed) with
  ``PerfMonitor``, on fixed-length synthetic token batches; the variants switch the
  speed/memory levers (gradient checkpointing, chunked loss, Liger kernels, compiled layers);
* ``hf_peft``: the usual recipe in a plain PyTorch loop: NF4 + double quant, bf16 compute,
  LoRA r=16 alpha=32 on all linear layers, gradient checkpointing, bf16 autocast,
  bitsandbytes PagedAdamW8bit, loss from ``labels`` inside the model;
* ``unsloth``: Unsloth's ``FastLanguageModel`` in the same loop, when it is installed
  (``--no-peer`` skips it).

Every configuration runs in its own process (memory peaks cannot leak between them); the
step time is the median of ``--steps`` optimizer steps after ``--warmup`` warm-up steps, with
the GPU synchronized before each clock read. Each step's time is kept with what else happened in
it (``step_stalls.py``); the report lists the slow steps. Results go to ``<out>/harness.json``,
``harness.md`` and ``harness.png`` (when matplotlib is there), rewritten after each run.

    python benchmarks/harness.py --quick --out /tmp/bench            # one ~10-minute GPU command
    python benchmarks/harness.py --goals --archs mistral-7b --no-peer --out /tmp/goals  # its goals, met or not
    python benchmarks/harness.py --archs gemma-7b --shapes 8x1024 --variants default chunked_ce
    python benchmarks/harness.py --archs llama-2-7b --shapes 1x512 --variants default eager --repeat 3
    python benchmarks/harness.py --original --out /tmp/orig          # the original T4 experiments
    python benchmarks/harness.py --tiny --quick --out /tmp/dry       # CPU dry run, tiny dims
    python benchmarks/harness.py --report benchmarks/results/X.json  # re-render a saved run

Loss values on random weights mean nothing and are never reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_arch beside this file, also in the worker processes

from make_arch import ARCHS, write_arch  # noqa: E402
from step_stalls import SLOW, StepStalls, slow_steps, stall_lines  # noqa: E402

GIB = 2**30

# Speed/memory levers of the project's path, as overrides of SFTModule / BaseModelSpec options;
# `default` is what the project does when none is set (on a GPU: compiled layers). The Liger
# variants run eagerly, as they were first measured: compiling fuses what Liger's kernels fuse.
LEVERS = {"gradient_checkpointing": True, "loss_chunk_size": None, "liger_kernel": False, "upcast_frozen": False,
          "attn_implementation": "sdpa", "compile_layers": "auto", "compile_scope": "parts", "cpu_embeddings": False,
          "lora_dropout": 0.05, "lean_forward": False, "skip_last_recompute": True, "optimizer": "paged_adamw_8bit",
          "compiled_dequant_tokens": None, "freeze_heap": True}
LIGER = {"liger_kernel": True, "compile_layers": False}
OFFLOAD_CHUNKED = {"gradient_checkpointing": "offload", "loss_chunk_size": 1024}
LEANEST = {**LEVERS, **OFFLOAD_CHUNKED, "cpu_embeddings": True, "lora_dropout": 0.0, "lean_forward": True}
# Small batches: no recomputation, every saved activation in CPU memory.
SMALL_BATCH = {**LEANEST, "gradient_checkpointing": "offload_all", "optimizer": "adamw_8bit"}
VARIANTS: dict[str, dict] = {
    "default": LEVERS,
    "eager": {**LEVERS, "compile_layers": False},
    "upcast": {**LEVERS, "upcast_frozen": True},  # PEFT's fp32 embeddings, head and norms
    "chunked_ce": {**LEVERS, "loss_chunk_size": 1024},
    "chunked_ce+liger": {**LEVERS, "loss_chunk_size": 1024, **LIGER},
    "offload": {**LEVERS, "gradient_checkpointing": "offload"},
    "offload+chunked_ce": {**LEVERS, **OFFLOAD_CHUNKED},
    "offload+chunked_ce+cpu_embed": {**LEVERS, **OFFLOAD_CHUNKED, "cpu_embeddings": True},
    "lean_lora": {**LEVERS, "lean_forward": True},
    # LoRA dropout 0, as Unsloth runs (the baseline keeps 0.05): no dropped copy of each adapter's input.
    "nodrop": {**LEVERS, "lora_dropout": 0.0},
    # The leanest measured path (benchmarks/results/2026-11-28_session4), lean LoRA forward included.
    "offload+chunked_ce+cpu_embed+nodrop": LEANEST,
    # Optimizers that spare the step its waits for the GPU (qlora_lightning.optim):
    # bitsandbytes' 8-bit AdamW without its synchronize per tensor (the step's non-finite check
    # still waits once), and torch's fused AdamW (one kernel for every adapter tensor, skips a
    # non-finite step on the GPU; its fp32 state, 8 bytes per adapter parameter, is counted).
    "adamw8bit": {**LEVERS, "optimizer": "adamw_8bit"},
    "fused_adamw": {**LEVERS, "optimizer": "fused_adamw"},
    "offload+chunked_ce+cpu_embed+nodrop+adamw8bit": {**LEANEST, "optimizer": "adamw_8bit"},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw": {**LEANEST, "optimizer": "fused_adamw"},
    # The same with the embedding table on the GPU: no host lookup and copy per step (Mistral-7B at 8x1024:
    # 0.30 GiB more, no faster; benchmarks/results/2026-11-29_session7).
    "offload+chunked_ce+nodrop+fused_adamw": {**LEANEST, "optimizer": "fused_adamw", "cpu_embeddings": False},
    # One compiled graph per decoder layer instead of one per part (on the fastest path at 8x1024: +0.2%, noise).
    "layer_compile": {**LEVERS, "compile_scope": "layer"},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+layer_compile": {**LEANEST, "optimizer": "fused_adamw",
                                                                      "compile_scope": "layer"},
    # Each layer's last projection recomputed too (lora.skip_last_recompute off; on by default since the
    # 8x1024 measurements of 2026-11-29), and the fastest path with PEFT's own LoRA forward.
    "recompute_last": {**LEVERS, "skip_last_recompute": False},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+recompute_last": {**LEANEST, "optimizer": "fused_adamw",
                                                                       "skip_last_recompute": False},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+peft_forward": {**LEANEST, "optimizer": "fused_adamw",
                                                                     "lean_forward": False},
    "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit": SMALL_BATCH,
    # Attention and MLP checkpointed apart: o_proj's base matmul is not recomputed either.
    "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw": {**LEANEST, "optimizer": "fused_adamw",
                                                               "gradient_checkpointing": "offload_halves"},
    # The same with the embedding table on the GPU (0.24 GiB more for Mistral-7B and Llama-2-7B): no lookup on
    # the host, whose speed is the likeliest cause of Llama-2's slow rounds (2026-11-29_session13).
    "offload_halves+chunked_ce+nodrop+fused_adamw": {**LEANEST, "optimizer": "fused_adamw",
                                                     "gradient_checkpointing": "offload_halves",
                                                     "cpu_embeddings": False},
    # The fastest 8x1024 path without the qlora_lightning.FreezeHeap callback every config lists: a full
    # garbage collection that lands in a step walks every object of the run (0.35-0.52 s on Mistral-7B).
    "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw+thawed_heap": {
        **LEANEST, "optimizer": "fused_adamw", "gradient_checkpointing": "offload_halves", "freeze_heap": False},
    # The 4-bit matmuls through bitsandbytes' operator and addmm throughout (lora.compiled_dequant_tokens: 0),
    # or in the compiled graph up to 512 tokens per matmul only (the default until 2026-11-29; now any number).
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+bnb_dequant": {**LEANEST, "optimizer": "fused_adamw",
                                                                    "compiled_dequant_tokens": 0},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+dequant512": {**LEANEST, "optimizer": "fused_adamw",
                                                                   "compiled_dequant_tokens": 512},
    "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit+bnb_dequant": {**SMALL_BATCH, "compiled_dequant_tokens": 0},
    "offload+chunked_ce+flex": {**LEVERS, **OFFLOAD_CHUNKED, "attn_implementation": "flex_attention"},
    "offload+chunked_ce+flex+bnb_dequant": {**LEVERS, **OFFLOAD_CHUNKED, "attn_implementation": "flex_attention",
                                            "compiled_dequant_tokens": 0},
    "offload+chunked_ce+flex+recompute_last": {**LEVERS, **OFFLOAD_CHUNKED, "attn_implementation": "flex_attention",
                                               "skip_last_recompute": False},
    # The leanest path with flex attention (long sequences: no dense sliding-window mask).
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+flex": {**LEANEST, "optimizer": "fused_adamw",
                                                              "attn_implementation": "flex_attention"},
    "lean": {**LEVERS, **OFFLOAD_CHUNKED, **LIGER},
    "lean+flex": {**LEVERS, **OFFLOAD_CHUNKED, **LIGER, "attn_implementation": "flex_attention"},
    "no_gc": {**LEVERS, "gradient_checkpointing": False},
    "no_gc+chunked_ce+liger": {**LEVERS, "gradient_checkpointing": False, "loss_chunk_size": 1024, **LIGER},
}
# The ``optimizer`` lever's class, as the memory estimator names it.
ESTIMATED_OPTIMIZER = {"paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit", "fused_adamw": "AdamW"}
BASELINE = "hf_peft"
PEER = "unsloth"  # measured when installed, in a process of its own like every job

QUICK = {"archs": ["mistral-7b", "llama-2-7b"], "shapes": ["1x512", "8x1024"]}
# Levers measured in --quick mode, at one shape of the first arch (a whole grid does not fit 10 minutes):
# the README's path for batches of thousands of tokens (nine jobs of 45-75 s each on an H200; Unsloth adds four).
QUICK_LEVERS = {"arch": "mistral-7b", "shape": "8x1024",
                "variants": ["offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw"]}
QUICK_BUDGET_S = 540.0  # the jobs that would not fit are listed as skipped
FULL_SHAPES = ["1x512", "8x1024", "4x2048"]
LONG_SHAPES = ["1x8192", "1x16384", "1x32768"]  # Mistral only: 32k positions, sliding window 4096


@dataclass(frozen=True)
class Goal:
    """A target of the speed and memory issue for one arch and shape, on the path the README gives for it."""

    arch: str
    shape: str
    variant: str
    min_ratio: Optional[float] = None  # tokens/s over the baseline's in the same command
    min_tokens_per_sec: Optional[float] = None  # where the baseline is too slow to run beside it
    max_gib: Optional[float] = None  # peak allocated
    max_baseline_share: Optional[float] = None  # peak allocated over the baseline's

    @property
    def needs_baseline(self) -> bool:
        return self.min_ratio is not None or self.max_baseline_share is not None

    def judges(self, row: dict) -> bool:
        """Whether ``row`` ran this goal's configuration."""
        return (row["arch"], f"{row['batch']}x{row['seq']}", row["variant"]) == (self.arch, self.shape, self.variant)

    def met(self, row: dict, base: Optional[dict]) -> Optional[bool]:
        """Whether ``row`` reaches the targets, against ``base`` (its baseline row); None without the
        baseline it needs or a GPU memory peak (CPU dry runs)."""
        if (self.needs_baseline and not base) or row.get("peak_alloc_gib") is None:
            return None
        checks = [self.min_ratio is None or row["tokens_per_sec"] >= self.min_ratio * base["tokens_per_sec"],
                  self.min_tokens_per_sec is None or row["tokens_per_sec"] >= self.min_tokens_per_sec,
                  self.max_gib is None or row["peak_alloc_gib"] <= self.max_gib,
                  self.max_baseline_share is None
                  or row["peak_alloc_gib"] <= self.max_baseline_share * base["peak_alloc_gib"]]
        return all(checks)

    def target(self) -> str:
        speed = f">= {self.min_ratio}x" if self.min_ratio else f">= {self.min_tokens_per_sec:.0f} tok/s"
        memory = f"<= {self.max_gib} GiB" if self.max_gib else f"<= {self.max_baseline_share:.0%} of the baseline's"
        return f"{speed}, {memory}"


# Llama-style layers checkpoint attention and MLP apart at large batches; Gemma's table is tied to its
# head (no CPU embeddings); 1x32768 against Unsloth's 2974 tok/s in the issue (the baseline: 2433).
GOALS = [
    Goal("mistral-7b", "8x1024", "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw", min_ratio=2.0, max_gib=6.3),
    Goal("llama-2-7b", "8x1024", "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw", min_ratio=2.0, max_gib=5.7),
    Goal("mistral-7b", "1x512", "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit", min_ratio=1.5, max_gib=4.4),
    Goal("gemma-7b", "8x1024", "offload+chunked_ce+nodrop+fused_adamw", min_ratio=1.5, max_baseline_share=0.5),
    Goal("mistral-7b", "1x32768", "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+flex", min_tokens_per_sec=2974,
         max_gib=14.0),
]


@dataclass(frozen=True)
class Experiment:
    """One of the original QLoRA runs (T4, 16 GB): batch 1 x 512 tokens, accumulation 8."""

    name: str
    arch: str
    samples: int
    r: int
    t4_peak_gb: float
    t4_minutes: float


ORIGINAL = [
    Experiment("Phi-2, 1000 samples, r=16", "phi-2", 1000, 16, 6.2, 15),
    Experiment("Mistral-7B, 300 samples, r=8", "mistral-7b", 300, 8, 11.3, 20),
    Experiment("Mistral-7B, 500 samples, r=16", "mistral-7b", 500, 16, 13.1, 30),
    Experiment("Llama-2-7B, 500 samples, r=8", "llama-2-7b", 500, 8, 12.8, 28),
]


@dataclass
class Job:
    """One measured configuration, run in its own process."""

    arch: str
    batch: int
    seq: int
    impl: str  # "project", BASELINE or PEER
    variant: str  # a VARIANTS key, or BASELINE
    arch_dir: str
    r: int = 16
    alpha: int = 32
    accumulate: int = 1
    steps: int = 8
    warmup: int = 4
    experiment: Optional[str] = None
    options: dict = field(default_factory=dict)
    round: int = 0  # of --repeat
    profile: bool = False  # trace the GPU kernels of the last PROFILED_STEPS measured steps
    profile_host: bool = False  # and the host's work (a diagnostic: it slows the steps it traces)
    trace_dir: Optional[str] = None  # where the profiled steps' Chrome trace goes, gzipped (implies profile)

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq}"


# ---- worker side: one configuration, in a fresh process -----------------------------------

PROFILED_STEPS = 2
# Kernel name fragments -> what the time went to, first match wins (cuBLAS/CUTLASS GEMMs have many names).
KERNEL_KINDS = [("copy to/from host", ("memcpy htod", "memcpy dtoh", "memcpy htoh")),
                ("4-bit dequantize", ("dequantize",)), ("optimizer", ("optimizer", "koptimizer")),
                ("attention", ("flash", "fmha", "attention", "attn")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")),
                ("compiled (Triton)", ("triton",)), ("cross-entropy", ("softmax", "nll", "cross_entropy"))]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other (eager kernels)")


def kernel_breakdown(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """GPU time per step by kind of kernel, from (name, start_us, duration_us) of the profiled steps.

    ``gpu_busy`` is the kernels' summed time over the span from the first start to the last end:
    well under 1 means the GPU waits for the host to launch work.
    """
    per_kind: dict[str, float] = {}
    for name, _, duration in kernels:
        kind = kernel_kind(name)
        per_kind[kind] = per_kind.get(kind, 0.0) + duration / 1e3 / steps
    span = max(s + d for _, s, d in kernels) - min(s for _, s, _ in kernels) if kernels else 0.0
    busy = sum(d for _, _, d in kernels)
    return {"ms_per_step": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
            "kernels_per_step": len(kernels) / steps, "gpu_busy": busy / span if span else None}


class StepProfiler:
    """Records the GPU kernels of the last ``PROFILED_STEPS`` optimizer steps of a job (``--profile``).

    ``step()`` is called after every optimizer step; ``result()`` is the breakdown, and the
    slowest kernels are printed to the job's log.
    """

    def __init__(self, job: Job):
        import torch

        self.enabled = (job.profile or job.profile_host or job.trace_dir) and torch.cuda.is_available()
        self.host, self.job = job.profile_host, job
        self.steps_before = job.warmup + job.steps - PROFILED_STEPS
        self.done = 0
        if self.enabled:
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if self.host or job.trace_dir:  # a trace shows what the host ran while the GPU waited
                activities.append(torch.profiler.ProfilerActivity.CPU)
            # Python frames in a host trace say which module's code launches what.
            self.prof = torch.profiler.profile(activities=activities, with_stack=bool(self.host and job.trace_dir))

    def step(self) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.done == self.steps_before:
            self.prof.start()
        elif self.done == self.steps_before + PROFILED_STEPS:
            import torch

            torch.cuda.synchronize()
            self.prof.stop()

    def _export_trace(self, folder: Path) -> None:
        import gzip
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.job.arch}_{self.job.shape}_{self.job.variant}_r{self.job.round}")
        raw = folder / f"{name}.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()

    def result(self) -> Optional[dict]:
        if not self.enabled or self.done < self.steps_before + PROFILED_STEPS:
            return None
        # Kernels and copies only: with the host traced, annotations such as the optimizer step's
        # record_function also have a span on the GPU.
        events = [e for e in self.prof.events() if e.device_type.name == "CUDA" and not e.is_user_annotation]
        print(self.prof.key_averages().table(sort_by="self_device_time_total", row_limit=25), flush=True)
        if self.host:  # where the host's time goes, by operator and Python-level function
            print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), flush=True)
        if self.job.trace_dir:
            self._export_trace(Path(self.job.trace_dir))
        return kernel_breakdown([(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events],
                                PROFILED_STEPS)


def synthetic_batches(job: Job, vocab: int) -> list[dict]:
    """Fixed-length random-token micro-batches, every token labelled (no padding, no prompt)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = (job.warmup + job.steps) * job.accumulate
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (job.batch, job.seq), generator=g)
        # With the host-side counts that the DataModules' batches carry.
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                    "num_real_tokens": ids.numel(), "num_examples": job.batch})
    return out


def run_project(job: Job) -> dict:
    """The project's training path: SFTModule + Lightning Trainer + PerfMonitor."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader
    from transformers import AutoConfig

    import qlora_lightning
    from qlora_lightning import BaseModelSpec, FreezeHeap, LoraSpec, PerfMonitor, SFTModule

    class LoadedMemory(Callback):
        """GPU memory held once the model is built, before the optimizer state and activations."""

        def on_train_start(self, trainer, pl_module):
            self.gib = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None

    class WallClock(Callback):
        """Host wall time over the measured steps, the GPU synchronized at both ends: a check on
        PerfMonitor's median, which is timed by GPU events without synchronizing."""

        seconds = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == job.warmup and (batch_idx + 1) % job.accumulate == 0:
                self.start = self._now()

        def on_train_end(self, trainer, pl_module):
            self.seconds = self._now() - self.start

        @staticmethod
        def _now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

    class StepEnd(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % job.accumulate == 0:
                profiler.step()
                stalls.mark()

    profiler = StepProfiler(job)

    from qlora_lightning.modules.base import paged_adamw_8bit
    from qlora_lightning.optim import AdamW8bit

    OPTIMIZERS = {"paged_adamw_8bit": paged_adamw_8bit, "adamw_8bit": lambda params: AdamW8bit(params, lr=2e-4),
                  "fused_adamw": lambda params: torch.optim.AdamW(params, lr=2e-4, fused=True)}
    opts = {**LEVERS, **job.options}  # rows saved before a lever existed did not set it
    # The adapter is saved with a tokenizer at the end of fit; the shipped tiny one does, as the
    # random-weight architecture folders hold none (tokens are synthetic anyway).
    tokenizer = str(Path(qlora_lightning.__file__).parent / "assets" / "tiny-llama")
    base = BaseModelSpec(name_or_path=job.arch_dir, tokenizer=tokenizer, random_init=True,
                         liger_kernel=opts["liger_kernel"], upcast_frozen=opts["upcast_frozen"],
                         attn_implementation=opts["attn_implementation"], compile_layers=opts["compile_layers"],
                         compile_scope=opts["compile_scope"],
                         cpu_embeddings=opts["cpu_embeddings"])
    module = SFTModule(base=base, lora=LoraSpec(r=job.r, alpha=job.alpha, dropout=opts["lora_dropout"],
                                                     lean_forward=opts["lean_forward"],
                                                     skip_last_recompute=opts["skip_last_recompute"],
                                                     compiled_dequant_tokens=opts["compiled_dequant_tokens"]),
                       gradient_checkpointing=opts["gradient_checkpointing"],
                       loss_chunk_size=opts["loss_chunk_size"], warmup_ratio=0.0,
                       optimizer=OPTIMIZERS[opts["optimizer"]])
    monitor, loaded, wall = PerfMonitor(warmup_steps=job.warmup), LoadedMemory(), WallClock()
    root = tempfile.mkdtemp(prefix="bench-")
    module.adapter_dir = str(Path(root) / "adapter")
    callbacks = [monitor, loaded, wall, StepEnd()] + ([FreezeHeap()] if opts["freeze_heap"] else [])
    trainer = Trainer(accelerator="auto", devices=1, precision="bf16-mixed", max_steps=job.warmup + job.steps,
                      accumulate_grad_batches=job.accumulate, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks)
    vocab = AutoConfig.from_pretrained(job.arch_dir).vocab_size
    # Items are whole micro-batches, pinned as the DataModules' loaders pin them on a GPU.
    loader = DataLoader(synthetic_batches(job, vocab), batch_size=None, pin_memory=torch.cuda.is_available())
    stalls = StepStalls(torch.cuda.is_available())
    trainer.fit(module, train_dataloaders=loader)
    s = monitor.summary(trainer, module)
    peak = s["peak_alloc_gib"]
    return {"step_time_s": s["step_time_s"], "tokens_per_sec": s["tokens_per_sec"], "mfu": s["mfu"],
            "peak_alloc_gib": peak if isinstance(peak, float) else None,
            "peak_reserved_gib": s["peak_reserved_gib"] if isinstance(peak, float) else None,
            "loaded_gib": loaded.gib, "measured_steps": s["measured_steps"], "profile": profiler.result(),
            "wall_tokens_per_sec": job.steps * job.accumulate * job.batch * job.seq / wall.seconds,
            "step_times_s": [round(m["perf/step_time_s"], 4) for m in monitor.steps],
            # With the GPU's waits for offloaded activations (PerfMonitor's perf/offload_wait_s).
            "step_stalls": [{**record, "offload_wait_s": m.get("perf/offload_wait_s", 0.0)}
                            for record, m in zip(stalls.finish(len(monitor.steps)), monitor.steps)]}


def run_baseline(job: Job) -> dict:
    """Plain transformers + PEFT + bitsandbytes in a hand-written loop, on the same random weights."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        _checkpoint(job),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, device_map={"": str(device)}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=job.r, lora_alpha=job.alpha, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return plain_loop(model, job, device)


def run_peer(job: Job) -> dict:
    """Unsloth's own path (``FastLanguageModel``: its kernels, offloaded checkpointing), same loop and data.

    Unsloth patches transformers when imported, so this runs only in a worker process of its own.
    LoRA dropout is 0, the setting its fused LoRA kernels need (with dropout it falls back to
    slower code); the other settings are the baseline's.
    """
    import shutil

    import torch
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    import qlora_lightning

    checkpoint = Path(_checkpoint(job))
    if not (checkpoint / "tokenizer_config.json").is_file():  # it loads a tokenizer from the model folder
        for file in (Path(qlora_lightning.__file__).parent / "assets" / "tiny-llama").iterdir():
            if file.name != "config.json":
                shutil.copy(file, checkpoint / file.name)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(checkpoint), max_seq_length=job.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and ".layers." in name})
    model = FastLanguageModel.get_peft_model(model, r=job.r, lora_alpha=job.alpha, lora_dropout=0.0,
                                             target_modules=targets, bias="none",
                                             use_gradient_checkpointing="unsloth")
    return plain_loop(model, job, torch.device("cuda"))


def _checkpoint(job: Job) -> str:
    from qlora_lightning.model import BaseModelSpec, random_checkpoint

    return random_checkpoint(BaseModelSpec(name_or_path=job.arch_dir, random_init=True))


def plain_loop(model, job: Job, device) -> dict:
    """Train ``model`` (a PEFT model) in a plain PyTorch loop: bf16 autocast, PagedAdamW8bit, the model's own loss."""
    import bitsandbytes as bnb
    import torch

    from qlora_lightning.callbacks import attended_positions, count_params, peak_bf16_flops, train_flops_per_token

    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    on_cuda = device.type == "cuda"
    loaded = torch.cuda.memory_allocated() / GIB if on_cuda else None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    batches = iter(synthetic_batches(job, model.config.vocab_size))
    times, profiler, stalls = [], StepProfiler(job), StepStalls(on_cuda)
    for _ in range(job.warmup + job.steps):
        sync()
        start = time.perf_counter()
        for _ in range(job.accumulate):
            batch = {k: v.to(device) for k, v in next(batches).items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss / job.accumulate
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        profiler.step()
        stalls.mark()
    step = statistics.median(times[job.warmup:])
    tokens = job.batch * job.seq * job.accumulate
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    flops = train_flops_per_token(count_params(model)[0], config.num_hidden_layers, heads * head_dim,
                                  attended_positions(config, job.seq))
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if on_cuda else None
    return {"step_time_s": step, "tokens_per_sec": tokens / step,
            "mfu": flops * tokens / step / peak_flops if peak_flops else None,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if on_cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if on_cuda else None,
            "loaded_gib": loaded, "measured_steps": len(times) - job.warmup, "profile": profiler.result(),
            "step_times_s": [round(t, 4) for t in times[job.warmup:]], "step_stalls": stalls.finish(job.steps)}


RUNNERS = {"project": run_project, BASELINE: run_baseline, PEER: run_peer}


def worker(job_json: str) -> None:
    """Run one job and print its result as the last line, ``RESULT {json}``."""
    job = Job(**json.loads(job_json))
    try:
        result = RUNNERS[job.impl](job)
        result["status"] = "ok"
    except Exception as err:  # an OOM or a kernel failure is a result of this configuration
        import torch

        oom = isinstance(err, torch.OutOfMemoryError)
        result = {"status": "out of memory" if oom else f"error: {type(err).__name__}: {str(err)[:300]}"}
        import traceback

        traceback.print_exc()
    print("RESULT " + json.dumps(result), flush=True)


# ---- orchestrator side --------------------------------------------------------------------

def parse_shape(shape: str) -> tuple[int, int]:
    batch, seq = shape.lower().split("x")
    return int(batch), int(seq)


def plan(args: argparse.Namespace, arch_root: Path) -> list[Job]:
    """The jobs of this command, most important first (a time budget may cut the tail)."""
    def arch_dir(arch: str) -> str:
        return str(write_arch(arch, arch_root, tiny=args.tiny))

    common = {"steps": args.steps, "warmup": args.warmup, "profile": args.profile, "profile_host": args.profile_host,
              "trace_dir": args.trace}
    if args.original:
        return [Job(e.arch, 1, 512, "project", "default", arch_dir(e.arch), r=e.r, alpha=2 * e.r, accumulate=8,
                    experiment=e.name, options=VARIANTS["default"], **common) for e in ORIGINAL]
    if args.goals:
        goal_jobs = []
        for goal in GOALS:
            if args.archs and goal.arch not in args.archs:
                continue
            batch, seq = parse_shape(goal.shape)
            if goal.needs_baseline:
                goal_jobs.append(Job(goal.arch, batch, seq, BASELINE, BASELINE, arch_dir(goal.arch), **common))
            goal_jobs.append(Job(goal.arch, batch, seq, "project", goal.variant, arch_dir(goal.arch),
                                 options=VARIANTS[goal.variant], **common))
        return [replace(job, round=i) for i in range(args.repeat) for job in goal_jobs]
    archs = args.archs or (QUICK["archs"] if args.quick else list(ARCHS))
    shapes = args.shapes or (QUICK["shapes"] if args.quick else FULL_SHAPES)
    variants = args.variants or ["default"]
    jobs = []
    for arch in archs:
        arch_shapes = shapes + (LONG_SHAPES if args.long and arch == "mistral-7b" else [])
        for shape in arch_shapes:
            batch, seq = parse_shape(shape)
            names = list(variants)
            if args.quick and arch == QUICK_LEVERS["arch"] and shape == QUICK_LEVERS["shape"]:
                names += [v for v in QUICK_LEVERS["variants"] if v not in names]
            shape_jobs = []
            if not args.no_baseline:
                shape_jobs.append(Job(arch, batch, seq, BASELINE, BASELINE, arch_dir(arch), **common))
            if args.peer:
                shape_jobs.append(Job(arch, batch, seq, PEER, PEER, arch_dir(arch), **common))
            shape_jobs += [Job(arch, batch, seq, "project", v, arch_dir(arch), options=VARIANTS[v], **common)
                           for v in names]
            # Interleaved rounds: a drift of the machine falls on every configuration alike.
            jobs += [replace(job, round=i) for i in range(args.repeat) for job in shape_jobs]
    return jobs


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per configuration: the median round by tokens/s (its own step time, MFU, memory),
    with ``rounds`` and every round's tokens/s; configurations that never ran keep their first row."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["arch"], row["batch"], row["seq"], row["variant"], row.get("experiment"))
        groups.setdefault(key, []).append(row)
    merged = []
    for group in groups.values():
        ok = sorted((r for r in group if r.get("tokens_per_sec")), key=lambda r: r["tokens_per_sec"])
        if not ok:
            merged.append(group[0])
            continue
        median = ok[(len(ok) - 1) // 2]  # the lower median: a round that really ran
        merged.append({**median, "rounds": len(ok), "tokens_per_sec_rounds": [r["tokens_per_sec"] for r in ok]})
    return merged


def run_job(job: Job, timeout: float, log) -> dict:
    """Run ``job`` in a fresh Python process; its output goes to ``log``."""
    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output, result = proc.stdout + proc.stderr, None
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                break
        if result is None:
            result = {"status": f"crashed (exit {proc.returncode})"}
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        result = {"status": f"timed out after {timeout:.0f} s"}
    # A profile's tables come before the stderr.
    keep = 60000 if job.profile or job.profile_host or job.trace_dir else 6000
    log.write(f"\n===== {job.arch} {job.shape} {job.variant} =====\n{output[-keep:]}\n")
    log.flush()
    return {**asdict(job), **result, "wall_s": time.perf_counter() - start}


def device_name() -> str:
    """The GPU's name from nvidia-smi (the orchestrator itself never touches CUDA)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


# ---- report ---------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def with_estimates(rows: list[dict]) -> list[dict]:
    """Add the memory estimator's prediction of each row's peak, and its error against the measurement."""
    from transformers import AutoConfig

    from qlora_lightning.estimate import estimate_peak_memory

    out = []
    for row in rows:
        row = dict(row)
        if row.get("status") == "ok" and row["impl"] != PEER and Path(row["arch_dir"], "config.json").is_file():
            config = AutoConfig.from_pretrained(row["arch_dir"])
            # `effective_options`: what really ran, where a saved row records that it differed from the request.
            opts = row.get("effective_options") or row["options"] or VARIANTS["default"]
            baseline = row["impl"] == BASELINE
            est = estimate_peak_memory(config, batch=row["batch"], seq=row["seq"], r=row["r"],
                                       gradient_checkpointing=opts["gradient_checkpointing"],
                                       loss_chunk_size=opts["loss_chunk_size"],
                                       loss_impl="transformers" if baseline else "project",
                                       upcast_frozen=baseline or opts.get("upcast_frozen", True),
                                       liger_kernel=opts["liger_kernel"] and not baseline,
                                       attn_implementation=opts.get("attn_implementation", "sdpa"),
                                       cpu_embeddings=opts.get("cpu_embeddings", False) and not baseline,
                                       lora_dropout=0.05 if baseline else opts.get("lora_dropout", 0.05),
                                       lean_forward=opts.get("lean_forward", False) and not baseline,
                                       optimizer="PagedAdamW8bit" if baseline else ESTIMATED_OPTIMIZER[
                                           opts.get("optimizer", "paged_adamw_8bit")])
            row["estimated_peak_gib"] = est["total_gib"]
            if row.get("peak_alloc_gib"):
                row["estimate_error"] = est["total_gib"] / row["peak_alloc_gib"] - 1
        out.append(row)
    return out


def baseline_of(row: dict, rows: list[dict]) -> Optional[dict]:
    """The baseline row of ``row``'s arch and shape among ``rows``, where it ran."""
    return next((b for b in rows if b["arch"] == row["arch"] and b["batch"] == row["batch"] and b["seq"] == row["seq"]
                 and b["impl"] == BASELINE and b.get("tokens_per_sec")), None)


def goal_verdicts(rows: list[dict]) -> list[dict]:
    """Each goal whose configuration ran, measured against its target (``met``: None where the
    baseline it needs did not run); then whether any configuration ran slower or heavier than its
    baseline."""
    verdicts = []
    for goal in GOALS:
        row = next((r for r in rows if goal.judges(r) and r.get("tokens_per_sec")), None)
        if row is None:
            planned = next((r for r in rows if goal.judges(r)), None)
            if planned is not None:  # skipped for time, or failed
                verdicts.append({"goal": f"{goal.arch} {goal.shape}, {goal.variant}", "target": goal.target(),
                                 "measured": planned.get("status", "did not run"), "met": None})
            continue
        base = baseline_of(row, rows)
        measured = f"{row['tokens_per_sec']:.0f} tok/s, {_fmt(row.get('peak_alloc_gib'))} GiB"
        if base:
            measured += f" ({row['tokens_per_sec'] / base['tokens_per_sec']:.2f}x the baseline's speed"
            if None not in (row.get("peak_alloc_gib"), base.get("peak_alloc_gib")):
                measured += f", {row['peak_alloc_gib'] / base['peak_alloc_gib']:.0%} of its memory"
            measured += ")"
        slow = slow_steps(row.get("step_times_s") or [])
        if slow:  # a median its steps do not agree on
            measured += f"; {len(slow)} of its {len(row['step_times_s'])} steps over {SLOW}x their median"
        verdicts.append({"goal": f"{goal.arch} {goal.shape}, {goal.variant}", "target": goal.target(),
                         "measured": measured, "met": goal.met(row, base)})
    paired = [(r, baseline_of(r, rows)) for r in rows if r["impl"] == "project" and r.get("tokens_per_sec")]
    paired = [(r, base) for r, base in paired if base]
    if paired:
        behind = [f"{r['arch']} {r['batch']}x{r['seq']} {r['variant']}" for r, base in paired
                  if r["tokens_per_sec"] < base["tokens_per_sec"] or _heavier(r, base)]
        verdicts.append({"goal": "no configuration slower or heavier than its baseline", "target": "",
                         "measured": "; ".join(behind) or "none is", "met": not behind})
    return verdicts


def _heavier(row: dict, base: dict) -> bool:
    """Whether ``row`` peaked above its baseline (never on a CPU, where no peak is measured)."""
    return None not in (row.get("peak_alloc_gib"), base.get("peak_alloc_gib")) and (
        row["peak_alloc_gib"] > base["peak_alloc_gib"])


def goal_lines(rows: list[dict]) -> list[str]:
    """The goals table of a report, where any goal's configuration ran."""
    verdicts = goal_verdicts(rows)
    if not verdicts:
        return []
    lines = ["Goals of the speed and memory issue (baseline in the same command):", "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {v['goal']} | {v['target']} | {v['measured']} "
              f"| {'n/a' if v['met'] is None else 'yes' if v['met'] else 'NO'} |" for v in verdicts]
    return lines + [""]


def _tokens_cell(row: dict) -> str:
    """Tokens/s, and over several rounds their range: ``1290 (3 rounds, 1201-1310)``."""
    runs = row.get("tokens_per_sec_rounds") or []
    spread = f" ({len(runs)} rounds, {min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else ""
    return _fmt(row.get("tokens_per_sec"), ".0f") + spread


def markdown(meta: dict, rows: list[dict]) -> str:
    """Tables of a run: throughput and memory per configuration, or the original experiments."""
    lines = [f"# QLoRA benchmark, {meta['device']}", "",
             f"Random weights with the published dims, NF4 + double quant, bf16 compute, LoRA on all linear "
             f"layers, median of {meta['steps']} optimizer steps after {meta['warmup']} warm-up steps, each "
             f"configuration in its own process; command: `{meta['command']}`. Loss: n/a (random weights).", ""]
    if meta.get("note"):
        lines += [f"**Note.** {meta['note']}", ""]
    if any(r.get("experiment") for r in rows):
        lines += ["| experiment | peak alloc GiB | peak reserved GiB | est. GiB | step s (8 x 512 tok) "
                  "| est. training min (extrapolated) | T4 GB (original) | T4 min (original) | loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            exp = next(e for e in ORIGINAL if e.name == r["experiment"])
            minutes = r["step_time_s"] * exp.samples / r["accumulate"] / 60 if r.get("step_time_s") else None
            lines.append(f"| {exp.name} | {_fmt(r.get('peak_alloc_gib'))} | {_fmt(r.get('peak_reserved_gib'))} "
                         f"| {_fmt(r.get('estimated_peak_gib'))} | {_fmt(r.get('step_time_s'), '.3f')} "
                         f"| {_fmt(minutes, '.1f')} | {exp.t4_peak_gb} | {exp.t4_minutes} | n/a |")
        lines += ["", "Training time = measured step time x samples / 8 (one epoch), extrapolated, not run to "
                  "the end; every sample is a full 512 tokens here (the originals had shorter ones). "
                  "Not comparable 1:1 with the T4 (another GPU, another software stack).", ""]
        return "\n".join(lines)
    lines += ["| arch | shape | impl | tokens/s | x baseline | wall tokens/s | peak alloc GiB | peak reserved GiB "
              "| est. GiB | est. error | MFU | step s | status |", "|---" * 13 + "|"]
    for r in rows:
        base = baseline_of(r, rows)
        ratio = r["tokens_per_sec"] / base["tokens_per_sec"] if base and r.get("tokens_per_sec") else None
        err = r.get("estimate_error")
        lines.append(f"| {r['arch']} | {r['batch']}x{r['seq']} | {r['variant']} | {_tokens_cell(r)} "
                     f"| {_fmt(ratio)} | {_fmt(r.get('wall_tokens_per_sec'), '.0f')} "
                     f"| {_fmt(r.get('peak_alloc_gib'))} | {_fmt(r.get('peak_reserved_gib'))} "
                     f"| {_fmt(r.get('estimated_peak_gib'))} | {'n/a' if err is None else f'{err:+.0%}'} "
                     f"| {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('step_time_s'), '.3f')} "
                     f"| {r['status']}{' (' + r['note'] + ')' if r.get('note') else ''} |")
    lines += ["", "impl: `hf_peft` = plain transformers + PEFT loop (the baseline); `unsloth` = Unsloth's "
              "`FastLanguageModel` in the same loop, LoRA dropout 0 (no estimate); `default` = this project's "
              "Lightning path with its defaults (bf16 embeddings, head and norms); `upcast` = "
              "`base.upcast_frozen: true` (PEFT's fp32 upcast); `offload` = `gradient_checkpointing: offload`; "
              "`offload_all` = `gradient_checkpointing: offload_all`; "
              "`offload_halves` = `gradient_checkpointing: offload_halves`; "
              "`chunked_ce` = `model.loss_chunk_size: 1024`; `liger` = `base.liger_kernel: true` (run eagerly); "
              "`lean` = offload + chunked_ce + liger; `+flex` = `base.attn_implementation: flex_attention`; "
              "`cpu_embed` = `base.cpu_embeddings: true`; `nodrop` = `lora.dropout: 0` (the others and the baseline: "
              "0.05); `lean_lora` = `lora.lean_forward: true`; `fused_adamw` = `torch.optim.AdamW` with `fused: true` "
              "instead of paged 8-bit AdamW; `adamw8bit` = `qlora_lightning.optim.AdamW8bit` (not paged, no "
              "synchronize per tensor); `layer_compile` = `base.compile_scope: layer`; `recompute_last` = "
              "`lora.skip_last_recompute: false`; `peft_forward` = `lora.lean_forward: false`; `bnb_dequant` / "
              "`dequant512` = `lora.compiled_dequant_tokens` 0 / 512 (default: no limit); `eager` = "
              "`base.compile_layers: false` (on a GPU the default compiles each layer's parts); `no_gc` = "
              "`gradient_checkpointing: false`; `thawed_heap` = without the `qlora_lightning.FreezeHeap` callback (every other project job has it, as the configs do). "
              "Peaks are torch "
              "allocator peaks after model load (PagedAdamW8bit's paged state lives in CUDA managed memory, which "
              "they do not count). wall tokens/s: the project's measured steps over host wall time with the GPU "
              "synchronized at both ends (its tokens/s is the median step timed by GPU events).", ""]
    return "\n".join(lines + goal_lines(rows) + stall_lines(rows) + profile_lines(rows))


def profile_lines(rows: list[dict]) -> list[str]:
    """``--profile``: GPU milliseconds per optimizer step by kind of kernel, one line per configuration."""
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return []
    lines = [f"GPU time per step by kind of kernel (`--profile`, the last {PROFILED_STEPS} measured steps "
             "traced; busy = kernel time / span of the steps):", ""]
    for r in profiled:
        p = r["profile"]
        kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in p["ms_per_step"].items())
        lines.append(f"- {r['arch']} {r['batch']}x{r['seq']} {r['variant']}: busy {_fmt(p['gpu_busy'], '.0%')}, "
                     f"{p['kernels_per_step']:.0f} kernels; ms: {kinds}")
    return lines + [""]


def chart(rows: list[dict], path: Path) -> Optional[str]:
    """Tokens/s and peak memory per configuration as a PNG; returns why not when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    ok = [r for r in rows if r.get("tokens_per_sec")]
    if not ok:
        return "no successful runs: no chart"
    labels = [f"{r['arch']}\n{r['batch']}x{r['seq']}\n{r['variant']}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(ok)), 8), sharex=True)
    colors = [{BASELINE: "tab:gray", PEER: "tab:orange"}.get(r["impl"], "tab:blue") for r in ok]
    ax1.bar(range(len(ok)), [r["tokens_per_sec"] for r in ok], color=colors)
    ax1.set_ylabel("tokens/s")
    ax2.bar(range(len(ok)), [r.get("peak_alloc_gib") or 0 for r in ok], color=colors)
    ax2.set_ylabel("peak allocated GiB")
    ax2.set_xticks(range(len(ok)), labels, fontsize=7)
    ax1.set_title("grey: transformers+PEFT baseline; orange: Unsloth; blue: this project")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(out: Path, meta: dict, rows: list[dict]) -> None:
    """harness.json (raw rows of every round), harness.md (tables) and harness.png (chart) under ``out``."""
    (out / "harness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    rows = with_estimates(merge_rounds(rows))
    why = chart(rows, out / "harness.png")
    text = markdown(meta, rows) + (f"\n{why}\n" if why else "")
    (out / "harness.md").write_text(text)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QLoRA speed/memory benchmark (see the module docstring)")
    parser.add_argument("--out", default="benchmarks/results/latest", help="folder for harness.{json,md,png,log}")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS))
    parser.add_argument("--shapes", nargs="+", help="BATCHxSEQ, e.g. 1x512 8x1024")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="project-path variants (levers)")
    parser.add_argument("--quick", action="store_true", help="mistral + llama at 1x512 and 8x1024, levers once")
    parser.add_argument("--long", action="store_true", help="add Mistral at 1x8192, 1x16384, 1x32768")
    parser.add_argument("--original", action="store_true", help="the original T4 experiments' table")
    parser.add_argument("--goals", action="store_true",
                        help="the speed and memory goals, each on its path with its baseline, and a verdict for each "
                             f"(--archs: those archs' goals only; {QUICK_BUDGET_S:.0f} s unless --budget-s: "
                             "Mistral's, then Llama-2's and Gemma's, fit one 10-minute GPU command each)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers+PEFT baseline")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="skip Unsloth (measured by default when it is installed)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every configuration, interleaved; the report takes the median round")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up optimizer steps left out")
    parser.add_argument("--profile", action="store_true",
                        help=f"trace the GPU kernels of the last {PROFILED_STEPS} measured steps: GPU ms per step "
                             "by kind of kernel in harness.md (the trace costs some speed)")
    parser.add_argument("--profile-host", action="store_true",
                        help="--profile, and the host's time by operator in the log (slows the traced steps)")
    parser.add_argument("--trace", metavar="DIR",
                        help="--profile, and each job's Chrome trace of the profiled steps, gzipped, in DIR "
                             "with the host's operators (with --profile-host: its Python frames too)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"skip the jobs that would overrun this (--quick: {QUICK_BUDGET_S:.0f} unless given)")
    parser.add_argument("--arch-root", help="folder for the arch configs (reuse one to reuse its random weights)")
    parser.add_argument("--tiny", action="store_true", help="tiny dims of the same model types (CPU dry runs)")
    parser.add_argument("--report", help="re-render harness.md/png from a saved harness.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Only located, never imported here: importing it would patch transformers in this process.
    args.peer = args.peer and not args.tiny and importlib.util.find_spec("unsloth") is not None
    if (args.quick or args.goals) and args.budget_s is None:  # one 10-minute GPU command, whatever is installed
        args.budget_s = QUICK_BUDGET_S
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args.worker)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        return write_reports(Path(args.report).parent, saved["meta"], saved["rows"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Random checkpoints are cached per config *path* too: pass the folder another run used to share them.
    arch_root = Path(args.arch_root) if args.arch_root else Path(tempfile.mkdtemp(prefix="archs-"))
    jobs = plan(args, arch_root)
    meta = {"device": device_name(), "command": " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    start, rows, walls = time.perf_counter(), [], []
    with open(out / "harness.log", "w") as log:
        for i, job in enumerate(jobs):
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
            guess = walls[-1] if walls else 0.0  # the last job (the first of an arch also builds its weights)
            if left is not None and left < max(guess, 30.0):
                rows.append({**asdict(job), "status": "skipped (time budget)"})
                continue
            print(f"[{i + 1}/{len(jobs)}] {job.arch} {job.shape} {job.variant} ...", flush=True)
            row = run_job(job, timeout=left if left else 3600, log=log)
            walls.append(row["wall_s"])
            print(f"    {row['status']}  tokens/s={_fmt(row.get('tokens_per_sec'), '.0f')} "
                  f"peak={_fmt(row.get('peak_alloc_gib'))} GiB  ({row['wall_s']:.0f} s)", flush=True)
            rows.append(row)
            write_reports(out, meta, rows)
    write_reports(out, meta, rows)
    print((out / "harness.md").read_text())


if __name__ == "__main__":
    main()
