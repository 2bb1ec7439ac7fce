"""benchmarks/scaling.py: its plan, its scaling arithmetic, and a tiny end-to-end run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import scaling  # noqa: E402


def test_plan_starts_ddp_and_fsdp_with_torchrun_on_every_gpu(tmp_path):
    args = scaling.parse_args(["--out", str(tmp_path), "--gpus", "4"])
    steps = dict(scaling.plan(args, "/archs/mistral-7b"))
    assert list(steps) == ["prepare", "single", "ddp", "fsdp", "reload"]
    for name in ("ddp", "fsdp"):
        assert steps[name][1:5] == [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=4",
        ]
    for name in ("prepare", "single", "reload"):
        assert "torch.distributed.run" not in steps[name]
    job = json.loads(steps["fsdp"][-1])
    assert (job["run"], job["batch"], job["seq"], job["steps"], job["cpu"]) == (
        "fsdp",
        4,
        512,
        20,
        False,
    )
    with pytest.raises(SystemExit):
        scaling.parse_args(["--gpus", "1"])


def test_scaling_efficiency_is_per_gpu_throughput_against_one_gpu():
    def result(world: int, tokens_per_sec: float) -> dict:
        return {
            "world_size": world,
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": 1.0,
            "mfu": None,
            "peak_alloc_gib_per_rank": [10.0] * world,
            "peak_reserved_gib_per_rank": [11.0] * world,
            "model_alloc_gib_per_rank": [4.0 / world] * world,
        }

    rows = scaling.scaling_rows(
        {"single": result(1, 1000.0), "ddp": result(2, 1900.0), "fsdp": result(2, 1500.0)}
    )
    assert [(r["run"], r["tokens_per_sec_per_gpu"], r["scaling_efficiency"]) for r in rows] == [
        ("single", 1000.0, 1.0),
        ("ddp", 950.0, 0.95),
        ("fsdp", 750.0, 0.75),
    ]
    table = scaling.markdown(
        {
            "device": "x",
            "arch": "a",
            "compute": "bf16",
            "r": 8,
            "batch": 4,
            "seq": 512,
            "steps": 20,
            "warmup": 5,
            "command": "c",
        },
        rows,
        None,
    )
    assert (
        "| ddp | 2 | 1900 | 950 | 95.0% |" in table and "| 2.00 / 2.00 | 10.00 / 10.00 |" in table
    )


@pytest.mark.slow
def test_tiny_run_on_the_cpu(tmp_path):
    """Single process, DDP and FSDP over gloo, and the FSDP adapter reloaded in one process."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scaling.py"),
            "--tiny",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "1",
            "--seq",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (
        proc.stdout[-2000:] + (tmp_path / "scaling.log").read_text()[-4000:]
    )
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["run"], r["gpus"]) for r in report["rows"]] == [
        ("single", 1),
        ("ddp", 2),
        ("fsdp", 2),
    ]
    assert all(r["tokens_per_sec"] > 0 for r in report["rows"])
    # fp32 on the CPU: the sharded model and the reloaded adapter compute the same logits.
    assert report["reload"]["same"] and report["reload"]["max_abs_diff"] < 1e-4
