"""``--profile``: the GPU kernels of a job's last measured steps, by kind of kernel."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from harness import Job


PROFILED_STEPS = 2
# Kernel name fragments -> what the time went to, first match wins (cuBLAS/CUTLASS GEMMs have many
# names).
KERNEL_KINDS = [
    ("copy to/from host", ("memcpy htod", "memcpy dtoh", "memcpy htoh")),
    ("4-bit dequantize", ("dequantize",)),
    ("optimizer", ("optimizer", "koptimizer")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")),
    ("compiled (Triton)", ("triton",)),
    ("cross-entropy", ("softmax", "nll", "cross_entropy")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next(
        (kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)),
        "other (eager kernels)",
    )


def kernel_breakdown(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """GPU time per step by kind of kernel, from (name, start_us, duration_us) of the profiled
    steps.

    ``gpu_busy`` is the kernels' summed time over the span from the first start to the last end:
    well under 1 means the GPU waits for the host to launch work.
    """
    per_kind: dict[str, float] = {}
    for name, _, duration in kernels:
        kind = kernel_kind(name)
        per_kind[kind] = per_kind.get(kind, 0.0) + duration / 1e3 / steps
    span = max(s + d for _, s, d in kernels) - min(s for _, s, _ in kernels) if kernels else 0.0
    busy = sum(d for _, _, d in kernels)
    return {
        "ms_per_step": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
        "kernels_per_step": len(kernels) / steps,
        "gpu_busy": busy / span if span else None,
    }


class StepProfiler:
    """Records the GPU kernels of the last ``PROFILED_STEPS`` optimizer steps of a job
    (``--profile``).

    ``step()`` is called after every optimizer step; ``result()`` is the breakdown, and the
    slowest kernels are printed to the job's log.
    """

    def __init__(self, job: Job):
        import torch

        self.enabled = (
            job.profile or job.profile_host or job.trace_dir
        ) and torch.cuda.is_available()
        self.host, self.job = job.profile_host, job
        self.steps_before = job.warmup + job.steps - PROFILED_STEPS
        self.done = 0
        if self.enabled:
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if self.host or job.trace_dir:  # a trace shows what the host ran while the GPU waited
                activities.append(torch.profiler.ProfilerActivity.CPU)
            # Python frames in a host trace say which module's code launches what.
            self.prof = torch.profiler.profile(
                activities=activities, with_stack=bool(self.host and job.trace_dir)
            )

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
        name = re.sub(
            r"[^A-Za-z0-9._-]",
            "-",
            f"{self.job.arch}_{self.job.shape}_{self.job.variant}_r{self.job.round}",
        )
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
        events = [
            e
            for e in self.prof.events()
            if e.device_type.name == "CUDA" and not e.is_user_annotation
        ]
        print(
            self.prof.key_averages().table(sort_by="self_device_time_total", row_limit=25),
            flush=True,
        )
        if self.host:  # where the host's time goes, by operator and Python-level function
            print(
                self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40),
                flush=True,
            )
        if self.job.trace_dir:
            self._export_trace(Path(self.job.trace_dir))
        return kernel_breakdown(
            [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events],
            PROFILED_STEPS,
        )
