"""The CLI's progress bar counts micro-batches with accumulation and names the step
(``progress.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from qlora_lightning.run.cli import make_cli
from qlora_lightning.run.progress import StepRichProgressBar, StepTQDMProgressBar
from tests.conftest import REPO


def _bar(kind, **trainer):
    bar = kind()
    bar._trainer = SimpleNamespace(
        **{
            "max_epochs": -1,
            "max_steps": 200,
            "global_step": 198,
            "accumulate_grad_batches": 2,
            "num_training_batches": 8,
            **trainer,
        }
    )
    return bar


@pytest.mark.parametrize("kind", [StepRichProgressBar, StepTQDMProgressBar])
def test_last_epoch_counts_the_micro_batches_of_the_steps_left(kind):
    # Two steps left, two micro-batches each: four of the epoch's eight, where Lightning said two.
    assert _bar(kind).total_train_batches == 4
    assert _bar(kind, global_step=10).total_train_batches == 8
    # Epochs end the run: untouched.
    assert _bar(kind, max_epochs=3, max_steps=-1).total_train_batches == 8


def test_rich_bar_names_the_step_when_steps_end_the_run():
    assert _bar(StepRichProgressBar)._get_train_description(99) == "Epoch 99 · step 198/200"
    # Epochs end the run: Lightning's own description.
    assert (
        _bar(StepRichProgressBar, max_epochs=3, max_steps=-1)._get_train_description(1).strip()
        == "Epoch 1/2"
    )


@pytest.mark.parametrize("progress", [True, False])
def test_cli_trainer_gets_the_step_bar_in_place_of_lightning_s(progress, tmp_path):
    cli = make_cli(
        [
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            str(progress).lower(),
        ],
        run=False,
    )
    bar = cli.trainer.progress_bar_callback
    if not progress:
        assert bar is None
        return
    assert isinstance(bar, (StepRichProgressBar, StepTQDMProgressBar))
    assert isinstance(bar, (RichProgressBar, TQDMProgressBar))
