"""``python -m qlora_lightning`` in a subprocess: the quickstart end to end, and bad input
answered with one ``error:`` line naming the problem, without a Python traceback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO


def run_cli(*args: str, timeout: int = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, from the repo root unless told, offline (the environment conftest
    set up)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "qlora_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quickstart_runs_end_to_end(tmp_path):
    # 20 steps of 2 micro-batches; validation every 10 micro-batches (5 steps), logs every 5 steps.
    result = run_cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "10",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "lightning_logs").glob("version_*")

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss"} <= tags, tags
    assert any(tag.startswith("perf/") for tag in tags), tags
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))

    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (
        adapter / "adapter_model.safetensors"
    ).is_file()
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 20
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_val_loss"])
    # Host time in the garbage collector, per measured step (on the CPU too).
    assert (
        summary["gc_pause_s_max"] >= 0
        and len(events.Scalars("perf/gc_pause_s")) == summary["measured_steps"]
    )


def test_quickstart_runs_from_another_directory(tmp_path):
    """Its model, tokenizer and data are named ``qlora_lightning/assets/...``: found in the
    package."""
    result = run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "lightning_logs").glob("version_*/adapter/adapter_config.json"))


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


BAD_INPUTS = {
    "unknown key": (["--model.init_args.bogus", "1"], ["bogus"]),
    "unknown model id": (
        ["--model.init_args.base.name_or_path", "nobody-xyz/no-such-model"],
        ["nobody-xyz/no-such-model"],
    ),
    "missing data file": (
        ["--data.init_args.path", "/nonexistent/rows.jsonl"],
        ["/nonexistent/rows.jsonl"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_naming_it(case, tmp_path):
    extra, needles = BAD_INPUTS[case]
    result = run_cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
        timeout=120,
    )
    _assert_one_line_error(result, *needles)


def test_checkpointing_can_be_turned_off(tmp_path):
    """``trainer.enable_checkpointing: false`` drops the checkpoint callback the CLI always adds
    (the Trainer refuses the two together)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qlora_lightning.run.cli import make_cli

    cli = make_cli(
        [
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_checkpointing=false",
        ],
        run=False,
    )
    assert not any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)
    on = make_cli(
        [
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert any(isinstance(c, ModelCheckpoint) for c in on.trainer.callbacks)
