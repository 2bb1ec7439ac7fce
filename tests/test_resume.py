"""Exact resume from every kind of checkpoint (SFT and DPO), after SIGKILL, checkpoint integrity,
and what a resume checks: the config that wrote the checkpoint, and which run it belongs to."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lightning.errors import UserError
from qlora_lightning.model.build import LoraSpec
from qlora_lightning.modules.reliability import AtomicCheckpointIO
from qlora_lightning.modules.resume import collect_rng_states, set_rng_states
from qlora_lightning.run.cli import make_cli
from tests.conftest import tiny_spec

REPO = Path(__file__).resolve().parents[1]

# Several short epochs, dropout on (its masks draw from the RNG streams a resume must restore),
# a checkpoint after every optimizer step, validation on one batch.
RUNS = {
    # 16 rows / batch 2 = 8 micro-batches, accumulation 2: 4 optimizer steps per epoch; validation
    # every 6 micro-batches, i.e. after steps 3, 6 and 9. A constant schedule: its rate does not
    # depend on max_steps, so a run stopped at max_steps and resumed to more steps can be exact.
    "sft": [
        "--config",
        "configs/quickstart.yaml",
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.lr_scheduler",
        "constant",
        "--trainer.val_check_interval",
        "6",
    ],
    # 19 rows / batch 4 = 5 micro-batches, accumulation 2: steps after micro-batches 2, 4 and 5 (the
    # epoch's last step has one); validation every 4 micro-batches, i.e. after steps 2, 5, 7 and 10.
    "dpo": [
        "--config",
        "configs/dpo_quickstart.yaml",
        "--data.init_args.batch_size",
        "4",
        "--trainer.accumulate_grad_batches",
        "2",
        "--trainer.val_check_interval",
        "4",
    ],
}
COMMON = [
    "--model.init_args.lora.dropout",
    "0.1",
    "--trainer.max_steps",
    "10",
    "--trainer.limit_val_batches",
    "1",
    "--checkpoint.every_n_train_steps",
    "1",
    "--checkpoint.save_top_k",
    "-1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]
# Per module: (a step inside an epoch, the step that ends the first epoch, a step validation
# follows).
STEPS = {
    "sft": {"mid-epoch": 2, "epoch end": 4, "after validation": 3},
    "dpo": {"mid-epoch": 1, "epoch end": 3, "after validation": 2},
}


def fit(kind: str, root: Path, *extra: str) -> None:
    make_cli(["fit", *RUNS[kind], *COMMON, "--trainer.default_root_dir", str(root), *extra])


def run_dir(root: Path, version: int = 0) -> Path:
    return root / "lightning_logs" / f"version_{version}"


def assert_same_adapter(expected_dir: Path, got_dir: Path) -> None:
    expected = load_file(expected_dir / "adapter" / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    # Bit for bit: the resumed run must repeat the uninterrupted one's computation exactly.
    diffs = {
        name: (expected[name] - got[name]).abs().max().item()
        for name in expected
        if not torch.equal(expected[name], got[name])
    }
    worst = max(diffs, key=diffs.get, default=None)
    assert not diffs, (
        f"{len(diffs)} of {len(expected)} adapter tensors differ from the uninterrupted run's; "
        f"the most: {worst}, by up to {diffs.get(worst, 0):.3g}"
    )


def checkpoint_names(folder: Path, after: int = -1) -> set[str]:
    """``epoch=E-step=S[-vN].ckpt`` names with S > ``after``."""
    return {
        p.name
        for p in (folder / "checkpoints").glob("epoch=*-step=*.ckpt")
        if int(re.search(r"step=(\d+)", p.name).group(1)) > after
    }


def logged_losses(folder: Path) -> list[tuple[int, float]]:
    """(step, train/loss) as TensorBoard shows the run folder's event files, in the order read."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def perf_steps(folder: Path) -> list[dict]:
    """The steps PerfMonitor measured, as its state in ``last.ckpt`` holds them."""
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"][
        "PerfMonitor"
    ]["steps"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 10-step run of each module, checkpointed after every step."""
    roots = {}
    for kind in RUNS:
        roots[kind] = tmp_path_factory.mktemp(f"straight_{kind}")
        fit(kind, roots[kind])
    return roots


@pytest.mark.slow
@pytest.mark.parametrize("kind", RUNS)
@pytest.mark.parametrize("where", ["mid-epoch", "epoch end", "after validation"])
def test_resume_from_an_explicit_path_is_bit_identical(tmp_path, straight, kind, where):
    step = STEPS[kind][where]
    (source,) = (run_dir(straight[kind]) / "checkpoints").glob(f"epoch=*-step={step}.ckpt")
    ckpt = tmp_path / "copied" / source.name  # outside any run folder: a new run continues from it
    ckpt.parent.mkdir()
    shutil.copy(source, ckpt)
    fit(kind, tmp_path, "--ckpt_path", str(ckpt))
    assert_same_adapter(run_dir(straight[kind]), run_dir(tmp_path))
    # Named by their true epoch and step, as the uninterrupted run's; the restored step is not saved
    # again.
    assert checkpoint_names(run_dir(tmp_path)) == checkpoint_names(run_dir(straight[kind]), step)


@pytest.mark.slow
@pytest.mark.parametrize("kind", RUNS)
@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_run_stopped_at_max_steps_resumes_with_last_into_the_same_run(
    tmp_path, straight, kind, where
):
    # Stopped by max_steps with no periodic save on its last step, the run writes last.ckpt when fit
    # ends, in a form Lightning itself resumes wrongly (resume.as_saved_after_last_batch).
    # "mid-epoch" stops one step into the second epoch.
    stop = STEPS[kind]["epoch end"] + (1 if where == "mid-epoch" else 0)
    fit(
        kind,
        tmp_path,
        "--trainer.max_steps",
        str(stop),
        "--checkpoint.every_n_train_steps",
        str(stop + 1),
    )
    assert checkpoint_names(run_dir(tmp_path)) == set()  # last.ckpt only: written when fit ended
    first = json.loads((run_dir(tmp_path) / "run_summary.json").read_text())
    measured_first = perf_steps(run_dir(tmp_path))
    assert len(measured_first) == first["measured_steps"]
    with pytest.raises(
        UserError, match=rf"trainer\.max_steps: {stop} -> 10\).*--allow_config_changes"
    ):
        fit(kind, tmp_path, "--ckpt_path", "last")
    fit(kind, tmp_path, "--ckpt_path", "last", "--allow_config_changes", "true")

    # One run folder.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    # last.ckpt is the resumed run's own (under a changed checkpoint.every_n_train_steps too), no
    # last-v1.ckpt.
    assert not list((run_dir(tmp_path) / "checkpoints").glob("*-v*.ckpt"))
    assert_same_adapter(run_dir(straight[kind]), run_dir(tmp_path))
    assert checkpoint_names(run_dir(tmp_path)) == checkpoint_names(run_dir(straight[kind]), stop)
    # One TensorBoard curve: every step's loss once, across both processes' event files.
    assert logged_losses(run_dir(tmp_path)) == logged_losses(run_dir(straight[kind]))
    # run_summary.json covers the whole run: the steps measured before the stop, then those after.
    summary = json.loads((run_dir(tmp_path) / "run_summary.json").read_text())
    measured = perf_steps(run_dir(tmp_path))
    assert summary["optimizer_steps"] == 10 and summary["measured_steps"] == len(measured) > len(
        measured_first
    )
    assert (
        measured[: len(measured_first)] == measured_first
        and summary["train_time_s"] > first["train_time_s"]
    )


def test_dpo_checkpoint_is_refused_by_an_sft_config_in_one_line(tmp_path):
    make_cli(
        [
            "fit",
            "--config",
            "configs/dpo_quickstart.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    sft = [
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    with pytest.raises(
        UserError, match="written by qlora_lightning.DPOModule, not qlora_lightning.SFTModule"
    ) as err:
        make_cli([*sft, "--ckpt_path", str(ckpt), "--allow_config_changes", "true"])
    assert "\n" not in str(err.value)
    # `last` looks among this run's checkpoints only: the DPO run's is not one of them.
    with pytest.raises(
        UserError, match=r"--ckpt_path last: no last.ckpt of this run .*\(1 of other runs\)"
    ) as err:
        make_cli([*sft, "--ckpt_path", "last"])
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


def test_a_changed_config_is_listed_and_refused_unless_allowed(tmp_path):
    run = [
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    ]
    make_cli(run)
    changed = [
        *run,
        "--model.init_args.lora.r",
        "8",
        "--model.init_args.optimizer.init_args.lr",
        "0.001",
        "--ckpt_path",
        "last",
    ]
    with pytest.raises(UserError) as err:
        make_cli(changed)
    message = str(err.value)
    assert (
        "model.init_args.lora.r: 16 -> 8" in message
        and "optimizer.init_args.lr: 0.002 -> 0.001" in message
    )
    assert "\n" not in message


@pytest.mark.parametrize("key", ["data.init_args.path", "model.init_args.base.name_or_path"])
def test_a_failed_setup_leaves_no_run_folder(tmp_path, key):
    with pytest.raises(UserError):
        make_cli(
            [
                "fit",
                "--config",
                "configs/quickstart.yaml",
                "--trainer.default_root_dir",
                str(tmp_path),
                f"--{key}",
                str(tmp_path / "missing"),
            ]
        )
    assert not list(tmp_path.glob("lightning_logs/version_*"))


@pytest.mark.slow
def test_saved_config_reruns_the_same_run(tmp_path):
    make_cli(
        [
            "fit",
            *RUNS["sft"],
            *COMMON,
            "--trainer.max_steps",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    make_cli(["fit", "--config", str(run_dir(tmp_path) / "config.yaml")])
    assert_same_adapter(run_dir(tmp_path, 0), run_dir(tmp_path, 1))


def test_checkpoints_load_weights_only_and_restore_every_rng_stream(tmp_path):
    make_cli(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    checkpoint = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["run_record"]["model"]["class_path"] == "qlora_lightning.SFTModule"

    states = collect_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every stream on
    set_rng_states(states)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(expected[0], got[0])
        and np.array_equal(expected[1], got[1])
        and expected[2] == got[2]
    )


def _fit_process(
    root: Path, kind: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "qlora_lightning",
        "fit",
        *RUNS[kind],
        *COMMON,
        "--checkpoint.every_n_train_steps",
        "3",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, killer, ckpt",
    [
        # After step 5, two steps past the checkpoint of step 3 (inside the second epoch); resumed
        # the way most users do, by the explicit path of the run's last.ckpt.
        ("sft", "KillAtStep", "lightning_logs/version_0/checkpoints/last.ckpt"),
        (
            "dpo",
            "KillDuringSave",
            "last",
        ),  # while writing the checkpoint of step 6: step 3's must resume
    ],
)
def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, kind, killer, ckpt):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _fit_process(straight, kind)
    kill_step = "5" if killer == "KillAtStep" else "6"
    killed = _fit_process(
        resumed,
        kind,
        f"--trainer.callbacks+=tests.kill_at_step.{killer}",
        "--trainer.callbacks.step",
        kill_step,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean-up ran
    checkpoints = run_dir(resumed) / "checkpoints"
    if killer == "KillDuringSave":
        assert list(checkpoints.glob(".*.tmp")), "the kill did not land inside a checkpoint write"
        assert not list(checkpoints.glob("*step=6.ckpt"))
    _fit_process(resumed, kind, "--ckpt_path", ckpt if ckpt == "last" else str(resumed / ckpt))
    # The same run folder.
    assert sorted(p.name for p in (resumed / "lightning_logs").iterdir()) == ["version_0"]
    assert_same_adapter(run_dir(straight), run_dir(resumed))
    # One TensorBoard curve: the losses the killed run logged after its checkpoint are purged, and
    # the resumed run's replace them, value for value.
    assert logged_losses(run_dir(resumed)) == logged_losses(run_dir(straight))


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
    # Loading runs no code a checkpoint names: an object other than tensors, plain values and the
    # module's own config dataclasses (stored by a module built in Python) is refused.
    hparams = {"base": tiny_spec(), "lora": LoraSpec(r=4)}
    io.save_checkpoint({"state_dict": {}, "hyper_parameters": hparams}, path)
    assert io.load_checkpoint(path)["hyper_parameters"] == hparams
    torch.save({"state_dict": {}, "rng": np.random.get_state()}, bad)
    with pytest.raises(UserError, match="not only tensors and plain values"):
        io.load_checkpoint(bad)
