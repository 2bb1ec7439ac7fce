"""The generation benchmark runs end to end (tiny dims, CPU): both servings at batch 1 and 16, one
JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_generation_benchmark_tiny_dry_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny dims: a second thread only spins
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "generation.py"),
            "--tiny",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "generation.json").read_text())
    assert [(r["model"], r["batch"]) for r in report["results"]] == [
        ("nf4+lora", 1),
        ("nf4+lora", 16),
        ("merged-bf16", 1),
        ("merged-bf16", 16),
    ]
    for row in report["results"]:
        assert row["total_s"] > row["prefill_s"] > 0 and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == row["batch"] * row["new_tokens"] / row["total_s"]
