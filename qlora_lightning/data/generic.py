"""A user's own JSON / JSONL / CSV / Parquet files, with a column mapping."""

from __future__ import annotations

from typing import Optional

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.data.formats import Format


class ColumnDataModule(SFTDataModule):
    """Local files or a hub dataset whose columns are named in the config (``format: columns``), or
    any SFT format.

    Args:
        prompt_column: Column holding the prompt (an Alpaca instruction).
        response_column: Column holding the response (the tokens that carry loss).
        system_column: Optional column holding a system prompt.
        messages_column: Column holding a list of ``{role, content}`` messages; overrides the three
            above.
        input_column: Optional column of an Alpaca ``input``, joined under the prompt as
            ``{prompt}\\n\\n### Input:\\n{input}`` when it is not empty.
    """

    default_user_template = "### Instruction:\n{content}\n\n### Response:\n"

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        response_column: str = "response",
        system_column: Optional[str] = None,
        messages_column: Optional[str] = None,
        input_column: Optional[str] = None,
        format: Format = "columns",
        **kwargs,
    ):
        super().__init__(path=path, format=format, **kwargs)
        self.column_names = {
            "prompt_column": prompt_column,
            "response_column": response_column,
            "system_column": system_column,
            "messages_column": messages_column,
            "input_column": input_column,
        }

    def columns(self) -> Optional[dict]:
        return self.column_names
