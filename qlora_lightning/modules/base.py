"""The shared LightningModule: builds the 4-bit PEFT model, its optimizer and schedule,
keeps checkpoints to the adapter, and saves the adapter in the PEFT format after ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from transformers import get_scheduler
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.model import BaseModelSpec, LoraSpec, build_model, load_tokenizer, spec_dict, trainable_state_dict

log = logging.getLogger(__name__)


def paged_adamw_8bit(params, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The QLoRA paper's optimizer: 8-bit AdamW whose state pages to CPU memory under pressure."""
    import bitsandbytes as bnb  # deferred: importing it costs a second and logs about CUDA

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)


class QLoRAModule(LightningModule):
    """A 4-bit (or 8/16-bit) base with a trainable LoRA adapter.

    Args:
        base: The base model and how it is quantized.
        lora: The adapter.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
        optimizer: Optimizer over the trainable (adapter) parameters only.
        lr_scheduler: Learning-rate shape after warm-up.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly from zero.
        adapter_dir: Where ``fit`` saves the final adapter and tokenizer; default ``<log_dir>/adapter``.
    """

    def __init__(
        self,
        base: BaseModelSpec = BaseModelSpec(),
        lora: LoraSpec = LoraSpec(),
        gradient_checkpointing: bool = True,
        optimizer: OptimizerCallable = paged_adamw_8bit,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "constant",
        warmup_ratio: float = 0.03,
        adapter_dir: Optional[str] = None,
    ):
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.base, self.lora = base, lora
        self.gradient_checkpointing = gradient_checkpointing
        self.optimizer_factory, self.lr_scheduler, self.warmup_ratio = optimizer, lr_scheduler, warmup_ratio
        self.adapter_dir = adapter_dir
        self.model: Optional[torch.nn.Module] = None
        self._tokenizer = None
        # Checkpoints hold the adapter only; the frozen base is rebuilt from `base`.
        self.strict_loading = False

    @property
    def tokenizer(self):
        """Loaded on first use, so building the module never downloads anything."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base.tokenizer or self.base.name_or_path)
        return self._tokenizer

    def describe(self) -> dict:
        """What is being trained, for run summaries."""
        return {"base": spec_dict(self.base), "lora": spec_dict(self.lora),
                "gradient_checkpointing": self.gradient_checkpointing}

    @override
    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.base, self.lora, self.gradient_checkpointing,
                                     device=self.trainer.strategy.root_device if self._trainer else "cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(self.lr_scheduler if self.lr_scheduler != "constant" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Megabytes, not gigabytes: the frozen 4-bit base is rebuilt from the config on load.
        checkpoint["state_dict"] = trainable_state_dict(self.model, prefix="model.")

    @override
    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.adapter_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter")
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            log.info("saved the adapter and tokenizer to %s", path)
