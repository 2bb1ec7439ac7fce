"""LightningModules: one shared base (``base``, put together from ``building``, ``inputs``,
``stepping``, ``checkpoint_state`` and ``predicting``), one file per objective (SFT, DPO/ORPO/SimPO,
KTO), and what the training step needs to survive kills and bad steps: atomic checkpoint IO and
non-finite losses (``reliability``), and the state an exact resume needs (``resume``).

May import: every layer but ``run``.
"""

from qlora_lightning.modules.base import QLoRAModule, paged_adamw_8bit
from qlora_lightning.modules.dpo import DPOModule
from qlora_lightning.modules.kto import KTOModule
from qlora_lightning.modules.sft import SFTModule

__all__ = ["QLoRAModule", "SFTModule", "DPOModule", "KTOModule", "paged_adamw_8bit"]
