"""QLoRA fine-tuning (SFT and DPO) of 2.7B-8B language models with Lightning."""

from qlora_lightning.callbacks import PerfMonitor
from qlora_lightning.data import (
    CodeAlpacaDataModule,
    ColumnDataModule,
    GSM8KDataModule,
    GuanacoDataModule,
    SFTDataModule,
)
from qlora_lightning.model import BaseModelSpec, LoraSpec, build_model, load_tokenizer
from qlora_lightning.modules import QLoRAModule, SFTModule

__all__ = ["BaseModelSpec", "LoraSpec", "build_model", "load_tokenizer", "QLoRAModule", "SFTModule",
           "SFTDataModule", "GuanacoDataModule", "CodeAlpacaDataModule", "GSM8KDataModule", "ColumnDataModule",
           "PerfMonitor"]
