"""OpenAssistant Guanaco: one ``text`` field of ``### Human: ...### Assistant: ...`` turns."""

from __future__ import annotations

from qlora_lightning.data.base import SFTDataModule


class GuanacoDataModule(SFTDataModule):
    """OpenAssistant Guanaco (``timdettmers/openassistant-guanaco``) or a local file in any SFT
    format."""

    default_path = "timdettmers/openassistant-guanaco"
    native_format = "guanaco"
    default_user_template = "### Human: {content}### Assistant:"
