"""A user's own JSON / JSONL / CSV / Parquet files, with a column mapping."""

from __future__ import annotations

import functools
from typing import Callable, Optional

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.data.tokenize import Message, RowError, optional_str, required_str


def column_messages(row: dict, prompt_column: str, response_column: str, system_column: Optional[str],
                    messages_column: Optional[str]) -> list[Message]:
    """Either a ready list of chat messages, or a prompt column + response column (+ system)."""
    if messages_column:
        messages = row.get(messages_column)
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RowError(f"field '{messages_column}' is not a list of {{role, content}} messages")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    system = optional_str(row, system_column) if system_column else None
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": required_str(row, prompt_column)},
                       {"role": "assistant", "content": required_str(row, response_column)}]


class ColumnDataModule(SFTDataModule):
    """Local files or a hub dataset whose columns are named in the config.

    Args:
        prompt_column: Column holding the prompt.
        response_column: Column holding the response (the tokens that carry loss).
        system_column: Optional column holding a system prompt.
        messages_column: Column holding a list of ``{role, content}`` messages; overrides the three above.
    """

    default_user_template = "### Instruction:\n{content}\n\n### Response:\n"

    def __init__(self, path: str, prompt_column: str = "prompt", response_column: str = "response",
                 system_column: Optional[str] = None, messages_column: Optional[str] = None, **kwargs):
        super().__init__(path=path, **kwargs)
        self.columns = {"prompt_column": prompt_column, "response_column": response_column,
                        "system_column": system_column, "messages_column": messages_column}

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        return functools.partial(column_messages, **self.columns)
