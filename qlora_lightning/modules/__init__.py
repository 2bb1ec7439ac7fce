"""LightningModules: one shared base, one file per objective."""

from qlora_lightning.modules.base import QLoRAModule, paged_adamw_8bit
from qlora_lightning.modules.dpo import DPOModule
from qlora_lightning.modules.kto import KTOModule
from qlora_lightning.modules.sft import SFTModule

__all__ = ["QLoRAModule", "SFTModule", "DPOModule", "KTOModule", "paged_adamw_8bit"]
