"""CodeAlpaca: instruction, optional input, output; loss on the output."""

from __future__ import annotations

from qlora_lightning.data.base import SFTDataModule


class CodeAlpacaDataModule(SFTDataModule):
    """CodeAlpaca-20k (``sahil2801/CodeAlpaca-20k``) or a local file of instruction/input/output
    rows (any SFT format)."""

    default_path = "sahil2801/CodeAlpaca-20k"
    native_format = "alpaca"
    default_user_template = (
        "Below is an instruction that describes a programming task. "
        "Write a response that completes the request.\n\n"
        "### Instruction:\n{content}\n\n### Response:\n"
    )
