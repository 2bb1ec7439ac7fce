"""Exact resume after SIGKILL, checkpoint integrity, non-finite steps."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lightning.errors import UserError
from qlora_lightning.reliability import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
# 16 rows / batch 2 = 8 micro-batches, accumulation 2: 4 optimizer steps per epoch.
RUN = ["--config", "configs/quickstart.yaml", "--trainer.max_steps", "10", "--trainer.val_check_interval", "100",
       "--data.init_args.batch_size", "2", "--model.init_args.lora.dropout", "0.1"]


def _fit(root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qlora_lightning", "fit", *RUN, "--trainer.default_root_dir", str(root), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _adapter(root: Path, version: int) -> dict:
    return load_file(root / "lightning_logs" / f"version_{version}" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("every, kill", [
    (3, 5),  # checkpoint inside the first epoch
    (4, 5),  # checkpoint at the step that ends the first epoch
    (6, 7),  # checkpoint inside the second epoch (its own order)
])
def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, every, kill):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    every_n = ["--checkpoint.every_n_train_steps", str(every)]
    _fit(straight, *every_n)
    killed = _fit(resumed, *every_n, "--trainer.callbacks+=tests.kill_at_step.KillAtStep",
                  "--trainer.callbacks.step", str(kill), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean-up ran
    assert (resumed / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()
    _fit(resumed, *every_n, "--ckpt_path", "last")

    expected, got = _adapter(straight, 0), _adapter(resumed, 1)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(1000))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        io.load_checkpoint(bad)
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="truncated or corrupt"):
        io.load_checkpoint(bad)
