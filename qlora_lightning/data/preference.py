"""Preference pairs for DPO: a prompt, a chosen and a rejected response -> token ids of both
sequences.

Rows are read by format (``data.format``, ``auto`` by default; see ``data/formats.py``):
TRL's explicit and implicit-prompt rows (``trl-lib/ultrafeedback_binarized``,
``HuggingFaceH4/ultrafeedback_binarized``), LLaMA-Factory's ShareGPT pairs, OpenAI's preference
fine-tuning rows, ``Anthropic/hh-rlhf`` transcripts, or named ``columns`` (``Intel/orca_dpo_pairs``
with ``prompt_column: question, system_column: system``).

Text is rendered like SFT data (``data/tokenize.py``): the tokenizer's chat template with
``use_chat_template``, else ``user_template`` / ``system_template``, EOS after each response;
earlier assistant turns of the prompt are context, only the reply carries loss.

Truncation (``max_seq_length`` per sequence, prompt + one response) follows the SFT policy
(``data/tokenize.py``) for each of the two sequences: the prompt is cut from the left (BOS and a
leading system message kept) to no fewer than ``max_prompt_length`` tokens, then the response on
the right. Each sequence keeps as much of its prompt as fits beside its own response, as TRL's
``keep_end`` does. Rows are dropped (counted, one warning line per split) when a response is
empty, chosen and rejected are identical (before or after truncation), or not even the head of the
prompt leaves room for a response token.

A batch holds each pair as two sequences, chosen rows first: ``input_ids``, ``attention_mask``
and ``labels`` are (2B, T), so one forward covers both responses and ``attention_mask`` counts
the tokens of both (the perf callback counts throughput from it).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from qlora_lightning.data.base import SFTDataModule, pad_batch, without_origin
from qlora_lightning.data.formats import PREFERENCE_FORMATS, Pair, preference_reader
from qlora_lightning.data.tokenize import (
    HEAD,
    TRAINED,
    ChatFormat,
    Message,
    RowError,
    encode_segments,
    plan_cut,
    render_segments,
)
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REPLIES = ("chosen", "rejected")


# ---- (prompt, chosen, rejected) -> token ids ---------------------------------------------


def tokenize_pair(
    prompt: list[Message],
    chosen: str,
    rejected: str,
    tokenizer,
    fmt: ChatFormat,
    max_seq_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
) -> dict:
    """``{chosen,rejected}_prompt_ids`` / ``{chosen,rejected}_ids`` and what was cut, per the
    module's policy.

    Raises:
        RowError: for an empty response, identical responses, or a prompt whose head fills
            ``max_seq_length``.
    """
    if not chosen.strip() or not rejected.strip():
        raise RowError("empty response")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are identical")
    sequences = [
        prompt_and_response(prompt, reply, tokenizer, fmt, use_chat_template)
        for reply in (chosen, rejected)
    ]
    if sequences[0][:2] != sequences[1][:2]:
        raise RowError("the prompt tokenizes differently before chosen and rejected")
    out: dict[str, Any] = {"prompt_truncated": False, "response_truncated": False}
    for name, sequence in zip(REPLIES, sequences):
        prompt_ids, response_ids, prompt_cut, response_cut = cut_to_fit(
            *sequence, max_seq_length, max_prompt_length
        )
        out[f"{name}_prompt_ids"], out[f"{name}_ids"] = prompt_ids, response_ids
        out["prompt_truncated"] |= prompt_cut
        out["response_truncated"] |= response_cut
    if (
        out["chosen_prompt_ids"] + out["chosen_ids"]
        == out["rejected_prompt_ids"] + out["rejected_ids"]
    ):
        raise RowError("chosen and rejected are identical after truncation")
    return out


def prompt_and_response(
    prompt: list[Message], reply: str, tokenizer, fmt: ChatFormat, use_chat_template: bool
) -> tuple[int, list[int], list[int]]:
    """The kept head's length, the prompt's ids (head included) and the reply's ids (EOS
    included)."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    ids, kinds = encode_segments(
        render_segments(messages, tokenizer, fmt, use_chat_template, "last_assistant"),
        tokenizer,
        use_chat_template,
    )
    n_head = next((i for i, kind in enumerate(kinds) if kind != HEAD), len(kinds))
    start = kinds.index(TRAINED)
    return n_head, ids[:start], ids[start:]


def cut_to_fit(
    n_head: int,
    prompt_ids: list[int],
    response_ids: list[int],
    max_seq_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int], bool, bool]:
    """One prompt + reply sequence cut per the SFT policy (``plan_cut``): the kept prompt and reply
    ids, and whether each was cut."""
    prompt_cut, response_cut = plan_cut(
        n_head, len(prompt_ids), len(response_ids), max_seq_length, max_prompt_length
    )
    return (
        prompt_ids[:n_head] + prompt_ids[n_head + prompt_cut :],
        response_ids[: len(response_ids) - response_cut],
        prompt_cut > 0,
        response_cut > 0,
    )


def prompt_and_reply_example(prompt_ids: list[int], reply_ids: list[int]) -> dict[str, list[int]]:
    """One sequence for ``pad_batch``: the prompt then the reply, loss on the reply only."""
    return {
        "input_ids": prompt_ids + reply_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + reply_ids,
    }


