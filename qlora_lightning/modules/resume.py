"""What a checkpoint must hold, and how it is read back, for a resume to repeat the uninterrupted
run.

- RNG streams as tensors and plain values, so that checkpoints load with ``weights_only=True``
  (no unpickling of arbitrary objects).
- The loop state of a checkpoint written when ``fit`` ended, put in the form Lightning resumes
  exactly.
- A record of the config that wrote the checkpoint, compared with the config that resumes it.
- ``--ckpt_path last``: the newest checkpoint of this run, not of any run under the same root.
- No run folder left behind by a run whose setup failed.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Optional, cast

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from qlora_lightning.errors import UserError

# ---- RNG streams -----------------------------------------------------------------------


def collect_rng_states() -> dict[str, Any]:
    """The global generators (torch, CUDA, NumPy, Python) as tensors, lists and numbers."""
    version, internal, gauss = random.getstate()
    # The legacy tuple, numpy's default; its stubs type the default call as returning the dict form.
    algorithm, keys, pos, has_gauss, cached = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state()
    )
    states = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        # uint32 keys, held as int64: weights_only loading knows tensors, not NumPy arrays.
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``collect_rng_states`` collected."""
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(
        (
            npy["algorithm"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )


# ---- loop state ------------------------------------------------------------------------


def as_saved_after_last_batch(checkpoint: dict) -> bool:
    """Rewrite, in place, the loop state of a checkpoint written when ``fit`` ended; True if it was
    one.

    ``ModelCheckpoint`` saves ``last.ckpt`` in ``on_train_end`` when no save fell on the final step
    (``max_steps`` or ``max_epochs`` reached between ``every_n_train_steps``). By then Lightning has
    counted the epoch as finished, even one that ``max_steps`` cut short, and resuming from it
    either starts a new epoch half-way through the old one's batch count (an epoch that did end:
    one micro-batch, then an accumulation cut short; the quickstart stopped at 6 steps and resumed
    to 12 ended 5e-3 away) or skips the rest of an epoch that did not. A checkpoint written by
    ``on_train_batch_end`` after the same batch holds the same model, optimizer, data and RNG state,
    and Lightning resumes from that form exactly; the two differ only in these counters.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return False
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    e, b = epochs["total"], batches["total"]
    ended = (
        e["ready"] == e["started"] == e["processed"] == e["completed"] > 0
        and b["ready"] == b["started"] == b["processed"] == b["completed"] > 0
    )
    if not ended:
        return False
    for progress in (epochs["total"], epochs["current"]):  # the epoch: started, not yet processed
        progress["processed"] -= 1
        progress["completed"] -= 1
    # The batch: processed, not yet completed.
    for progress in (
        batches["total"],
        batches["current"],
    ):
        progress["completed"] -= 1
    # Lightning adds the stepped batch back when it resumes after a batch that stepped.
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    checkpoint["epoch"] -= 1
    return True


# ---- what produced a checkpoint ----------------------------------------------------------

# The trainer settings that change what a resumed run computes (the rest is how it is shown or run).
TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
)


def run_record(config: dict) -> dict:
    """What a run is, from its parsed config as plain values: the module (class, base model, LoRA,
    tokenizer, optimizer, schedule and objective), the data, the seed and the trainer settings
    that change the computation."""
    trainer = config.get("trainer") or {}
    return {
        "model": config.get("model"),
        "data": config.get("data"),
        "seed_everything": config.get("seed_everything"),
        "trainer": {key: trainer.get(key) for key in TRAINER_KEYS},
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every leaf where the two records differ, in key order."""
    old, new = flatten(recorded), flatten(current)
    missing = object()
    return [
        f"{key}: {old.get(key, 'unset')} -> {new.get(key, 'unset')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


def module_class(record: dict) -> Optional[str]:
    return (record.get("model") or {}).get("class_path")


def check_resume(
    path: str, recorded: Optional[dict], current: dict, allow_changes: bool
) -> list[str]:
    """The differences between the config that wrote checkpoint ``path`` and this one; raises
    ``UserError`` for another module class (another objective: its optimizer state and schedule
    mean nothing here) and, unless ``allow_changes``, for any difference."""
    if recorded is None:
        raise UserError(
            f"checkpoint '{path}' records no config (written by an older version): "
            "start a new run, with model.init_args.lora.init_adapter to keep its adapter"
        )
    if module_class(recorded) != module_class(current):
        raise UserError(
            f"checkpoint '{path}' was written by {module_class(recorded)}, not "
            f"{module_class(current)}: start a new run (model.init_args.lora.init_adapter starts "
            "it from a saved adapter)"
        )
    changes = differences(recorded, current)
    if changes and not allow_changes:
        raise UserError(
            f"checkpoint '{path}' was written by another config ({'; '.join(changes)}): resume "
            "with the same config, or pass --allow_config_changes true to change it on purpose"
        )
    return changes


# ---- where a run's checkpoints are -------------------------------------------------------

# The keys that say which run a checkpoint belongs to: the same objective on the same base and data.
RUN_KEYS = (
    "model.class_path",
    "model.init_args.base.name_or_path",
    "data.class_path",
    "data.init_args.path",
)


def same_run(recorded: Optional[dict], current: dict) -> bool:
    old, new = flatten(recorded or {}), flatten(current)
    return recorded is not None and all(old.get(key) == new.get(key) for key in RUN_KEYS)


def find_last(root: Optional[Path], current: dict, load) -> str:
    """The newest ``last.ckpt`` under ``root/*/checkpoints`` written by this run (``RUN_KEYS``).

    Args:
        root: The logger's directory of run folders (TensorBoard: ``version_N``; W&B, MLflow: run
            ids); None where the logger has run nothing yet.
        current: This config's ``run_record``.
        load: Reads a checkpoint (``AtomicCheckpointIO.load_checkpoint``).
    """
    found = (
        sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if root is not None
        else []
    )
    for path in found:
        if same_run(load(path).get("run_record"), current):
            return str(path)
    what = ", ".join(f"{key}={flatten(current).get(key)}" for key in RUN_KEYS)
    others = f" ({len(found)} of other runs)" if found else ""
    raise UserError(
        f"--ckpt_path last: no last.ckpt of this run ({what}) under {root}/*/checkpoints{others}"
    )


def run_folder(checkpoint_path: str, root: Optional[Path]) -> Optional[str]:
    """The run folder's name (``version_N``, a W&B or MLflow run id) where ``checkpoint_path`` is in
    ``root/<name>/checkpoints``; None elsewhere."""
    path = Path(checkpoint_path).resolve()
    if (
        root is None
        or path.parent.name != "checkpoints"
        or path.parent.parent.parent != root.resolve()
    ):
        return None
    return path.parent.parent.name


class RunFolderGuard(Callback):
    """Removes the run folder (``version_N``) of a new run whose setup failed.

    Lightning creates it at the start of setup (the logger's writer, ``config.yaml``,
    ``data_report.json``), before the data is read and the model loaded; a missing data file or an
    unknown model would leave an empty folder behind. Setup has succeeded once the stage starts
    (``on_fit_start``: data read, model built, checkpoint restored). A resumed run's folder is never
    removed.
    """

    def __init__(self) -> None:
        self.started = False

    def _start(self, *args) -> None:
        self.started = True

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _start

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        logger = trainer.logger
        if (
            self.started
            or trainer.ckpt_path is not None
            or logger is None
            or not trainer.is_global_zero
        ):
            return
        # W&B, MLflow: their run is marked failed.
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
            return
        # Not trainer.log_dir: a broadcast, which the other ranks would not join.
        folder = Path(logger.log_dir)
        if folder.parent == Path(logger.root_dir) and folder.name.startswith("version_"):
            shutil.rmtree(folder, ignore_errors=True)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, told in a resumed run that the restored step is saved
    already.

    It forgets that across a resume, so the resumed run's first micro-batch saved the restored step
    again (as ``...-v1.ckpt``, and as ``last.ckpt``) in the middle of the next step's accumulation:
    a state that holds no accumulated gradient, which no resume repeats.
    """

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Private; checked by qlora_lightning/compat.py. At a fresh start this is step 0, as before.
        self._last_global_step_saved = trainer.global_step
