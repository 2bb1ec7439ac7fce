"""QLoRA fine-tuning (SFT and DPO) of 2.7B-8B language models with Lightning."""

from qlora_lightning.callbacks import PerfMonitor
from qlora_lightning.data import (
    CodeAlpacaDataModule,
    ColumnDataModule,
    GSM8KDataModule,
    GuanacoDataModule,
    PreferenceDataModule,
    SFTDataModule,
)
from qlora_lightning.model import BaseModelSpec, LoraSpec, build_model, load_tokenizer
from qlora_lightning.modules import DPOModule, QLoRAModule, SFTModule

__all__ = ["BaseModelSpec", "LoraSpec", "build_model", "load_tokenizer", "QLoRAModule", "SFTModule", "DPOModule",
           "SFTDataModule", "GuanacoDataModule", "CodeAlpacaDataModule", "GSM8KDataModule", "ColumnDataModule",
           "PreferenceDataModule", "PerfMonitor"]
