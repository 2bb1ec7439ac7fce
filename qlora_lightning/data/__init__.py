"""DataModules: one shared base, one small file per dataset; row formats, tokenization, packing and
sampling.

May import: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``), ``speed``,
``model`` and ``data`` itself.
"""

from qlora_lightning.data.base import SFTDataModule, load_raw_dataset, pad_batch
from qlora_lightning.data.codealpaca import CodeAlpacaDataModule
from qlora_lightning.data.generic import ColumnDataModule
from qlora_lightning.data.gsm8k import GSM8KDataModule
from qlora_lightning.data.guanaco import GuanacoDataModule
from qlora_lightning.data.kto import KTODataModule
from qlora_lightning.data.preference import PreferenceDataModule
from qlora_lightning.data.prompts import PromptsDataModule

__all__ = [
    "SFTDataModule",
    "GuanacoDataModule",
    "CodeAlpacaDataModule",
    "GSM8KDataModule",
    "ColumnDataModule",
    "PreferenceDataModule",
    "KTODataModule",
    "PromptsDataModule",
    "load_raw_dataset",
    "pad_batch",
]