def _encode_pair_row(
    row: dict,
    to_pair: Callable[[dict], Pair],
    tokenizer,
    fmt: ChatFormat,
    max_seq_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
) -> dict:
    """Module-level (not a method) so that `datasets` can hash it and cache the tokenized split."""
    try:
        out = tokenize_pair(
            *to_pair(without_origin(row)),
            tokenizer,
            fmt,
            max_seq_length,
            max_prompt_length,
            use_chat_template,
        )
        return {**out, "drop_reason": ""}
    except RowError as err:
        empty: dict[str, list[int]] = {
            f"{name}{part}_ids": [] for name in REPLIES for part in ("_prompt", "")
        }
        return {
            **empty,
            "prompt_truncated": False,
            "response_truncated": False,
            "drop_reason": str(err),
        }


# ---- batches ---------------------------------------------------------------------------


def pad_pairs(
    rows: list[dict], pad_id: int, multiple: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """B pairs -> (2B, T) ``input_ids`` / ``attention_mask`` / ``labels``: the chosen sequences,
    then the rejected.

    Both halves are padded to one length so that a single forward covers them; labels are -100
    on the prompt and on padding. Precomputed reference log-probs, when the rows have them,
    come along as (B,) ``ref_chosen_logps`` / ``ref_rejected_logps``.
    """
    sequences = [
        prompt_and_reply_example(r[f"{name}_prompt_ids"], r[f"{name}_ids"])
        for name in REPLIES
        for r in rows
    ]
    batch = pad_batch(sequences, pad_id, multiple)
    for column in REFERENCE_COLUMNS:
        if column in rows[0]:
            batch[column] = torch.tensor([r[column] for r in rows], dtype=torch.float32)
    return batch


def _reference_columns(
    batch: dict[str, list],
    compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
    collate: Callable[[list[dict]], dict],
) -> dict[str, list[float]]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    chosen, rejected = compute(collate(rows))
    return {REFERENCE_COLUMNS[0]: chosen.tolist(), REFERENCE_COLUMNS[1]: rejected.tolist()}


class PreferenceDataModule(SFTDataModule):
    """Preference pairs (prompt, chosen, rejected) for DPO; see the module docstring for formats and
    truncation.

    Args:
        prompt_column: ``format: columns``: column of the prompt (a string or a list of messages);
            unused when chosen and rejected are whole conversations.
        chosen_column: ``format: columns``: column of the preferred response (a string, or messages
            ending with it).
        rejected_column: ``format: columns``: column of the dispreferred response.
        system_column: ``format: columns``: optional column of a system prompt.
    """

    default_path = "trl-lib/ultrafeedback_binarized"
    formats = PREFERENCE_FORMATS
    preference = True

    def __init__(
        self,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        system_column: Optional[str] = None,
        **kwargs,
    ):
        if kwargs.get("packing", "off") != "off" or kwargs.get("group_by_length"):
            raise UserError(
                "data.packing and data.group_by_length do not apply to preference pairs"
            )
        if kwargs.get("train_on", "all_assistant") != "all_assistant":
            raise UserError(
                "data.train_on does not apply to preference pairs (only the reply is scored)"
            )
        super().__init__(**kwargs)
        self.column_names = {
            "prompt_column": prompt_column,
            "chosen_column": chosen_column,
            "rejected_column": rejected_column,
            "system_column": system_column,
        }

    def columns(self) -> Optional[dict]:
        return self.column_names

    def encoder(self) -> tuple[Callable[..., dict], dict]:
        assert self.row_format is not None  # read by setup before a split is encoded
        to_pair = preference_reader(self.row_format, self.roles, self.columns())
        return _encode_pair_row, {
            "to_pair": to_pair,
            "tokenizer": self.tokenizer,
            "fmt": self.chat_format,
            "max_seq_length": self.max_seq_length,
            "max_prompt_length": self.max_prompt_length,
            "use_chat_template": self.use_chat_template,
        }

    def describe(self) -> dict:
        return {**super().describe(), "max_prompt_length": self.max_prompt_length}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """B pairs -> one (2B, T) batch, chosen sequences first (see ``pad_pairs``)."""
        return pad_pairs(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def add_reference_logps(
        self,
        compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
        reference_fingerprint: str,
        batch_size: int,
    ) -> None:
        """Give every split ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, computed once.

        The columns are cached with the tokenized split (in the `datasets` cache, for data that
        has one) under a fingerprint of the split and of the reference model, so a later run on
        the same data with the same reference reads them back instead of recomputing them.

        Args:
            compute: A collated batch (``collate``) -> the reference's (B,) chosen and rejected
                log-probs.
            reference_fingerprint: Identifies the reference weights.
            batch_size: Pairs per reference forward.
        """
        # Datasets costs a second of a config's parse (data/base.py)
        from datasets.fingerprint import (
            Hasher,
        )

        for name, ds in self.splits.items():
            if REFERENCE_COLUMNS[0] in ds.column_names:
                continue
            self.splits[name] = ds.map(
                _reference_columns,
                fn_kwargs={"compute": compute, "collate": self.collate},
                batched=True,
                batch_size=batch_size,
                new_fingerprint=Hasher.hash((ds._fingerprint, reference_fingerprint)),
                desc=f"reference log-probs of {name}",
            )
