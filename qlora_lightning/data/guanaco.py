"""OpenAssistant Guanaco: one ``text`` field of ``### Human: ...### Assistant: ...`` turns."""

from __future__ import annotations

import re
from typing import Callable

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.data.tokenize import Message, RowError, required_str

_TURN = re.compile(r"### (Human|Assistant):")


def guanaco_messages(row: dict) -> list[Message]:
    """Split a Guanaco transcript into user / assistant messages (loss goes on every assistant turn)."""
    text = required_str(row, "text")
    parts = _TURN.split(text)  # ["", "Human", " q", "Assistant", " a", ...]
    if parts[0].strip() or len(parts) < 5:
        raise RowError("text is not '### Human: ...### Assistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


class GuanacoDataModule(SFTDataModule):
    """OpenAssistant Guanaco (``timdettmers/openassistant-guanaco``) or a local file of ``text`` rows."""

    default_path = "timdettmers/openassistant-guanaco"
    default_user_template = "### Human: {content}### Assistant:"

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        return guanaco_messages
