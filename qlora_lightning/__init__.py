"""QLoRA fine-tuning (SFT, DPO and KTO) of 2.7B-8B language models with Lightning.

The public names below are imported on first use (PEP 562), so that ``python -m qlora_lightning
--help`` answers without loading torch, transformers and Lightning.
"""

import importlib
import logging

# bitsandbytes warns at import on every CPU-only machine that an optional fused kernel is missing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "AdapterMix": "adapters", "AdapterSet": "adapters",
    "PerfMonitor": "callbacks", "FreezeHeap": "collector", "DecoderLayerPolicy": "distributed",
    "SFTDataModule": "data", "GuanacoDataModule": "data", "CodeAlpacaDataModule": "data", "GSM8KDataModule": "data",
    "ColumnDataModule": "data", "PreferenceDataModule": "data", "KTODataModule": "data", "PromptsDataModule": "data",
    "GSM8KEval": "gsm8k_eval",
    "BaseModelSpec": "model", "LoraSpec": "model", "build_model": "model", "load_tokenizer": "model",
    "QLoRAModule": "modules", "SFTModule": "modules", "DPOModule": "modules", "KTOModule": "modules",
    "JSONLWriter": "writers",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora_lightning' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"qlora_lightning.{_EXPORTS[name]}"), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
