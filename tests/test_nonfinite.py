"""A NaN loss at step k is skipped (weights and optimizer untouched) or stops the run, per
policy."""

import functools

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from qlora_lightning import BaseModelSpec, LoraSpec, SFTModule
from qlora_lightning.data.base import pad_batch
from qlora_lightning.modules.reliability import NonFiniteLossError
from tests.conftest import TINY_LLAMA

BAD_STEP = 3


class NaNAtStep(SFTModule):
    """Poisons the loss of every micro-batch of one optimizer step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == BAD_STEP else loss

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        if self.global_step == BAD_STEP:
            self.before_bad = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == BAD_STEP + 1 and not hasattr(self, "after_bad"):
            self.after_bad = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }


def _run(policy: str, rows, root, fused: bool = False) -> NaNAtStep:
    module = NaNAtStep(
        base=BaseModelSpec(name_or_path=TINY_LLAMA, random_init=True, compute_dtype="float32"),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=False,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, fused=fused),
        nonfinite=policy,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=6,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
    )
    batches = DataLoader([pad_batch([r], pad_id=2) for r in rows], batch_size=None)
    trainer.fit(module, train_dataloaders=batches)
    return module


@pytest.fixture(scope="module")
def rows(tokenizer):
    ids = tokenizer("Question: 2+2?\nAnswer: 4")["input_ids"]
    return [{"input_ids": ids, "labels": [-100] * 8 + ids[8:]}] * 4


# Fused AdamW skips on the device (found_inf), without the host's decision; the other drops the
# gradients.
@pytest.mark.parametrize(
    "fused", [False, True], ids=["host decides", "optimizer skips on the device"]
)
def test_skip_policy_skips_exactly_the_bad_step(rows, tmp_path, fused, caplog):
    module = _run("skip", rows, tmp_path, fused)
    assert module.skipped_steps == 1
    assert f"non-finite loss or gradient at step {BAD_STEP}: step skipped (1 so far)" in caplog.text
    assert module.global_step == 6
    for name, before in module.before_bad.items():
        assert torch.equal(before, module.after_bad[name]), f"{name} changed on the skipped step"
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fused", [False, True])
def test_stop_policy_stops_before_applying_the_bad_step(rows, tmp_path, fused):
    with pytest.raises(NonFiniteLossError, match=f"step {BAD_STEP}"):
        _run("stop", rows, tmp_path, fused)
