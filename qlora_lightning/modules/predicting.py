"""The evaluation loops' side of the module: fresh metric states for each validation or test, and
greedy generations for ``predict``."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.generation import greedy_generate, stop_token_ids


class Predicting(LightningModule):
    """The validation, test and predict hooks of ``QLoRAModule``."""

    model: Optional[torch.nn.Module]
    max_new_tokens: int

    @override
    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    @override
    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        """Fresh metric states, made under this loop's grad mode. ``validate`` and ``test`` run
        under inference mode, so the states they leave are inference tensors, which the validation
        inside a later ``fit`` of the same module (no-grad only) could not update in place."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy generations for a ``PromptsDataModule`` batch: each input row plus
        ``generation``."""
        if "prompt_ids" not in batch:
            raise UserError(
                "predict generates from prompts: use data: qlora_lightning.PromptsDataModule"
            )
        names = batch.get("adapter_names")
        if names is not None:  # rows that name no adapter use the active one
            names = [name or self.model.active_adapter for name in names]
        tokens = greedy_generate(
            self.model,
            batch["prompt_ids"],
            self.tokenizer.pad_token_id,
            stop_token_ids(self.model, self.tokenizer),
            self.max_new_tokens,
            batch_size=len(batch["prompt_ids"]),
            adapter_names=names,
        )
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [{**record, "generation": text} for record, text in zip(batch["records"], texts)]
