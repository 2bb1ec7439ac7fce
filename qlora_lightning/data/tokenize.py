"""Turn chat messages into (input_ids, labels) with loss on assistant tokens only.

Truncation policy (``max_seq_length``): tokens are cut from the left of the prompt
(the oldest context first; BOS is kept) until the row fits; if the last response alone
is still too long, it is cut on the right. Rows left with no response token are dropped
and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from transformers import PreTrainedTokenizerBase

from qlora_lightning.losses import IGNORE_INDEX

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class RowError(ValueError):
    """A row that cannot become a training example; the message says why, in a few words."""


@dataclass
class ChatFormat:
    """How messages become text when the tokenizer's chat template is not used.

    Args:
        user_template: Text for a user turn, with ``{content}`` where the message goes; it
            ends with whatever cue precedes the response (e.g. ``### Assistant:``).
        system_template: Text for a system message, with ``{content}``.
    """

    user_template: str = "### Human: {content}### Assistant:"
    system_template: str = "{content}\n\n"


def render_segments(messages: list[Message], tokenizer: PreTrainedTokenizerBase,
                    fmt: ChatFormat, use_chat_template: bool) -> list[tuple[str, bool]]:
    """(text, is_response) pieces whose concatenation is the whole conversation."""
    if use_chat_template:
        return _chat_template_segments(messages, tokenizer)
    segments = []
    for m in messages:
        if m["role"] == "system":
            segments.append((fmt.system_template.format(content=m["content"]), False))
        elif m["role"] == "user":
            segments.append((fmt.user_template.format(content=m["content"]), False))
        else:
            segments.append((m["content"], True))
    return segments


def _chat_template_segments(messages: list[Message], tokenizer) -> list[tuple[str, bool]]:
    # Render growing prefixes: each assistant turn is the text the template adds after
    # the generation prompt, so masks follow the template exactly, whatever its markup.
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RowError("the chat template does not render turns as growing prefixes")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def tokenize_messages(messages: list[Message], tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat,
                      max_seq_length: int, use_chat_template: bool = False) -> dict:
    """input_ids / labels for one conversation, truncated per the module's policy.

    Raises:
        RowError: when no response token would carry loss.
    """
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("empty response")
    ids = _bos(tokenizer, use_chat_template)
    n_bos = len(ids)
    is_response = [False] * n_bos
    for text, response in render_segments(messages, tokenizer, fmt, use_chat_template):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if response and not use_chat_template and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]  # teach the model to stop
        ids += piece
        is_response += [response] * len(piece)
    ids, is_response, truncated = _truncate(ids, is_response, max_seq_length, n_keep_left=n_bos)
    labels = [t if r else IGNORE_INDEX for t, r in zip(ids, is_response)]
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        raise RowError("no response token left after truncation")
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_prompt(messages: list[Message], tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat,
                    max_seq_length: int, use_chat_template: bool = False) -> list[int]:
    """Token ids a model continues from: the conversation so far plus the cue for its reply.

    The same tokens as the prompt part of ``tokenize_messages`` (segments tokenized one by one),
    so generation sees what training showed; cut from the left (BOS kept) to ``max_seq_length``.
    """
    ids = _bos(tokenizer, use_chat_template)
    n_bos = len(ids)
    if use_chat_template:
        texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    else:
        texts = [text for text, _ in render_segments(messages, tokenizer, fmt, use_chat_template=False)]
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    excess = max(len(ids) - max_seq_length, 0)
    return ids[:n_bos] + ids[n_bos + excess:]


def _bos(tokenizer, use_chat_template: bool) -> list[int]:
    # Chat templates write their own BOS text; otherwise add it when the tokenizer would.
    if use_chat_template or tokenizer.bos_token_id is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


def _truncate(ids: list[int], is_response: list[bool], limit: int,
              n_keep_left: int) -> tuple[list[int], list[bool], bool]:
    excess = len(ids) - limit
    if excess <= 0:
        return ids, is_response, False
    last_response = max(i for i, r in enumerate(is_response) if r)
    last_start = last_response
    while last_start > 0 and is_response[last_start - 1]:
        last_start -= 1
    cut = min(excess, max(last_start - n_keep_left, 0))  # left cut, never into the last response
    ids = ids[:n_keep_left] + ids[n_keep_left + cut:]
    is_response = is_response[:n_keep_left] + is_response[n_keep_left + cut:]
    return ids[:limit], is_response[:limit], True


# Column of a file whose rows' types do not agree (see ``load_raw_dataset``): each row is kept
# as its JSON text and decoded here, one row at a time, so one bad row cannot sink the file.
RAW_JSON = "__json__"


def decode_row(row: dict) -> dict:
    """The row itself, or the object in its raw JSON text."""
    if RAW_JSON not in row:
        return row
    try:
        value = json.loads(row[RAW_JSON])
    except ValueError:
        raise RowError("invalid JSON") from None
    if not isinstance(value, dict):
        raise RowError(f"row is a JSON {type(value).__name__}, not an object")
    try:  # JSON escapes can spell lone surrogates, which no tokenizer accepts
        row[RAW_JSON].encode("utf-8") and json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("invalid unicode") from None
    return value


def optional_str(row: dict, key: str) -> Optional[str]:
    """A string field that may be absent or null."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is {type(value).__name__}, not a string")
    return value


def required_str(row: dict, key: str) -> str:
    """A string field that must be present."""
    value = optional_str(row, key)
    if value is None:
        raise RowError(f"missing field '{key}'")
    return value
