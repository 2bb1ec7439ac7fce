"""What a run records through its loggers, whichever they are: TensorBoard, CSV, W&B, MLflow.

- The run folder, where the project writes a run's files (``data_report.json``,
  ``run_summary.json``, ``config.yaml``, the adapter, ``checkpoints/``, ``lm_eval/``). TensorBoard
  and CSV name it (``log_dir``); other loggers do not, and Lightning's ``Trainer.log_dir`` then
  answers their ``save_dir``, shared by every run. The project uses what Lightning's
  ``ModelCheckpoint`` uses for its checkpoints instead, ``<save_dir>/<name>/<version>``: for W&B
  ``<save_dir>/<project>/<run id>``, for MLflow's file store ``<save_dir>/<experiment id>/<run id>``
  (the run's own folder there).
- The folder of a logger's runs (``run_root``), where ``--ckpt_path last`` looks for this run's
  ``last.ckpt``, and the run a resumed ``fit`` continues (``continue_run``).
- Tables and JSON documents (GSM8K samples, the data report, lm-eval results): a W&B table, an
  MLflow table and JSON artifact, TensorBoard text (it has no tables).

Pure functions over Lightning loggers: W&B and MLflow are optional (the ``loggers`` extra) and are
recognized by class without importing them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


def _is(logger: Any, name: str) -> bool:
    """Whether ``logger`` is Lightning's logger class ``name``, without importing its library."""
    return any(
        cls.__name__ == name
        and cls.__module__.startswith(("lightning.pytorch.loggers", "pytorch_lightning.loggers"))
        for cls in type(logger).__mro__
    )


def is_wandb(logger: Any) -> bool:
    return _is(logger, "WandbLogger")


def is_mlflow(logger: Any) -> bool:
    return _is(logger, "MLFlowLogger")


def run_dir(logger: Optional[Logger], default_root_dir: str) -> str:
    """The folder of this run's files (see the module's docstring); without a logger,
    ``default_root_dir``.

    Asking a W&B or MLflow logger starts its run (the run id names the folder): ask on rank 0, or on
    every rank through a broadcast, as ``Trainer.log_dir`` does.
    """
    if logger is None:
        return default_root_dir
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return logger.log_dir
    if is_wandb(logger):
        _ = logger.experiment  # wandb.init draws the run id
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(logger.save_dir or default_root_dir, str(logger.name), version)


def run_root(logger: Optional[Logger], default_root_dir: str) -> Optional[Path]:
    """The folder holding one subfolder per run of this logger (TensorBoard: ``version_N``), found
    without starting a run; None where it does not exist yet (an MLflow experiment never run)."""
    if logger is None:
        return Path(default_root_dir)
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.root_dir)
    save_dir = Path(logger.save_dir or default_root_dir)
    if is_mlflow(logger):
        # Its `name` is the experiment id, which creates the experiment and a run: looked up
        # instead. Compat.py.
        experiment = logger._mlflow_client.get_experiment_by_name(logger._experiment_name)
        return save_dir / experiment.experiment_id if experiment is not None else None
    return save_dir / str(logger.name)  # W&B: the project


def continue_run(logger: Optional[Logger], run: str, step: int) -> bool:
    """Make ``logger`` log to its run ``run`` (the name of a ``run_root`` subfolder), not a new one;
    False where it cannot (a run already started, or a logger the project does not know).

    TensorBoard: the events logged from ``step`` on are purged (``cli.continue_run_folder``). W&B
    resumes the run of that id (``resume="allow"``, Lightning's default): offline, a second
    ``offline-run-*`` folder of the same id, which ``wandb sync`` appends to the first. MLflow logs
    to that run again; it keeps every value, so the steps a resume repeats hold two (the last is the
    resumed one's), and it refuses a param a second value: one that ``--allow_config_changes``
    changed is logged as ``resumed_at_step_<N>/<key>``.
    """
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        if not run.startswith("version_") or not run[len("version_") :].isdigit():
            return False
        # Read by log_dir; private, checked by compat.py.
        logger._version = int(run[len("version_") :])
        if isinstance(logger, TensorBoardLogger):
            logger._kwargs["purge_step"] = step  # passed to the SummaryWriter when it is created
        return True
    if is_wandb(logger) and logger._experiment is None:  # compat.py
        logger._id = logger._wandb_init["id"] = run
        return True
    if is_mlflow(logger) and not logger._initialized:  # compat.py
        logger._run_id = run
        _keep_logged_params(logger, step)
        return True
    return False


def _keep_logged_params(logger: Logger, step: int) -> None:
    """MLflow refuses a run's param a second value: a resume under a deliberately changed config
    (``--allow_config_changes``) logs each changed one as ``resumed_at_step_<N>/<key>`` instead."""
    from mlflow.exceptions import MlflowException

    log_hyperparams = logger.log_hyperparams  # bound: this instance's own

    def log_keeping_logged(params) -> None:
        try:
            log_hyperparams(params)
        except MlflowException as err:
            if "Changing param values" not in str(err):
                raise
            for key, value in _flat(params).items():
                try:
                    log_hyperparams({key: value})
                except MlflowException:
                    log_hyperparams({f"resumed_at_step_{step}/{key}": value})

    logger.log_hyperparams = log_keeping_logged


def _flat(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` (or a Namespace) -> ``{"a/b": 1}``, as Lightning's MLflow logger names
    nested params."""
    params = (
        vars(params) if hasattr(params, "__dict__") and not isinstance(params, dict) else params
    )
    if not isinstance(params, dict):
        return {prefix: params}
    flat: dict[str, Any] = {}
    for key, value in params.items():
        flat.update(
            _flat(value, f"{prefix}/{key}" if prefix else str(key))
            if isinstance(value, dict)
            else {f"{prefix}/{key}" if prefix else str(key): value}
        )
    return flat


# ---- tables and documents ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A table cell as text or a number (W&B and MLflow tables hold no dicts or lists)."""
    return (
        value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
    )


def log_table(
    loggers: Sequence[Logger], key: str, columns: list[str], rows: list[list[Any]], step: int
) -> None:
    """Rows of ``columns`` to every logger that shows tables (W&B: a table under ``key``; MLflow: a
    table artifact ``<key>_step<N>.json``); TensorBoard as markdown text. Others (CSV) skip it. Rank
    0 only."""
    rows = [[_plain(cell) for cell in row] for row in rows]
    for logger in loggers:
        if is_wandb(logger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
        elif is_mlflow(logger):
            data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
            logger.experiment.log_table(
                logger.run_id, data=data, artifact_file=f"{key}_step{step}.json"
            )
        elif isinstance(logger, TensorBoardLogger):
            text = (
                "| "
                + " | ".join(columns)
                + " |\n|"
                + "---|" * len(columns)
                + "\n"
                + "\n".join(
                    "| "
                    + " | ".join(
                        str(cell).replace("|", "\\|").replace("\n", "<br>") for cell in row
                    )
                    + " |"
                    for row in rows
                )
            )
            logger.experiment.add_text(key, text, step)


def log_document(loggers: Sequence[Logger], name: str, document: dict) -> None:
    """A JSON document (``name``, e.g. ``data_report.json``) beside a run held elsewhere than its
    run folder: a W&B run file, an MLflow artifact. TensorBoard and CSV runs have their run
    folder."""
    for logger in loggers:
        if is_wandb(logger):
            run = logger.experiment
            path = Path(run.dir) / name  # the run's files, synced with it
            path.write_text(json.dumps(document, indent=2) + "\n")
        elif is_mlflow(logger):
            logger.experiment.log_dict(logger.run_id, document, name)
