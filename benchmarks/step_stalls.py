"""What else happened during each optimizer step of a benchmark job: the suspects for a step slower
than its neighbours (at 8x1024 one step in four or so runs 0.1-0.55 s over the median).

Per step: host seconds in Python's garbage collector; on the project's path, GPU seconds spent
waiting for offloaded activations to come back (``perf/offload_wait_s``); calls of the CUDA caching
allocator to cudaMalloc, and its retries; pinned host blocks the host allocator had to create
(cudaHostAlloc) and the seconds they took; and from ``nvidia-smi``, sampled every 50 ms beside the
job, the lowest SM clock, the highest power draw and the clock event reasons seen (power cap,
thermal).
And the host's side, from Linux's counters: the CPU seconds of the job's threads, their seconds
ready to run but waiting for a CPU (``/proc/self/task/*/schedstat``), and the seconds the
hypervisor took from the machine's CPUs (steal, ``/proc/stat``): a host that runs slow leaves the
GPU waiting for its launches.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import weakref
from datetime import datetime
from typing import Optional

# Tried in order: the names of the clock event reasons changed across drivers (R535).
SMI_FIELDS = (
    "timestamp,clocks.sm,power.draw,clocks_event_reasons.active",
    "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active",
    "timestamp,clocks.sm,power.draw",
)
SMI_PERIOD_MS = 50
# A reading's key: each thread's total nanoseconds ready to run but not running.
RUNQUEUE = "runqueue_ns"
SLOW = 1.05  # a step this many times the median step or more is listed with what happened in it

# Bits of the clock event reasons that slow the clock (not "idle" or "applications clocks").
REASONS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


class StepStalls:
    """``mark()`` at the end of every optimizer step (as the host sees it: the GPU runs at most a
    step behind); ``finish(n)`` stops measuring and gives the last n steps' records."""

    def __init__(self, on_cuda: bool):
        # in the job's process: the report's needs no Lightning
        from qlora_lightning.speed.collector import CollectorClock

        self.on_cuda = on_cuda
        self.clock = CollectorClock()
        self.clock.start()
        self.marks = [self._reading()]
        self.sampler = GpuSampler() if on_cuda else None

    def _reading(self) -> dict:
        reading = {"time": time.time(), "gc_s": self.clock.seconds, **host_reading()}
        if self.on_cuda:
            import torch

            # host_memory_stats: torch >= 2.7
            device, host = (
                torch.cuda.memory_stats(),
                getattr(torch.cuda, "host_memory_stats", dict)(),
            )
            # Microseconds.
            reading.update(
                device_mallocs=device.get("num_device_alloc", 0),
                alloc_retries=device.get("num_alloc_retries", 0),
                host_allocs=host.get("num_host_alloc", 0),
                host_alloc_s=host.get("host_alloc_time.total", 0) / 1e6,
            )
        return reading

    def mark(self) -> None:
        self.marks.append(self._reading())

    def finish(self, n: int) -> list[dict]:
        """The last ``n`` steps: each reading's difference from the one before, with the GPU samples
        between."""
        self.clock.stop()
        samples = self.sampler.stop() if self.sampler else []
        records = []
        for before, after in zip(self.marks[-n - 1 : -1], self.marks[-n:]):
            record = {
                key: round(after[key] - before[key], 4)
                for key in after
                if key not in ("time", RUNQUEUE)
            }
            if RUNQUEUE in after:
                record["host_runqueue_s"] = round(
                    runqueue_seconds(before[RUNQUEUE], after[RUNQUEUE]), 4
                )
            record.update(gpu_window(samples, before["time"], after["time"]))
            records.append(record)
        return records


def host_reading() -> dict:
    """Running totals: the process's CPU seconds and, where Linux tells, the machine's stolen
    seconds and each thread's nanoseconds waiting for a CPU (``RUNQUEUE``, by thread id)."""
    reading = {"host_cpu_s": time.process_time()}
    try:
        with open("/proc/stat") as f:
            # The "cpu" line: user nice system idle iowait irq softirq steal.
            steal = int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):  # not Linux
        return reading
    waits = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                waits[task] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended, or no schedstats
            continue
    return {**reading, "steal_s": steal / os.sysconf("SC_CLK_TCK"), RUNQUEUE: waits}


def runqueue_seconds(before: dict, after: dict) -> float:
    """Seconds the threads alive at both readings spent waiting for a CPU between them."""
    return sum(ns - before[task] for task, ns in after.items() if task in before) / 1e9


def gpu_window(samples: list[tuple], start: float, end: float) -> dict:
    """The lowest SM clock, highest power and the slowing clock event reasons of the samples in
    [start, end)."""
    inside = [s for s in samples if start <= s[0] < end]
    if not inside:
        return {}
    reasons = 0
    for sample in inside:
        reasons |= sample[3] or 0
    clocks, powers = (
        [s[1] for s in inside if s[1] is not None],
        [s[2] for s in inside if s[2] is not None],
    )
    return {
        "sm_mhz_min": min(clocks, default=None),
        "power_w_max": max(powers, default=None),
        "clock_reasons": [name for bit, name in REASONS.items() if reasons & bit],
    }


