"""Unpaired preference rows for KTO: a prompt, one completion and a thumbs-up / thumbs-down label.

Rows are read by format (``data.format``, ``auto`` by default; see ``data/formats.py``), like SFT
rows plus a ``label`` field (``label_column``): TRL's ``prompt`` + ``completion`` + ``label``
(``trl-lib/kto-mix-14k``), or ``messages`` / ``conversations`` / Alpaca rows with a label, where
the last assistant turn is the completion and everything before it the prompt. A label is a JSON
boolean, the strings ``"true"`` / ``"false"`` (any case: CSV and spreadsheet exports) or 0 / 1;
a row without one, or with anything else, stops the run with a line naming the row, since a
guessed label would train the model the wrong way.

Paired preference files (every format ``PreferenceDataModule`` reads) become unpaired rows as TRL's
``unpair_preference_dataset`` makes them: each pair gives its chosen reply as a desirable row and
its rejected reply as an undesirable one (reported as ``line N (chosen)`` / ``line N (rejected)``).
``from_pairs`` says which kind a file holds; by default the first rows' fields tell.

Text and truncation are the preference pairs' (``data/preference.py``): the prompt is cut from the
left (head kept) down to ``max_prompt_length``, then the completion on the right. Rows are dropped
(counted, one warning line per split) for an empty completion or a prompt whose head fills
``max_seq_length``.

A batch holds B rows as (B, T) ``input_ids`` / ``attention_mask`` / ``labels``, a (B,) bool
``label``, and KTO's mismatched pairs as (B, T') ``kl_input_ids`` / ``kl_attention_mask`` /
``kl_labels``: row i's prompt with row i-1's completion (row 0 takes the last row's), as TRL pairs
them, its completion cut on the right to fit ``max_seq_length``. They estimate KL(policy ||
reference) on completions the batch holds, paired with prompts they do not answer.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable, Optional

import torch

from qlora_lightning.data.base import ORIGIN, Dataset, SFTDataModule, pad_batch, without_origin
from qlora_lightning.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    holds_pairs,
    preference_reader,
    sft_reader,
)
from qlora_lightning.data.preference import (
    cut_to_fit,
    prompt_and_reply_example,
    prompt_and_response,
)
from qlora_lightning.data.tokenize import ChatFormat, Message, RowError
from qlora_lightning.errors import UserError

Example = tuple[str, list[Message], str, bool]  # origin suffix, prompt messages, completion, label
BAD_LABEL = "bad label"  # how a label's RowError starts: such rows stop the run
_TRUTH = {"true": True, "false": False}


# ---- rows -> (prompt, completion, label) ----------------------------------------------------


def read_label(row: dict, column: str) -> bool:
    """A row's label: a boolean, ``"true"`` / ``"false"`` in any case, or 0 / 1."""
    value = row.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUTH:
        return _TRUTH[value.strip().lower()]
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        raise RowError(f"{BAD_LABEL}: no field '{column}'")
    raise RowError(f"{BAD_LABEL}: '{column}' is {value!r}, not true or false")


def unpaired_example(
    row: dict, to_messages: Callable[[dict], list[Message]], label_column: str
) -> list[Example]:
    """One labelled row: its last assistant turn is the completion, the turns before it the
    prompt."""
    # First: a bad label stops the run whatever else the row holds.
    label = read_label(row, label_column)
    messages = to_messages(row)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no assistant turn to train on")
    return [("", messages[:last], messages[last]["content"], label)]


def pair_examples(
    row: dict, to_pair: Callable[[dict], tuple[list[Message], str, str]]
) -> list[Example]:
    """A preference pair as two unpaired rows: the chosen reply desirable, the rejected one not."""
    prompt, chosen, rejected = to_pair(row)
    return [(" (chosen)", prompt, chosen, True), (" (rejected)", prompt, rejected, False)]


# ---- (prompt, completion) -> token ids ------------------------------------------------------


def tokenize_completion(
    prompt: list[Message],
    completion: str,
    tokenizer,
    fmt: ChatFormat,
    max_seq_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
) -> dict:
    """``prompt_ids`` / ``completion_ids`` and what was cut, per the preference pairs' policy."""
    if not completion.strip():
        raise RowError("empty response")
    prompt_ids, completion_ids, prompt_cut, response_cut = cut_to_fit(
        *prompt_and_response(prompt, completion, tokenizer, fmt, use_chat_template),
        max_seq_length,
        max_prompt_length,
    )
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "prompt_truncated": prompt_cut,
        "response_truncated": response_cut,
    }


