"""CodeAlpaca: instruction, optional input, output; loss on the output."""

from __future__ import annotations

from typing import Callable

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.data.tokenize import Message, optional_str, required_str


def codealpaca_messages(row: dict) -> list[Message]:
    """The instruction (with its input, when there is one) asks; the output answers."""
    instruction = required_str(row, "instruction").strip()
    extra = (optional_str(row, "input") or "").strip()
    prompt = f"{instruction}\n\n### Input:\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": required_str(row, "output")}]


class CodeAlpacaDataModule(SFTDataModule):
    """CodeAlpaca-20k (``sahil2801/CodeAlpaca-20k``) or a local file of instruction/input/output rows."""

    default_path = "sahil2801/CodeAlpaca-20k"
    default_user_template = ("Below is an instruction that describes a programming task. "
                             "Write a response that completes the request.\n\n"
                             "### Instruction:\n{content}\n\n### Response:\n")

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        return codealpaca_messages
