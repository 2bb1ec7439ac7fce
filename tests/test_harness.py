"""benchmarks/harness.py: which jobs one command runs, and who runs each of them."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402

ARGS = ["--archs", "mistral-7b", "llama-2-7b", "--shapes", "1x512", "8x1024", "--variants", "default", "eager"]


def _plan(tmp_path, *extra: str):
    return harness.plan(harness.parse_args([*ARGS, *extra]), tmp_path)


def test_each_shape_runs_the_baseline_first_then_the_project_variants(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)  # no Unsloth here
    jobs = _plan(tmp_path)
    assert [(j.arch, j.shape, j.variant) for j in jobs[:3]] == [
        ("mistral-7b", "1x512", "hf_peft"), ("mistral-7b", "1x512", "default"), ("mistral-7b", "1x512", "eager")]
    assert len(jobs) == 2 * 2 * 3
    assert {j.impl for j in jobs} <= harness.RUNNERS.keys()


def test_unsloth_runs_beside_the_baseline_when_installed_unless_told_not_to(tmp_path, monkeypatch):
    located = []
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: located.append(name) or object())
    jobs = _plan(tmp_path)
    assert located == ["unsloth"]  # found, not imported: it would patch transformers in this process
    assert [j.variant for j in jobs[:4]] == ["hf_peft", "unsloth", "default", "eager"]
    assert sum(j.impl == harness.PEER for j in jobs) == 4  # once per arch and shape
    assert harness.PEER in harness.RUNNERS
    assert not any(j.impl == harness.PEER for j in _plan(tmp_path, "--no-peer"))
    assert not any(j.impl == harness.PEER for j in _plan(tmp_path, "--tiny"))  # Unsloth needs a GPU
