"""benchmarks/trace_gaps.py: the GPU's idle time split into waits for the host and for the
device."""

from __future__ import annotations

import gzip
import json
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import trace_gaps  # noqa: E402


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args) -> dict:
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "ts": ts,
        "dur": dur,
        "pid": 1,
        "tid": tid,
        "args": args,
    }


def test_gaps_are_charged_to_the_host_launch_site_or_to_the_device(tmp_path, capsys):
    events = [
        _event("python_function", "qlora_lightning/model.py(10): training_step", 0, 1000),
        _event("python_function", "peft/tuners/lora/bnb.py(9): forward", 450, 100),
        _event("cpu_op", "aten::mm", 490, 20),
        _event("cuda_runtime", "cudaLaunchKernel", 150, 5, correlation=1),
        _event(
            "cuda_runtime", "cudaLaunchKernel", 500, 5, correlation=2
        ),  # after the first kernel ended
        _event(
            "cuda_runtime", "cudaLaunchKernel", 510, 5, correlation=3
        ),  # before the second ended
        _event("kernel", "gemm", 160, 20, tid=7, stream=7, correlation=1),
        _event("kernel", "dequant", 520, 20, tid=7, stream=7, correlation=2),
        _event(
            "gpu_memcpy", "Memcpy DtoD (Device -> Device)", 545, 15, tid=7, stream=7, bytes=2**20
        ),
        _event("kernel", "gemm2", 600, 20, tid=7, stream=7, correlation=3),
        _event(
            "gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 560, 38, tid=8, stream=8, bytes=2**21
        ),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    trace_gaps.main([str(path)])
    out = capsys.readouterr().out
    assert "stream 7: 4 kernels and copies, busy 0.1 ms of 0.5 ms" in out
    # Work on the compute stream, not idle.
    assert "1 x Memcpy DtoD (Device -> Device), 1.0 MiB" in out
    # 180 -> 520 us: the second kernel's launch came after the first kernel had ended.
    assert "waiting for the host 0.3 ms (1 gaps), for the device 0.0 ms" in out
    assert "0.34      1  model.py(10): training_step > bnb.py(9): forward > aten::mm" in out
    # 560 -> 600 us: launched in time, started when the side stream's copy was done.
    assert "Memcpy DtoD (Device -> Device) -> gemm2 (after a side-stream copy)" in out
