"""GSM8K: question -> worked answer ending in ``#### <number>``; loss on the answer."""

from __future__ import annotations

from qlora_lightning.data.base import SFTDataModule


class GSM8KDataModule(SFTDataModule):
    """GSM8K (``openai/gsm8k``, config ``main``) or a local file of question/answer rows (or any SFT
    format).

    ``data_report.json`` counts ``final_line_lost``: rows whose response, cut on the right to fit
    ``max_seq_length``, lost its ``#### N`` line (a model trained on them learns no final answer).
    """

    default_path = "openai/gsm8k"
    default_hub_config = "main"
    native_format = "gsm8k"
    default_user_template = "Question: {content}\nAnswer:"
