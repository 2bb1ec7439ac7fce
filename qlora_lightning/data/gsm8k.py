"""GSM8K: question -> worked answer ending in ``#### <number>``; loss on the answer."""

from __future__ import annotations

from typing import Callable

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.data.tokenize import Message, RowError, required_str


def gsm8k_messages(row: dict) -> list[Message]:
    """The question asks; the full worked answer, with its final ``#### N`` line, answers."""
    answer = required_str(row, "answer")
    if "####" not in answer:
        raise RowError("answer has no '#### <number>' line")
    return [{"role": "user", "content": required_str(row, "question").strip()},
            {"role": "assistant", "content": answer.strip()}]


class GSM8KDataModule(SFTDataModule):
    """GSM8K (``openai/gsm8k``, config ``main``) or a local file of question/answer rows."""

    default_path = "openai/gsm8k"
    default_hub_config = "main"
    default_user_template = "Question: {content}\nAnswer:"

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        return gsm8k_messages
