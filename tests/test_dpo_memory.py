"""The DPO memory benchmark runs end to end (tiny dims, CPU): every variant, one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_dpo_memory_benchmark_tiny_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dpo_memory.py"), "--tiny", "--steps", "1",
                           "--warmup", "1", "--seq", "32", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "dpo_memory.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["sft", "dpo", "dpo_precomputed", "orpo", "simpo"]
    for result in report["results"]:
        assert "status" not in result and result["measured_steps"] == 1 and result["step_time_s"] > 0
    assert [r["sequences_per_step"] for r in report["results"]] == [1, 2, 2, 2, 2]
    assert "dpo_precomputed" in proc.stdout  # the printed table
