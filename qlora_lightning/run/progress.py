"""Lightning's progress bars, counting right when ``trainer.max_steps`` ends the run.

With ``max_steps`` set (and ``max_epochs`` left at -1), Lightning's bars cap each epoch's batches
at the optimizer steps left, forgetting gradient accumulation (the quickstart's last epoch read
``4/2``: four micro-batches of two remaining steps); the Rich bar also describes the epoch as
``Epoch e/max_epochs-1``, which reads ``Epoch 99/-2``. Here the cap counts micro-batches and the
Rich bar names the step: ``Epoch 99 · step 198/200``. Neither shows the logger's version number
(``v_num: 0.000``), which the run folder's name already says.
"""

from __future__ import annotations

from typing import Union

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from typing_extensions import override


def _ends_by_steps(trainer: Trainer) -> bool:
    return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0


def _train_batches(trainer: Trainer) -> Union[int, float]:
    """This epoch's micro-batches, up to those the remaining optimizer steps take."""
    if not _ends_by_steps(trainer):
        return trainer.num_training_batches
    remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
    return min(trainer.num_training_batches, remaining)


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)
    return metrics


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the last epoch's micro-batches counted with accumulation."""

    @override
    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))

    @property
    @override
    def total_train_batches(self) -> Union[int, float]:
        return _train_batches(self.trainer)


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar with the last epoch's micro-batches counted with accumulation, described
    by the optimizer step where ``max_steps`` ends the run."""

    @override
    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))

    @property
    @override
    def total_train_batches(self) -> Union[int, float]:
        return _train_batches(self.trainer)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if not _ends_by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} · step {self.trainer.global_step}/{self.trainer.max_steps}"

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (
            self.progress is not None
            and self.train_progress_bar_id is not None
            and _ends_by_steps(trainer)
        ):
            self.progress.update(
                self.train_progress_bar_id,
                description=self._get_train_description(trainer.current_epoch),
            )


def count_steps(trainer: Trainer) -> None:
    """Give ``trainer``'s own progress bar (Lightning's Rich or tqdm bar, not a user's) the
    step-aware counting above, in place: the subclasses add no state."""
    bar = trainer.progress_bar_callback
    for lightning_bar, step_bar in (
        (RichProgressBar, StepRichProgressBar),
        (TQDMProgressBar, StepTQDMProgressBar),
    ):
        if type(bar) is lightning_bar:
            bar.__class__ = step_bar
