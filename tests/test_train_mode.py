"""Training really trains in training mode: gradient checkpointing and dropout depend on it."""

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from tests.conftest import cpu_trainer, sft_module


class _RecordModes(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.eval_modules = [name for name, m in pl_module.model.named_modules() if not m.training]


def test_whole_model_is_in_training_mode_during_fit(tmp_path):
    # from_pretrained hands back an eval-mode model and Lightning keeps submodule modes as found;
    # the decoder layers in eval mode silently skip gradient checkpointing.
    module = sft_module()
    module.gradient_checkpointing = True
    ids = torch.randint(0, 512, (1, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    record = _RecordModes()
    cpu_trainer(tmp_path, max_steps=1, callbacks=[record]).fit(
        module, DataLoader([batch], batch_size=None)
    )
    assert record.eval_modules == []
