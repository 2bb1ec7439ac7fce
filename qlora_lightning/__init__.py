"""QLoRA fine-tuning (SFT and DPO) of 2.7B-8B language models with Lightning."""

import logging

# bitsandbytes warns at import on every CPU-only machine that an optional fused kernel is missing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from qlora_lightning.adapters import AdapterMix, AdapterSet
from qlora_lightning.callbacks import PerfMonitor
from qlora_lightning.collector import FreezeHeap
from qlora_lightning.distributed import DecoderLayerPolicy
from qlora_lightning.data import (
    CodeAlpacaDataModule,
    ColumnDataModule,
    GSM8KDataModule,
    GuanacoDataModule,
    PreferenceDataModule,
    PromptsDataModule,
    SFTDataModule,
)
from qlora_lightning.gsm8k_eval import GSM8KEval
from qlora_lightning.model import BaseModelSpec, LoraSpec, build_model, load_tokenizer
from qlora_lightning.modules import DPOModule, QLoRAModule, SFTModule
from qlora_lightning.writers import JSONLWriter

__all__ = ["BaseModelSpec", "LoraSpec", "build_model", "load_tokenizer", "QLoRAModule", "SFTModule", "DPOModule",
           "SFTDataModule", "GuanacoDataModule", "CodeAlpacaDataModule", "GSM8KDataModule", "ColumnDataModule",
           "PreferenceDataModule", "PerfMonitor", "FreezeHeap", "PromptsDataModule", "GSM8KEval", "JSONLWriter",
           "AdapterSet", "AdapterMix", "DecoderLayerPolicy"]
