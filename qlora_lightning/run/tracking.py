"""The CLI's Trainer and what it reports to its loggers beyond Lightning's metrics and
hyperparameters.

- ``Trainer``: Lightning's, whose ``log_dir`` is this run's folder under every logger
  (``evaluate/tracking.run_dir``). Lightning's answers a W&B or MLflow logger's ``save_dir``, the
  same for every run, so that their runs' ``data_report.json``, ``run_summary.json``,
  ``config.yaml`` and adapter overwrote each other there, away from the run's checkpoints.
- ``RunReport``: the config keys beside the module's hyperparameters (data, seed, trainer), the data
  report (a table, and the JSON) and the run summary, to the loggers that keep a run away from its
  run folder (W&B, MLflow); TensorBoard gets the data report as text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback, LightningModule
from lightning.pytorch import Trainer as LightningTrainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from qlora_lightning.evaluate.tracking import is_mlflow, is_wandb, log_document, log_table, run_dir
from qlora_lightning.modules.resume import flatten


class Trainer(LightningTrainer):
    """Lightning's ``Trainer``; ``log_dir`` is the run's folder under W&B and MLflow loggers too."""

    @property
    @override
    def log_dir(self) -> Optional[str]:
        logger = self.loggers[0] if self.loggers else None
        if logger is None or isinstance(logger, (TensorBoardLogger, CSVLogger)):
            return super().log_dir
        # Their run id comes from rank 0's run: asked there only, then shared as Lightning shares
        # its answer.
        dirpath = run_dir(logger, self.default_root_dir) if self.is_global_zero else None
        return self.strategy.broadcast(dirpath)


def _remote(trainer: LightningTrainer) -> list:
    return [logger for logger in trainer.loggers if is_wandb(logger) or is_mlflow(logger)]


class RunReport(Callback):
    """Reports the run's config, data report and summary to its loggers (see the module's
    docstring)."""

    @override
    def setup(self, trainer: LightningTrainer, pl_module: LightningModule, stage: str) -> None:
        # After the data module's setup, which wrote data_report.json into the run folder.
        log_dir = trainer.log_dir  # on every rank: a broadcast
        if not trainer.is_global_zero or not trainer.loggers:
            return
        record = getattr(pl_module, "run_record", None)
        remote = _remote(trainer)
        if record and remote:  # the module's own hyperparameters are Lightning's to log
            extra = flatten({key: value for key, value in record.items() if key != "model"})
            for logger in remote:
                logger.log_hyperparams(extra)
        report_path = Path(log_dir or "", "data_report.json")
        if not log_dir or not report_path.is_file():
            return
        report = json.loads(report_path.read_text())
        log_document(remote, "data_report.json", report)
        columns, rows = data_report_table(report)
        log_table(trainer.loggers, "data/report", columns, rows, trainer.global_step)

    @override
    def on_fit_end(self, trainer: LightningTrainer, pl_module: LightningModule) -> None:
        # Written by PerfMonitor at the end of training.
        summary = Path(trainer.log_dir or "", "run_summary.json")
        if trainer.is_global_zero and summary.is_file():
            log_document(_remote(trainer), "run_summary.json", json.loads(summary.read_text()))


def data_report_table(report: dict) -> tuple[list[str], list[list]]:
    """One row per split of ``data_report.json``: its counts, and the drop reasons with their
    counts."""
    columns = [
        "split",
        "rows",
        "kept",
        "prompt_truncated",
        "response_truncated",
        "final_line_lost",
        "dropped",
        "dropped_why",
    ]
    rows = []
    for split, counts in (report.get("splits") or {}).items():
        dropped = counts.get("dropped") or {}
        rows.append(
            [
                split,
                *(counts.get(key, 0) for key in columns[1:6]),
                sum(dropped.values()),
                "; ".join(f"{why}: {n}" for why, n in dropped.items()),
            ]
        )
    return columns, rows