def _encode_rows(
    batch: dict[str, list], to_examples: Callable[[dict], list[Example]], **tokenize
) -> dict[str, list]:
    """Raw rows (columns) -> one tokenized row per example, each with its origin (module-level, for
    caching)."""
    out = defaultdict(list)

    def add(origin: str, encoded: dict) -> None:
        for column, value in {ORIGIN: origin, **encoded}.items():
            out[column].append(value)

    for values in zip(*batch.values()):
        row = dict(zip(batch, values))
        try:
            examples = to_examples(without_origin(row))
        except RowError as err:
            add(row[ORIGIN], _dropped(str(err)))
            continue
        for tag, prompt, completion, label in examples:
            try:
                add(
                    row[ORIGIN] + tag,
                    {
                        **tokenize_completion(prompt, completion, **tokenize),
                        "label": label,
                        "drop_reason": "",
                    },
                )
            except RowError as err:
                add(row[ORIGIN] + tag, _dropped(str(err)))
    return dict(out)


def _dropped(reason: str) -> dict:
    return {
        "prompt_ids": [],
        "completion_ids": [],
        "prompt_truncated": False,
        "response_truncated": False,
        "label": False,
        "drop_reason": reason,
    }


# ---- batches ---------------------------------------------------------------------------


def pad_unpaired(
    rows: list[dict], pad_id: int, max_seq_length: int, multiple: Optional[int] = None
) -> dict:
    """B rows -> the (B, T) sequences, the (B,) labels and the (B, T') mismatched KL sequences
    (module docstring).

    A batch of one row pairs it with itself: its KL estimate is then its own log-ratio (hence
    ``KTOModule`` wants batches of two rows or more).
    """
    before = rows[-1:] + rows[:-1]  # TRL's rotation: completions move one row down
    batch = pad_batch(
        [prompt_and_reply_example(r["prompt_ids"], r["completion_ids"]) for r in rows],
        pad_id,
        multiple,
    )
    mismatched = [
        prompt_and_reply_example(
            r["prompt_ids"], o["completion_ids"][: max_seq_length - len(r["prompt_ids"])]
        )
        for r, o in zip(rows, before)
    ]
    batch.update(
        {f"kl_{name}": value for name, value in pad_batch(mismatched, pad_id, multiple).items()}
    )
    batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    return batch


class KTODataModule(SFTDataModule):
    """Unpaired rows (prompt, completion, label) for KTO, or preference pairs split into them; see
    the module docstring.

    Args:
        label_column: The field holding each row's label (unpaired rows).
        from_pairs: Whether the file holds preference pairs, to split into a desirable and an
            undesirable row each; None: whichever most of its first rows are.
    """

    default_path = "trl-lib/kto-mix-14k"
    # Unpaired rows in every SFT layout but named columns; pairs in every preference layout but
    # named columns.
    formats = tuple(
        name for name in dict.fromkeys(SFT_FORMATS + PREFERENCE_FORMATS) if name != "columns"
    )
    encodes_batches = True  # a pair becomes two rows

    def __init__(self, label_column: str = "label", from_pairs: Optional[bool] = None, **kwargs):
        if kwargs.get("packing", "off") != "off" or kwargs.get("group_by_length"):
            raise UserError("data.packing and data.group_by_length do not apply to KTO rows")
        if kwargs.get("train_on", "all_assistant") != "all_assistant":
            raise UserError(
                "data.train_on does not apply to KTO rows (only the completion is scored)"
            )
        super().__init__(**kwargs)
        self.label_column, self.from_pairs = label_column, from_pairs

    def _read_format(self, ds: Dataset) -> str:
        if self.from_pairs is None:
            self.from_pairs = holds_pairs(self.first_rows(ds))
        self.preference = self.from_pairs  # what format detection may find
        return super()._read_format(ds)

    def _warn_unused_fields(self, ds: Dataset, read: set[str]) -> None:
        super()._warn_unused_fields(ds, read if self.from_pairs else read | {self.label_column})

    def refusal_hint(self, reason: str) -> Optional[str]:
        if reason.startswith(BAD_LABEL):
            return "every row needs a label, true or false"
        return super().refusal_hint(reason)

    def encoder(self) -> tuple[Callable[..., dict], dict]:
        assert self.row_format is not None  # read by setup before a split is encoded
        if self.from_pairs:
            to_examples = functools.partial(
                pair_examples, to_pair=preference_reader(self.row_format, self.roles)
            )
        else:
            to_examples = functools.partial(
                unpaired_example,
                to_messages=sft_reader(self.row_format, self.roles),
                label_column=self.label_column,
            )
        return _encode_rows, {
            "to_examples": to_examples,
            "tokenizer": self.tokenizer,
            "fmt": self.chat_format,
            "max_seq_length": self.max_seq_length,
            "max_prompt_length": self.max_prompt_length,
            "use_chat_template": self.use_chat_template,
        }

    def describe(self) -> dict:
        train = self.splits.get("train")
        return {
            **super().describe(),
            "max_prompt_length": self.max_prompt_length,
            "from_pairs": self.from_pairs,
            "desirable_train_rows": sum(train["label"]) if train is not None else None,
        }

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """B rows -> one batch with its mismatched KL sequences (see ``pad_unpaired``)."""
        return pad_unpaired(
            rows, self.tokenizer.pad_token_id, self.max_seq_length, self.pad_to_multiple_of
        )
