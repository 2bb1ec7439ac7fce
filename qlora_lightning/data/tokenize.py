"""Turn chat messages into (input_ids, labels) with loss on the trained assistant turns only.

Which turns are trained (``train_on``): every assistant turn (``all_assistant``, the default) or
the last one (``last_assistant``); an assistant message marked ``train: False`` is shown, never
trained; system, user and tool turns are always masked.

Truncation policy (``max_seq_length``, the same for SFT and preference pairs): the prompt is
everything before the last trained turn. When a row is too long, the prompt is cut from the
left (oldest tokens first; BOS and a leading system message are kept) down to
``max_prompt_length`` tokens at most, then the response is cut on the right. Over a prompt long
enough to take the whole cut this is TRL's ``keep_end`` truncation, but for the kept head. A row
is dropped (``prompt_too_long_even_truncated``) only when even the head leaves no room for a
response token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional

from transformers import PreTrainedTokenizerBase

from qlora_lightning.losses import IGNORE_INDEX

# {"role": "system" | "user" | "assistant" | "tool", "content": str[, "train": bool]}.
Message = dict
TrainOn = Literal["all_assistant", "last_assistant"]
PROMPT_TOO_LONG = "prompt_too_long_even_truncated"

# What a run of tokens is: the kept head (a leading system message), prompt text, an assistant
# turn that carries loss, or one that is shown but not trained.
HEAD, PROMPT, TRAINED, SHOWN = "head", "prompt", "trained", "shown"


class RowError(ValueError):
    """A row that cannot become a training example; the message says why, in a few words."""


@dataclass
class ChatFormat:
    """How messages become text when the tokenizer's chat template is not used.

    Args:
        user_template: Text for a user turn, with ``{content}`` where the message goes; it
            ends with whatever cue precedes the response (e.g. ``### Assistant:``). Tool
            results are rendered the same way: the assistant answers them as it answers a user.
        system_template: Text for a system message, with ``{content}``.
    """

    user_template: str = "### Human: {content}### Assistant:"
    system_template: str = "{content}\n\n"


def trained_flags(messages: list[Message], train_on: TrainOn) -> list[bool]:
    """Per message, whether its tokens carry loss."""
    flags = [m["role"] == "assistant" and m.get("train", True) for m in messages]
    if train_on == "last_assistant" and any(flags):
        last = max(i for i, flag in enumerate(flags) if flag)
        flags = [i == last for i in range(len(flags))]
    return flags


def render_segments(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    fmt: ChatFormat,
    use_chat_template: bool,
    train_on: TrainOn = "all_assistant",
) -> list[tuple[str, str]]:
    """(text, kind) pieces whose concatenation is the whole conversation; kinds as above."""
    flags = trained_flags(messages, train_on)
    if use_chat_template:
        return _chat_template_segments(messages, flags, tokenizer)
    segments = []
    for i, (m, trained) in enumerate(zip(messages, flags)):
        if m["role"] == "system":
            segments.append(
                (fmt.system_template.format(content=m["content"]), HEAD if i == 0 else PROMPT)
            )
        elif m["role"] == "assistant":
            segments.append((m["content"], TRAINED if trained else SHOWN))
        else:
            segments.append((fmt.user_template.format(content=m["content"]), PROMPT))
    return segments


def _chat_template_segments(
    messages: list[Message], flags: list[bool], tokenizer
) -> list[tuple[str, str]]:
    # Render growing prefixes: each assistant turn is the text the template adds after
    # the generation prompt, so masks follow the template exactly, whatever its markup.
    segments, done = [], ""
    if messages and messages[0]["role"] == "system":
        head = _template(tokenizer, messages[:1], add_generation_prompt=False, default="")
        if head and _template(
            tokenizer, messages, add_generation_prompt=False, default=""
        ).startswith(head):
            segments, done = [(head, HEAD)], head
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RowError("the chat template does not render turns as growing prefixes")
        segments += [
            (prompt[len(done) :], PROMPT),
            (full[len(prompt) :], TRAINED if flags[i] else SHOWN),
        ]
        done = full
    return segments


def _template(tokenizer, messages: list[Message], add_generation_prompt: bool, default: str) -> str:
    try:  # some templates refuse a conversation of a system message alone
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception:  # noqa: BLE001 - templates raise whatever their Jinja code raises
        return default


def encode_segments(
    segments: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool
) -> tuple[list[int], list[str]]:
    """Token ids and, per token, its segment's kind; BOS (when added) counts as head, EOS follows
    each reply."""
    ids = _bos(tokenizer, use_chat_template)
    kinds = [HEAD] * len(ids)
    for text, kind in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if (
            kind in (TRAINED, SHOWN)
            and not use_chat_template
            and tokenizer.eos_token_id is not None
        ):
            piece = piece + [tokenizer.eos_token_id]  # teach the model to stop
        ids += piece
        kinds += [kind] * len(piece)
    return ids, kinds


def plan_cut(
    n_head: int, n_prompt: int, n_response: int, limit: int, max_prompt_length: int
) -> tuple[int, int]:
    """Tokens to cut from the prompt (just after its head) and from the response's end, per the
    policy above.

    Args:
        n_head: Leading prompt tokens that are never cut (BOS, a leading system message).
        n_prompt: Prompt tokens, head included.
        n_response: Response tokens.
        limit: ``max_seq_length``.
        max_prompt_length: The prompt is cut no shorter than this while the response is cut instead.

    Raises:
        RowError: ``prompt_too_long_even_truncated`` when the head leaves no room for a response
            token.
    """
    excess = n_prompt + n_response - limit
    if excess <= 0:
        return 0, 0
    prompt_cut = min(excess, max(n_prompt - max(max_prompt_length, n_head), 0))
    room = limit - (n_prompt - prompt_cut)
    if room <= 0:
        raise RowError(PROMPT_TOO_LONG)
    return prompt_cut, max(n_response - room, 0)


def tokenize_messages(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    fmt: ChatFormat,
    max_seq_length: int,
    max_prompt_length: int = 0,
    use_chat_template: bool = False,
    train_on: TrainOn = "all_assistant",
) -> dict:
    """input_ids / labels for one conversation, truncated per the module's policy, and what was cut.

    Turns after the last assistant turn add nothing to train on and are left out.

    Raises:
        RowError: when no assistant turn would carry loss, or the row cannot fit
            (``PROMPT_TOO_LONG``).
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last + 1]
    trained = [m for m, flag in zip(messages, trained_flags(messages, train_on)) if flag]
    if not trained:
        raise RowError("no assistant turn to train on")
    if not any(m["content"].strip() for m in trained):
        raise RowError("empty response")
    ids, kinds = encode_segments(
        render_segments(messages, tokenizer, fmt, use_chat_template, train_on),
        tokenizer,
        use_chat_template,
    )
    if TRAINED not in kinds:
        raise RowError("empty response")
    n_head = next((i for i, kind in enumerate(kinds) if kind != HEAD), len(kinds))
    n_prompt = max(i for i, kind in enumerate(kinds) if kind == TRAINED)
    while n_prompt > 0 and kinds[n_prompt - 1] == TRAINED:
        n_prompt -= 1  # the start of the last trained run
    prompt_cut, response_cut = plan_cut(
        n_head, n_prompt, len(ids) - n_prompt, max_seq_length, max_prompt_length
    )
    keep = list(range(n_head)) + list(range(n_head + prompt_cut, len(ids) - response_cut))
    labels = [ids[i] if kinds[i] == TRAINED else IGNORE_INDEX for i in keep]
    return {
        "input_ids": [ids[i] for i in keep],
        "labels": labels,
        "prompt_truncated": prompt_cut > 0,
        "response_truncated": response_cut > 0,
    }


def tokenize_prompt(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    fmt: ChatFormat,
    max_seq_length: int,
    use_chat_template: bool = False,
) -> list[int]:
    """Token ids a model continues from: the conversation so far plus the cue for its reply.

    The same tokens as the prompt part of ``tokenize_messages`` (segments tokenized one by one),
    so generation sees what training showed; cut from the left (head kept) to ``max_seq_length``.
    """
    if use_chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, kinds = encode_segments([(text, PROMPT)], tokenizer, use_chat_template=True)
    else:
        ids, kinds = encode_segments(
            render_segments(messages, tokenizer, fmt, use_chat_template=False),
            tokenizer,
            use_chat_template=False,
        )
    n_head = next((i for i, kind in enumerate(kinds) if kind != HEAD), len(kinds))
    excess = max(len(ids) - max_seq_length, 0)
    return ids[:n_head] + ids[n_head + excess :]


def _bos(tokenizer, use_chat_template: bool) -> list[int]:
    # Chat templates write their own BOS text; otherwise add it when the tokenizer would.
    if use_chat_template or tokenizer.bos_token_id is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


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
