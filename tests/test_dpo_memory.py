"""The DPO memory benchmark runs end to end (tiny dims, CPU): every variant, one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "dpo_memory.py"),
            "--tiny",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--seq",
            "32",
            "--out",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "dpo_memory.json").read_text())


@pytest.mark.slow
def test_dpo_memory_benchmark_tiny_dry_run(tmp_path):
    proc, report = _run(tmp_path)
    assert [r["variant"] for r in report["results"]] == [
        "sft",
        "dpo",
        "dpo_precomputed",
        "orpo",
        "simpo",
        "kto",
    ]
    for result in report["results"]:
        assert (
            "status" not in result and result["measured_steps"] == 1 and result["step_time_s"] > 0
        )
    assert [r["sequences_per_step"] for r in report["results"]] == [1, 2, 2, 2, 2, 2]
    assert [r["kl_sequences_per_step"] for r in report["results"]] == [0, 0, 0, 0, 0, 2]
    assert "dpo_precomputed" in proc.stdout  # the printed table
    assert any(line.split()[:2] == ["kto", "2+2"] for line in proc.stdout.splitlines())


@pytest.mark.slow
def test_dpo_memory_benchmark_runs_the_variants_asked_in_their_order(tmp_path):
    _, report = _run(tmp_path, "--variants", "kto", "sft", "kto")
    assert [r["variant"] for r in report["results"]] == ["kto", "sft"]
    assert all("status" not in r and r["step_time_s"] > 0 for r in report["results"])
