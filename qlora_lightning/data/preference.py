"""Preference pairs for DPO: a prompt, a chosen and a rejected response -> token ids of the three parts.

Row layouts (``layout`` and the column names):

- ``columns``: ``prompt`` / ``chosen`` / ``rejected`` columns, each a string or a list of
  ``{role, content}`` messages, plus an optional system-prompt column. This covers TRL's
  conversational format (prompt messages, chosen = ``[assistant message]``),
  ``HuggingFaceH4/ultrafeedback_binarized`` and ``trl-lib/ultrafeedback_binarized`` (chosen and
  rejected are whole conversations; everything before their last message is the prompt) and
  ``Intel/orca_dpo_pairs`` (``prompt_column: question``, ``system_column: system``).
- ``hh-rlhf``: ``Anthropic/hh-rlhf``: chosen and rejected are whole ``\\n\\nHuman: ...\\n\\nAssistant: ...``
  transcripts sharing a prefix; they are split at their last assistant turn.

Text is rendered like SFT data (``data/tokenize.py``): the tokenizer's chat template with
``use_chat_template``, else ``user_template`` / ``system_template``, EOS after each response.

Truncation (``max_seq_length`` per sequence, prompt + one response): when the prompt plus the
longer response does not fit, the prompt is cut first, from the left (oldest context first,
BOS kept), but not below ``max_prompt_length`` tokens; then both responses are cut on the right
to the room left. Chosen and rejected always share the same prompt tokens, so the
prompt/response boundary sits at the same position in both. Rows are dropped (counted, one
warning line per split) when a response is empty, chosen and rejected are identical (before or
after truncation), or the prompt alone fills ``max_seq_length``.

A batch holds each pair as two sequences, chosen rows first: ``input_ids``, ``attention_mask``
and ``labels`` are (2B, T), so one forward covers both responses and ``attention_mask`` counts
the tokens of both (the perf callback counts throughput from it).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Literal, Optional

import torch
from datasets.fingerprint import Hasher

from qlora_lightning.data.base import SFTDataModule, pad_batch
from qlora_lightning.data.generic import column_messages
from qlora_lightning.data.tokenize import ChatFormat, Message, RowError, optional_str, required_str, tokenize_messages
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX

PairLayout = Literal["columns", "hh-rlhf"]
Pair = tuple[list[Message], str, str]  # prompt messages, chosen reply, rejected reply
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_REPLY = "\n\nAssistant:"


# ---- raw row -> (prompt messages, chosen, rejected) -------------------------------------

def pair_from_columns(row: dict, prompt_column: str, chosen_column: str, rejected_column: str,
                      system_column: Optional[str]) -> Pair:
    """Prompt / chosen / rejected columns, each a string or a list of messages (+ a system prompt)."""
    chosen_context, chosen = _reply(row, chosen_column)
    rejected_context, rejected = _reply(row, rejected_column)
    contexts = [c for c in (chosen_context, rejected_context) if c]
    if len(contexts) == 2 and contexts[0] != contexts[1]:
        raise RowError("chosen and rejected continue different conversations")
    prompt = contexts[0] if contexts else _prompt(row, prompt_column)
    system = optional_str(row, system_column) if system_column else None
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen, rejected


def pair_from_transcripts(row: dict, chosen_column: str, rejected_column: str) -> Pair:
    """Two ``Human:/Assistant:`` transcripts sharing a prompt, split at their last assistant turn."""
    prompt_text, chosen = _split_last_reply(required_str(row, chosen_column))
    rejected_prompt_text, rejected = _split_last_reply(required_str(row, rejected_column))
    if prompt_text != rejected_prompt_text:
        raise RowError("chosen and rejected transcripts do not share a prompt")
    parts = _HH_TURN.split(prompt_text)  # ["", "Human", " q", "Assistant", " a", ..., "Human", " q"]
    if parts[0].strip() or len(parts) < 3:
        raise RowError("transcript is not '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    prompt = [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]
    return prompt, chosen.strip(), rejected.strip()


def _reply(row: dict, column: str) -> tuple[list[Message], str]:
    """A response column: a string, or messages whose last one is the reply (the rest is context)."""
    if isinstance(row.get(column), list):
        messages = column_messages(row, prompt_column="", response_column="", system_column=None,
                                   messages_column=column)
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError(f"field '{column}' does not end with an assistant message")
        return messages[:-1], messages[-1]["content"]
    return [], required_str(row, column)


def _prompt(row: dict, column: str) -> list[Message]:
    if isinstance(row.get(column), list):
        return column_messages(row, prompt_column="", response_column="", system_column=None, messages_column=column)
    return [{"role": "user", "content": required_str(row, column)}]


def _split_last_reply(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind(_HH_REPLY)
    if cut < 0:
        raise RowError("transcript has no '\\n\\nAssistant:' turn")
    return transcript[:cut], transcript[cut + len(_HH_REPLY):]


# ---- (prompt, chosen, rejected) -> token ids ---------------------------------------------

def tokenize_pair(prompt: list[Message], chosen: str, rejected: str, tokenizer, fmt: ChatFormat,
                  max_seq_length: int, max_prompt_length: int, use_chat_template: bool) -> dict:
    """``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (+ ``truncated``), per the module's truncation policy.

    Raises:
        RowError: for an empty response, identical responses, or a prompt that fills ``max_seq_length``.
    """
    if not chosen.strip() or not rejected.strip():
        raise RowError("empty response")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are identical")
    prompt_ids, chosen_ids = _prompt_and_response(prompt, chosen, tokenizer, fmt, use_chat_template)
    rejected_prompt_ids, rejected_ids = _prompt_and_response(prompt, rejected, tokenizer, fmt, use_chat_template)
    if prompt_ids != rejected_prompt_ids:
        raise RowError("the prompt tokenizes differently before chosen and rejected")
    n_bos = int(tokenizer.bos_token_id is not None and prompt_ids[:1] == [tokenizer.bos_token_id])
    prompt_ids, chosen_ids, rejected_ids, truncated = truncate_pair(
        prompt_ids, chosen_ids, rejected_ids, max_seq_length, max_prompt_length, n_keep_left=n_bos)
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected are identical after truncation")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "truncated": truncated}


def _prompt_and_response(prompt: list[Message], reply: str, tokenizer, fmt: ChatFormat,
                         use_chat_template: bool) -> tuple[list[int], list[int]]:
    # The SFT tokenizer renders the conversation (template, BOS, EOS); the last run of loss
    # tokens is the reply, everything before it (earlier assistant turns included) the prompt.
    encoded = tokenize_messages(prompt + [{"role": "assistant", "content": reply}], tokenizer, fmt,
                                max_seq_length=sys.maxsize, use_chat_template=use_chat_template)
    ids, labels = encoded["input_ids"], encoded["labels"]
    start = len(ids)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_seq_length: int,
                  max_prompt_length: int, n_keep_left: int = 0) -> tuple[list[int], list[int], list[int], bool]:
    """Fit prompt + the longer response into ``max_seq_length``: prompt cut first (from the left), then responses.

    Args:
        prompt: Prompt token ids.
        chosen: Chosen response token ids.
        rejected: Rejected response token ids.
        max_seq_length: Longest sequence (prompt + one response).
        max_prompt_length: The prompt is never cut below this many tokens.
        n_keep_left: Leading prompt tokens that are never cut (BOS).

    Returns:
        The three id lists and whether anything was cut.

    Raises:
        RowError: when the prompt alone fills ``max_seq_length`` (no room for a response).
    """
    if len(prompt) >= max_seq_length:
        raise RowError("prompt longer than max_seq_length")
    excess = len(prompt) + max(len(chosen), len(rejected)) - max_seq_length
    if excess <= 0:
        return prompt, chosen, rejected, False
    cut = min(excess, max(len(prompt) - max(max_prompt_length, n_keep_left), 0))
    prompt = prompt[:n_keep_left] + prompt[n_keep_left + cut:]
    room = max_seq_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def _encode_pair_row(row: dict, to_pair: Callable[[dict], Pair], tokenizer, fmt: ChatFormat, max_seq_length: int,
                     max_prompt_length: int, use_chat_template: bool) -> dict:
    """Module-level (not a method) so that `datasets` can hash it and cache the tokenized split."""
    try:
        prompt, chosen, rejected = to_pair(row)
        out = tokenize_pair(prompt, chosen, rejected, tokenizer, fmt, max_seq_length, max_prompt_length,
                            use_chat_template)
        return {**out, "drop_reason": ""}
    except RowError as err:
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": False, "drop_reason": str(err)}


# ---- batches ---------------------------------------------------------------------------

def pad_pairs(rows: list[dict], pad_id: int, multiple: Optional[int] = None) -> dict[str, torch.Tensor]:
    """B pairs -> (2B, T) ``input_ids`` / ``attention_mask`` / ``labels``: the chosen sequences, then the rejected.

    Both halves are padded to one length so that a single forward covers them; labels are -100
    on the prompt and on padding. Precomputed reference log-probs, when the rows have them,
    come along as (B,) ``ref_chosen_logps`` / ``ref_rejected_logps``.
    """
    sequences = [{"input_ids": r["prompt_ids"] + r[key], "labels": [IGNORE_INDEX] * len(r["prompt_ids"]) + r[key]}
                 for key in ("chosen_ids", "rejected_ids") for r in rows]
    batch = pad_batch(sequences, pad_id, multiple)
    for column in REFERENCE_COLUMNS:
        if column in rows[0]:
            batch[column] = torch.tensor([r[column] for r in rows], dtype=torch.float32)
    return batch


def _reference_columns(batch: dict[str, list], compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
                       collate: Callable[[list[dict]], dict]) -> dict[str, list[float]]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    chosen, rejected = compute(collate(rows))
    return {REFERENCE_COLUMNS[0]: chosen.tolist(), REFERENCE_COLUMNS[1]: rejected.tolist()}


class PreferenceDataModule(SFTDataModule):
    """Preference pairs (prompt, chosen, rejected) for DPO; see the module docstring for layouts and truncation.

    Args:
        layout: ``columns`` (prompt / chosen / rejected columns, strings or message lists) or
            ``hh-rlhf`` (chosen and rejected are whole ``Human:/Assistant:`` transcripts).
        prompt_column: Column of the prompt (a string or a list of messages); unused when chosen
            and rejected are whole conversations.
        chosen_column: Column of the preferred response (a string, or messages ending with it).
        rejected_column: Column of the dispreferred response.
        system_column: Optional column of a system prompt.
        max_prompt_length: The prompt is never cut below this many tokens when a pair is too long
            (the responses are cut instead); default ``max_seq_length // 2``.
    """

    default_path = "trl-lib/ultrafeedback_binarized"

    def __init__(self, layout: PairLayout = "columns", prompt_column: str = "prompt", chosen_column: str = "chosen",
                 rejected_column: str = "rejected", system_column: Optional[str] = None,
                 max_prompt_length: Optional[int] = None, **kwargs):
        if kwargs.get("packing", "off") != "off" or kwargs.get("group_by_length"):
            raise UserError("data.packing and data.group_by_length do not apply to preference pairs")
        super().__init__(**kwargs)
        self.max_prompt_length = self.max_seq_length // 2 if max_prompt_length is None else max_prompt_length
        if not 0 < self.max_prompt_length < self.max_seq_length:
            raise UserError(f"data.max_prompt_length must be in [1, max_seq_length), got {self.max_prompt_length}")
        self.layout = layout
        if layout == "hh-rlhf":
            self.to_pair = functools.partial(pair_from_transcripts, chosen_column=chosen_column,
                                             rejected_column=rejected_column)
        else:
            self.to_pair = functools.partial(pair_from_columns, prompt_column=prompt_column,
                                             chosen_column=chosen_column, rejected_column=rejected_column,
                                             system_column=system_column)

    def encoder(self) -> tuple[Callable[..., dict], dict]:
        return _encode_pair_row, {"to_pair": self.to_pair, "tokenizer": self.tokenizer, "fmt": self.format,
                                  "max_seq_length": self.max_seq_length, "max_prompt_length": self.max_prompt_length,
                                  "use_chat_template": self.use_chat_template}

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.layout, "max_prompt_length": self.max_prompt_length}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """B pairs -> one (2B, T) batch, chosen sequences first (see ``pad_pairs``)."""
        return pad_pairs(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def add_reference_logps(self, compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
                            reference_fingerprint: str, batch_size: int) -> None:
        """Give every split ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, computed once.

        The columns are cached with the tokenized split (in the `datasets` cache, for data that
        has one) under a fingerprint of the split and of the reference model, so a later run on
        the same data with the same reference reads them back instead of recomputing them.

        Args:
            compute: A collated batch (``collate``) -> the reference's (B,) chosen and rejected log-probs.
            reference_fingerprint: Identifies the reference weights.
            batch_size: Pairs per reference forward.
        """
        for name, ds in self.splits.items():
            if REFERENCE_COLUMNS[0] in ds.column_names:
                continue
            self.splits[name] = ds.map(
                _reference_columns, fn_kwargs={"compute": compute, "collate": self.collate}, batched=True,
                batch_size=batch_size, new_fingerprint=Hasher.hash((ds._fingerprint, reference_fingerprint)),
                desc=f"reference log-probs of {name}")
