"""The quickstart under W&B (offline) and MLflow (a local file store) as under TensorBoard: the same
scalar series, the hyperparameters, the data report and GSM8K samples as tables, the run's files in
its own folder, and ``--ckpt_path last`` continuing the same run.

Each logger's own files are read back: the W&B run's ``.wandb`` transaction log (its records are
protocol buffers in LevelDB's log format), the MLflow store's metric, param and artifact files.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO
from tests.test_resume import assert_same_adapter

# 16 rows in batches of 4, accumulation 2: 2 optimizer steps an epoch, 6 in all; validation and
# GSM8K exact match (2 questions) after steps 3 and 6; a checkpoint every 3 steps.
# A constant learning rate (its value does not depend on max_steps): a run stopped after step 3 and
# resumed to step 6 is the run of 6 steps, to the bit.
RUN = [
    "fit",
    "--config",
    "configs/quickstart.yaml",
    "--trainer.max_steps",
    "6",
    "--trainer.val_check_interval",
    "6",
    "--model.init_args.lr_scheduler",
    "constant",
    "--trainer.log_every_n_steps",
    "1",
    "--checkpoint.every_n_train_steps",
    "3",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.callbacks+=qlora_lightning.GSM8KEval",
    "--trainer.callbacks.every_n_steps",
    "3",
    "--trainer.callbacks.num_samples",
    "2",
    "--trainer.callbacks.max_new_tokens",
    "4",
    "--trainer.callbacks.eval_at_start",
    "false",
]
# Timings: their values differ from run to run; only their steps are checked. TensorBoard's
# placeholder for a hyperparameter metric is its own.
TIMED = "perf/"
TENSORBOARD_ONLY = {"hp_metric"}


def _fit(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_SILENT": "true",
        # W&B's own folders (settings, cache, artifacts) in the test's, not the home directory
        **{
            f"WANDB_{name}_DIR": str(root / "wandb_home" / name.lower())
            for name in ("CONFIG", "CACHE", "DATA")
        },
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_lightning",
            *RUN,
            "--trainer.default_root_dir",
            str(root),
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _fit_stopped_then_resumed(root: Path, *logger: str) -> None:
    """Stopped after step 3 (its last.ckpt), then ``--ckpt_path last`` to step 6: the same run
    continues. (Killed instead, a W&B offline run loses what its service process had not yet
    written.)"""
    _fit(root, *logger, "--trainer.max_steps", "3")
    _fit(root, *logger, "--ckpt_path", "last", "--allow_config_changes", "true")


# ---- reading each logger's files back ------------------------------------------------------------


def tensorboard_series(run: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks (CRC32, length, type: whole, first, middle, last), each record a
    ``wandb_internal_pb2.Record``; a tail cut short (a killed run) is dropped."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 or len(data) < length:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(root: Path) -> tuple[dict[str, dict[int, float]], dict, list[Path]]:
    """(scalar series by trainer/global_step, config, the offline run folders) of the one W&B run
    under ``root``; a resumed run's folders are read in order, so a step logged again holds its last
    value."""
    folders = sorted((root / "wandb").glob("offline-run-*"))
    assert len({f.name.rsplit("-", 1)[1] for f in folders}) == 1, folders  # one run id
    series: dict[str, dict[int, float]] = {}
    config = {}
    for folder in folders:
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "config":
                config.update(
                    {item.key: json.loads(item.value_json) for item in record.config.update}
                )
            if kind != "history":
                continue
            # A table's entry is a nested key (name, size, path, ...), a scalar's a key of one part.
            row = {
                item.key or item.nested_key[0]: json.loads(item.value_json)
                for item in record.history.item
                if item.key or len(item.nested_key) == 1
            }
            step = row["trainer/global_step"]
            for key, value in row.items():
                if (
                    not key.startswith("_")
                    and key != "trainer/global_step"
                    and isinstance(value, (int, float))
                ):
                    series.setdefault(key, {})[int(step)] = float(value)
    return series, config, folders


def mlflow_run(root: Path) -> tuple[dict[str, dict[int, float]], dict, Path]:
    """(scalar series by step, params, the run's folder) of the one MLflow run in the file store
    under ``root``; a value logged again for a step (by a resumed run) replaces the earlier one."""
    runs = [p.parent for p in (root / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1, runs
    run = runs[0]
    series = {}
    for path in (p for p in (run / "metrics").rglob("*") if p.is_file()):
        for (
            line
        ) in path.read_text().splitlines():  # "<timestamp ms> <value> <step>", in the order logged
            _, value, step = line.split()
            series.setdefault(str(path.relative_to(run / "metrics")), {})[int(step)] = float(value)
    params = {
        str(p.relative_to(run / "params")): p.read_text()
        for p in (run / "params").rglob("*")
        if p.is_file()
    }
    return series, params, run


def assert_same_series(
    got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]
) -> None:
    expected = {key: values for key, values in expected.items() if key not in TENSORBOARD_ONLY}
    assert sorted(got) == sorted(expected)
    for key in expected:
        # A resumed run warms up again (PerfMonitor's warmup_steps): fewer steps timed.
        if key.startswith(TIMED):
            assert got[key] and set(got[key]) <= set(expected[key]), key
            continue
        # The same steps and values; TensorBoard stores float32: the same number, rounded as it
        # rounds.
        assert {s: np.float32(v) for s, v in got[key].items()} == {
            s: np.float32(v) for s, v in expected[key].items()
        }, key


@pytest.fixture(scope="module")
def tensorboard(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tensorboard")
    _fit(root)
    run = root / "lightning_logs" / "version_0"
    series = tensorboard_series(run)
    assert {"train/loss", "val/loss", "val/gsm8k_acc", "perf/tokens_per_sec", "epoch"} <= set(
        series
    )
    assert sorted(series["val/gsm8k_acc"]) == [3, 6]
    return run, series


def _run_folder_files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


def test_wandb_offline_run_holds_what_tensorboard_shows_and_resumes_the_same_run(
    tensorboard, tmp_path
):
    pytest.importorskip("wandb", reason="needs the loggers extra: pip install -e '.[loggers]'")
    tb_run, tb_series = tensorboard
    _fit_stopped_then_resumed(
        tmp_path,
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.offline",
        "true",
        "--trainer.logger.save_dir",
        str(tmp_path),
    )
    series, config, folders = wandb_run(tmp_path)
    assert len(folders) == 2  # the first run and its resume, one run id
    assert_same_series(series, tb_series)
    # The run's files in its own folder <save_dir>/<project>/<run id>, not in save_dir.
    run_id = folders[0].name.rsplit("-", 1)[1]
    run = tmp_path / "lightning_logs" / run_id
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == [run_id]
    assert {
        "adapter",
        "checkpoints",
        "config.yaml",
        "data_report.json",
        "run_summary.json",
    } <= _run_folder_files(run)
    assert not (tmp_path / "data_report.json").exists()
    assert_same_adapter(tb_run, run)
    # Hyperparameters: the module's and the rest of the config.
    assert config["lora"]["r"] == 16 and config["data.init_args.path"].endswith("gsm8k_train.jsonl")
    assert config["seed_everything"] == 0 and config["trainer.max_steps"] == 6
    # Tables: the data report and the GSM8K samples; the data report and run summary as run files.
    tables = {p.name.split("_")[0] for p in folders[-1].glob("files/media/table/**/*.table.json")}
    assert {"report", "gsm8k"} <= tables, tables
    report = json.loads(
        next(folders[0].glob("files/media/table/data/report_*.table.json")).read_text()
    )
    assert report["columns"][:3] == ["split", "rows", "kept"] and [
        r[0] for r in report["data"]
    ] == ["train", "val"]
    samples = json.loads(
        sorted(folders[-1].glob("files/media/table/val/gsm8k_samples_*.table.json"))[-1].read_text()
    )
    assert (
        samples["columns"] == ["correct", "prompt", "generation", "reference"]
        and len(samples["data"]) == 2
    )
    assert (
        json.loads((folders[-1] / "files" / "run_summary.json").read_text())["optimizer_steps"] == 6
    )


def test_mlflow_file_store_holds_what_tensorboard_shows_and_resumes_the_same_run(
    tensorboard, tmp_path
):
    pytest.importorskip("mlflow", reason="needs the loggers extra: pip install -e '.[loggers]'")
    tb_run, tb_series = tensorboard
    _fit_stopped_then_resumed(
        tmp_path,
        "--trainer.logger",
        "lightning.pytorch.loggers.MLFlowLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "mlruns"),
    )
    series, params, run = mlflow_run(tmp_path)
    assert_same_series(series, tb_series)
    # The run's files in the store's own folder of the run.
    assert {
        "adapter",
        "checkpoints",
        "config.yaml",
        "data_report.json",
        "run_summary.json",
    } <= _run_folder_files(run)
    assert_same_adapter(tb_run, run)
    # Nested: flattened with '/'.
    assert params["lora/r"] == "16" and params["base/quantization"] == "nf4"
    assert params["data.init_args.path"].endswith("gsm8k_train.jsonl")
    # A param holds one value: the one the resume changed is logged under its own key.
    assert (params["trainer.max_steps"], params["resumed_at_step_3/trainer.max_steps"]) == (
        "3",
        "6",
    )
    artifacts = {
        str(p.relative_to(run / "artifacts")) for p in (run / "artifacts").rglob("*") if p.is_file()
    }
    assert {
        "data_report.json",
        "run_summary.json",
        "data/report_step0.json",
        "val/gsm8k_samples_step3.json",
        "val/gsm8k_samples_step6.json",
    } <= artifacts, artifacts
    table = json.loads((run / "artifacts" / "val" / "gsm8k_samples_step6.json").read_text())
    assert (
        table["columns"] == ["correct", "prompt", "generation", "reference"]
        and len(table["data"]) == 2
    )
    assert json.loads((run / "artifacts" / "run_summary.json").read_text())["optimizer_steps"] == 6
