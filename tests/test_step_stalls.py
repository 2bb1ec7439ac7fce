"""benchmarks/step_stalls.py: what happened during each step, read from nvidia-smi's samples and
the host's counters, and the report's lines on the slow steps."""

from __future__ import annotations

import gc
import sys
import time
from datetime import datetime

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import step_stalls  # noqa: E402


def test_a_sample_line_parses_with_or_without_reasons():
    when = datetime(2026, 11, 29, 8, 40, 1, 123000).timestamp()
    assert step_stalls.parse_sample(
        "2026/11/29 08:40:01.123, 1980, 612.35, 0x0000000000000004"
    ) == (when, 1980.0, 612.35, 4)
    assert step_stalls.parse_sample("2026/11/29 08:40:01.123, 1980, 612.35") == (
        when,
        1980.0,
        612.35,
        None,
    )
    assert step_stalls.parse_sample("2026/11/29 08:40:01.123, [N/A], 612.35") == (
        when,
        None,
        612.35,
        None,
    )
    # Cut short when the sampler stopped.
    assert step_stalls.parse_sample("2026/11/29 08:40:01.1") is None


def test_gpu_window_takes_the_samples_inside_the_step():
    samples = [
        (9.9, 1000.0, 700.0, 0x4),
        (10.0, 1980.0, 500.0, 0x1),
        (10.5, 1500.0, 690.0, 0x44),
        (11.0, 900.0, 1.0, 0),
    ]
    # Idle (0x1) is not a slowdown.
    assert step_stalls.gpu_window(samples, 10.0, 11.0) == {
        "sm_mhz_min": 1500.0,
        "power_w_max": 690.0,
        "clock_reasons": ["sw_power_cap", "hw_thermal"],
    }
    assert step_stalls.gpu_window(samples, 12.0, 13.0) == {}
    unreported = step_stalls.gpu_window([(10.0, 1980.0, None, None)], 10.0, 11.0)
    assert unreported == {"sm_mhz_min": 1980.0, "power_w_max": None, "clock_reasons": []}
    assert step_stalls.describe(unreported) == "GC 0.000 s, SM 1980 MHz, n/a W"


def test_the_host_clock_counts_collections_and_cpu_seconds_per_step():
    stalls = step_stalls.StepStalls(on_cuda=False)
    stalls.mark()
    gc.collect()
    start = time.process_time()
    while time.process_time() - start < 0.05:  # a host busy for 50 ms of CPU
        pass
    stalls.mark()
    time.sleep(0.05)  # and one idle
    stalls.mark()
    quiet, busy, idle = stalls.finish(3)
    assert busy["gc_s"] > 0 and quiet["gc_s"] == idle["gc_s"] == 0
    assert busy["host_cpu_s"] >= 0.05 > idle["host_cpu_s"]
    assert step_stalls.RUNQUEUE not in busy
    if "host_runqueue_s" in busy:  # Linux with schedstats
        assert busy["host_runqueue_s"] >= 0 and busy["steal_s"] >= 0


def test_runqueue_seconds_count_only_the_threads_seen_at_both_readings():
    before = {"1": 5_000_000, "2": 9_000_000}
    after = {"1": 7_000_000, "3": 4_000_000}  # thread 2 ended, thread 3 started
    assert step_stalls.runqueue_seconds(before, after) == 0.002


def test_slow_steps_are_listed_with_what_happened_in_them():
    quiet = {
        "gc_s": 0.0,
        "device_mallocs": 0,
        "host_allocs": 0,
        "host_alloc_s": 0.0,
        "alloc_retries": 0,
        "sm_mhz_min": 1980.0,
        "power_w_max": 650.0,
        "clock_reasons": [],
    }
    busy = {
        **quiet,
        "gc_s": 0.41,
        "host_allocs": 3,
        "host_alloc_s": 0.05,
        "clock_reasons": ["sw_power_cap"],
        "host_cpu_s": 0.9,
        "host_runqueue_s": 0.12,
        "steal_s": 0.3,
    }
    row = {
        "arch": "mistral-7b",
        "batch": 8,
        "seq": 1024,
        "variant": "v",
        "step_times_s": [0.66, 1.05, 0.65],
        "step_stalls": [quiet, busy, quiet],
    }
    (line,) = [ln for ln in step_stalls.stall_lines([row]) if ln.startswith("- ")]
    assert line.startswith("- mistral-7b 8x1024 v: median 0.660 s (GC 0.000 s")
    assert (
        "step 2: 1.050 s (GC 0.410 s, host CPU 0.900 s, runqueue 0.120 s, steal 0.30 s, cudaMalloc "
        "0, pinned 3 (0.050 s), SM 1980 MHz, 650 W, reasons sw_power_cap)"
    ) in line
    assert step_stalls.stall_lines([{**row, "step_times_s": [0.66, 0.67, 0.65]}]) == []  # none slow


@pytest.mark.gpu
def test_on_a_gpu_each_step_has_the_allocators_counts_and_the_clock():
    stalls = step_stalls.StepStalls(on_cuda=True)
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):  # steps of 0.3 s: several of nvidia-smi's 50 ms samples each
        start = time.time()
        while time.time() - start < 0.3:
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
        stalls.mark()
    records = stalls.finish(3)
    assert all(
        {"device_mallocs", "host_allocs", "host_alloc_s", "sm_mhz_min", "power_w_max"} <= set(r)
        for r in records
    ), records
    assert all(r["sm_mhz_min"] > 0 for r in records), records