class GpuSampler:
    """``nvidia-smi`` in a loop beside the job, its CSV lines in a temporary file."""

    def __init__(self):
        # The job's GPU, cuda:0: the first of CUDA_VISIBLE_DEVICES (an index or a UUID) where it is
        # set.
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self.fields = next((f for f in SMI_FIELDS if _smi_accepts(f, self.gpu)), None)
        self.file = tempfile.TemporaryFile(mode="w+")
        self.proc = None
        if self.fields:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--query-gpu={self.fields}",
                    "--format=csv,noheader,nounits",
                    "-i",
                    self.gpu,
                    f"--loop-ms={SMI_PERIOD_MS}",
                ],
                stdout=self.file,
                stderr=subprocess.DEVNULL,
            )
            weakref.finalize(self, self.proc.terminate)  # a job that fails never calls stop()

    def stop(self) -> list[tuple]:
        """(unix time, SM MHz, watts, reasons bitmask or None) per sample."""
        if self.proc is None:
            return []
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.file.seek(0)
        return [s for s in map(parse_sample, self.file.read().splitlines()) if s]


def _smi_accepts(fields: str, gpu: str) -> bool:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", gpu],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_sample(line: str) -> Optional[tuple]:
    """``2026/11/29 08:40:01.123, 1980, 612.35, 0x0000000000000004`` -> (unix time, 1980, 612.35,
    4);
    a field the driver does not report (``[N/A]``) is None."""
    parts = [p.strip() for p in line.split(",")]
    try:
        when = datetime.strptime(
            parts[0], "%Y/%m/%d %H:%M:%S.%f"
        ).timestamp()  # local time, as time.time()
        clock, power = _number(parts[1], float), _number(parts[2], float)
        reasons = _number(parts[3], lambda text: int(text, 16)) if len(parts) > 3 else None
    except (ValueError, IndexError):
        return None  # a partial line
    return when, clock, power, reasons


def _number(text: str, parse):
    return None if text.startswith("[") else parse(text)


def slow_steps(times: list[float]) -> list[int]:
    """Indices of the steps over ``SLOW`` times the (lower) median step."""
    if not times:
        return []
    median = sorted(times)[(len(times) - 1) // 2]
    return [i for i, t in enumerate(times) if t > SLOW * median]


def stall_lines(rows: list[dict]) -> list[str]:
    """The report's lines on steps slower than 1.05x their job's median, beside that job's median
    step."""
    lines = []
    for r in rows:
        times, stalls = r.get("step_times_s") or [], r.get("step_stalls") or []
        if len(times) != len(stalls) or not times:
            continue
        slow = slow_steps(times)
        if not slow:
            continue
        median = sorted(times)[(len(times) - 1) // 2]
        typical = times.index(median)
        cells = [f"step {i + 1}: {times[i]:.3f} s ({describe(stalls[i])})" for i in slow]
        lines.append(
            f"- {r['arch']} {r['batch']}x{r['seq']} {r['variant']}: median {median:.3f} s "
            f"({describe(stalls[typical])}); slower: " + "; ".join(cells)
        )
    if not lines:
        return []
    return (
        [
            "Steps over 1.05x their job's median, with what else happened in them (GC: host "
            "seconds in Python's garbage collector; host CPU: CPU seconds of the job's threads; "
            "runqueue: their seconds waiting for a CPU; steal: seconds the hypervisor took from "
            "the machine's CPUs; copies waited for: GPU seconds the compute stream waited for "
            "offloaded activations; cudaMalloc: new device blocks; pinned: new pinned host blocks; "
            "SM MHz: lowest clock sampled; reasons: clock event reasons seen):",
            "",
        ]
        + lines
        + [""]
    )


def describe(record: dict) -> str:
    parts = [f"GC {record.get('gc_s', 0):.3f} s"]
    if "host_cpu_s" in record:
        parts.append(f"host CPU {record['host_cpu_s']:.3f} s")
    if "host_runqueue_s" in record:
        parts.append(f"runqueue {record['host_runqueue_s']:.3f} s, steal {record['steal_s']:.2f} s")
    if "offload_wait_s" in record:
        parts.append(f"copies waited for {record['offload_wait_s']:.3f} s")
    if "device_mallocs" in record:
        parts += [
            f"cudaMalloc {record['device_mallocs']:.0f}",
            f"pinned {record['host_allocs']:.0f} ({record['host_alloc_s']:.3f} s)",
        ]
        if record.get("alloc_retries"):
            parts.append(f"retries {record['alloc_retries']:.0f}")
    if "sm_mhz_min" in record:
        parts.append(f"SM {_fmt(record['sm_mhz_min'])} MHz, {_fmt(record['power_w_max'])} W")
        if record["clock_reasons"]:
            parts.append("reasons " + "+".join(record["clock_reasons"]))
    return ", ".join(parts)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"
