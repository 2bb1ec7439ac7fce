"""QLoRA fine-tuning (SFT, DPO and KTO) of 2.7B-8B language models with Lightning.

The public names below are imported on first use (PEP 562), so that ``python -m qlora_lightning
--help`` answers without loading torch, transformers and Lightning.

Layers, lowest first: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``:
they import nothing of the package but each other) < ``speed`` < ``model`` < ``data`` <
``evaluate`` < ``modules`` < ``run``. A module imports its own layer and lower ones only
(``tests/test_layout.py``).
"""

import importlib
import logging

# bitsandbytes warns at import on every CPU-only machine that an optional fused kernel is missing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "AdapterMix": "model.adapters",
    "AdapterSet": "model.adapters",
    "PerfMonitor": "run.callbacks",
    "FreezeHeap": "speed.collector",
    "DecoderLayerPolicy": "model.distributed",
    "SFTDataModule": "data",
    "GuanacoDataModule": "data",
    "CodeAlpacaDataModule": "data",
    "GSM8KDataModule": "data",
    "ColumnDataModule": "data",
    "PreferenceDataModule": "data",
    "KTODataModule": "data",
    "PromptsDataModule": "data",
    "GSM8KEval": "evaluate.gsm8k_eval",
    "LMEvalCallback": "evaluate.lmeval",
    "BaseModelSpec": "model.build",
    "LoraSpec": "model.build",
    "build_model": "model.build",
    "load_tokenizer": "model.build",
    "QLoRAModule": "modules",
    "SFTModule": "modules",
    "DPOModule": "modules",
    "KTOModule": "modules",
    "JSONLWriter": "run.writers",
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
