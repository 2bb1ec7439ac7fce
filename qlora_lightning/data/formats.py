"""Row formats: every reader turns one raw row into the same conversation.

A conversation is a list of ``{role, content}`` messages whose roles are ``system``, ``user``,
``assistant`` or ``tool`` (an assistant message may carry ``train: False``); a preference row
becomes a prompt conversation plus a chosen and a rejected reply. Everything after that
(rendering, masks, truncation) is shared, so a format only has to say where its turns are.

Formats (``data.format``; ``auto`` detects one from the first rows' columns):

- ``alpaca``: ``instruction``, optional ``input`` (joined below the instruction as the Alpaca
  prompt does), ``output``, optional ``system``.
- ``sharegpt``: ``conversations`` (or ``messages``) of ``{from, value}`` turns, optional
  ``system``; for preferences, LLaMA-Factory's layout with ``chosen`` / ``rejected`` as single
  ``{from, value}`` replies.
- ``openai``: ``messages`` of ``{role, content}``, content a string or a list of
  ``{type: text, text}`` parts; an assistant message with ``weight: 0`` is shown, not trained.
- ``openai_preference``: OpenAI's preference fine-tuning rows: ``input.messages``,
  ``preferred_output`` and ``non_preferred_output`` (lists holding one assistant message).
- ``trl``: TRL's rows: ``messages``, or ``prompt`` + ``completion`` (strings or messages) for SFT;
  ``prompt`` + ``chosen`` + ``rejected`` for preferences, or ``chosen`` / ``rejected`` as whole
  conversations sharing their prompt (TRL's implicit prompt, split with ``trl.extract_prompt``).
- ``hh_rlhf``: ``chosen`` / ``rejected`` as whole ``\\n\\nHuman: ...\\n\\nAssistant: ...``
  transcripts.
- ``guanaco``: one ``text`` field of ``### Human: ...### Assistant: ...`` turns.
- ``gsm8k``: ``question`` and ``answer`` (the answer must end in its ``#### N`` line).
- ``columns``: columns named in the config (``ColumnDataModule``, ``PreferenceDataModule``).

Roles go through ``DEFAULT_ROLES`` (overridable with ``data.roles``); a role no entry maps is an
``UnmappedRole`` error naming it, never trained by guess.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from typing import Callable, Literal, Mapping, Optional

from qlora_lightning.data.tokenize import Message, RowError, optional_str, required_str
from qlora_lightning.errors import UserError

Format = Literal[
    "auto",
    "alpaca",
    "sharegpt",
    "openai",
    "openai_preference",
    "trl",
    "hh_rlhf",
    "guanaco",
    "gsm8k",
    "columns",
]
SFT_FORMATS = ("alpaca", "sharegpt", "openai", "trl", "guanaco", "gsm8k", "columns")
PREFERENCE_FORMATS = ("sharegpt", "openai_preference", "trl", "hh_rlhf", "columns")
ROLES = ("system", "user", "assistant", "tool")

# Role names found in public chat data -> this project's roles. ShareGPT's `function_call` is the
# assistant calling a tool (its own output: trained); `observation` / `tool` / `function` /
# `ipython` are what the tool returned (context: masked).
DEFAULT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}

Pair = tuple[list[Message], str, str]  # prompt messages, chosen reply, rejected reply


# How an UnmappedRole's message starts, to tell it from other drop reasons.
UNMAPPED = "unmapped role"


class UnmappedRole(RowError):
    """A message whose role no entry of the role map names."""


def role_map(overrides: Optional[Mapping[str, str]]) -> dict[str, str]:
    """``DEFAULT_ROLES`` with the config's ``data.roles`` on top (names compared
    case-insensitively)."""
    roles = dict(DEFAULT_ROLES)
    for name, role in (overrides or {}).items():
        if role not in ROLES:
            raise UserError(f"data.roles: '{name}' maps to '{role}'; roles are {', '.join(ROLES)}")
        roles[name.strip().lower()] = role
    return roles


# ---- messages --------------------------------------------------------------------------------


def to_messages(
    items,
    roles: Mapping[str, str],
    field: str,
    role_key: str = "role",
    content_key: str = "content",
) -> list[Message]:
    """A list of message objects (``{role, content}`` or ShareGPT's ``{from, value}``) ->
    messages."""
    if not isinstance(items, list) or not items:
        raise RowError(f"field '{field}' is not a non-empty list of messages")
    messages = []
    for item in items:
        if not isinstance(item, dict):
            raise RowError(f"field '{field}' holds a {type(item).__name__}, not a message object")
        name = item.get(role_key)
        if not isinstance(name, str):
            raise RowError(f"a message in '{field}' has no '{role_key}'")
        role = roles.get(name.strip().lower())
        if role is None:
            raise UnmappedRole(f"{UNMAPPED} '{name}' in '{field}'")
        message: Message = {"role": role, "content": _content(item, content_key, field)}
        if role == "assistant" and item.get("weight") == 0:  # OpenAI's "show, do not train"
            message["train"] = False
        messages.append(message)
    return messages


def _content(item: dict, key: str, field: str) -> str:
    content = item.get(key)
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text can be trained on
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RowError(
                    f"a message in '{field}' has a content part of type '{kind}' (only text is "
                    "read)"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None and item.get("tool_calls"):  # an assistant turn that only calls tools
        return json.dumps(item["tool_calls"], ensure_ascii=False)
    raise RowError(f"a message in '{field}' has no text '{key}'")


def _with_system(row: dict, messages: list[Message]) -> list[Message]:
    """Prepend the row's own ``system`` field, when it has one and the messages do not."""
    system = optional_str(row, "system")
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _prompt_field(row: dict, key: str, roles: Mapping[str, str]) -> list[Message]:
    """A prompt given as a string (one user turn) or as messages."""
    value = row.get(key)
    if isinstance(value, list):
        return to_messages(value, roles, key)
    return [{"role": "user", "content": required_str(row, key)}]


# ---- SFT rows -> conversation ----------------------------------------------------------------


def alpaca_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    """The instruction (with its input, when there is one) asks; the output answers."""
    return _with_system(row, alpaca_turns(row, "instruction", "input", "output"))


def alpaca_turns(row: dict, instruction: str, extra: Optional[str], output: str) -> list[Message]:
    """One Alpaca exchange; a non-empty input goes under the instruction as the Alpaca prompt has
    it."""
    prompt = required_str(row, instruction).strip()
    text = (optional_str(row, extra) or "").strip() if extra else ""
    if text:
        prompt = f"{prompt}\n\n### Input:\n{text}"
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": required_str(row, output)},
    ]


def sharegpt_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    key = "conversations" if "conversations" in row else "messages"
    return _with_system(
        row, to_messages(row.get(key), roles, key, role_key="from", content_key="value")
    )


def openai_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    return to_messages(row.get("messages"), roles, "messages")


def trl_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    """TRL's conversational ``messages`` rows, or ``prompt`` + ``completion`` (strings or
    messages)."""
    if "messages" in row:
        return openai_messages(row, roles)
    completion = row.get("completion")
    if isinstance(completion, list):
        reply = to_messages(completion, roles, "completion")
    else:
        reply = [{"role": "assistant", "content": required_str(row, "completion")}]
    return _prompt_field(row, "prompt", roles) + reply


_GUANACO_TURN = re.compile(r"### (Human|Assistant):")


def guanaco_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    """Split a Guanaco transcript into user / assistant messages."""
    text = required_str(row, "text")
    parts = _GUANACO_TURN.split(text)  # ["", "Human", " q", "Assistant", " a", ...]
    if parts[0].strip() or len(parts) < 5:
        raise RowError("text is not '### Human: ...### Assistant: ...' turns")
    names = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": names[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])
    ]


def gsm8k_messages(row: dict, roles: Mapping[str, str]) -> list[Message]:
    """The question asks; the full worked answer, with its final ``#### N`` line, answers."""
    answer = required_str(row, "answer")
    if "####" not in answer:
        raise RowError("answer has no '#### <number>' line")
    return [
        {"role": "user", "content": required_str(row, "question").strip()},
        {"role": "assistant", "content": answer.strip()},
    ]


def column_messages(
    row: dict,
    roles: Mapping[str, str],
    prompt_column: str,
    response_column: str,
    system_column: Optional[str] = None,
    messages_column: Optional[str] = None,
    input_column: Optional[str] = None,
) -> list[Message]:
    """A ready list of messages, or a prompt (+ Alpaca-style input) column, a response column and a
    system column."""
    if messages_column:
        return to_messages(row.get(messages_column), roles, messages_column)
    system = optional_str(row, system_column) if system_column else None
    messages = [{"role": "system", "content": system}] if system else []
    return messages + alpaca_turns(row, prompt_column, input_column, response_column)


_SFT_READERS: dict[str, Callable[..., list[Message]]] = {
    "alpaca": alpaca_messages,
    "sharegpt": sharegpt_messages,
    "openai": openai_messages,
    "trl": trl_messages,
    "guanaco": guanaco_messages,
    "gsm8k": gsm8k_messages,
    "columns": column_messages,
}


def sft_reader(
    fmt: str, roles: Mapping[str, str], columns: Optional[dict] = None
) -> Callable[[dict], list[Message]]:
    """The row -> messages function of a format (a partial of a module-level function, so `datasets`
    can hash it)."""
    if fmt not in _SFT_READERS:
        raise UserError(
            f"data.format '{fmt}' is not an SFT format (one of: {', '.join(SFT_FORMATS)}); "
            "preference pairs train with qlora_lightning.PreferenceDataModule"
        )
    if fmt == "columns" and not columns:
        raise UserError(
            "data.format columns reads the columns named by qlora_lightning.ColumnDataModule's "
            "prompt_column / response_column / messages_column: use that module"
        )
    return functools.partial(
        _SFT_READERS[fmt], roles=roles, **((columns or {}) if fmt == "columns" else {})
    )


# ---- preference rows -> (prompt, chosen, rejected) ------------------------------------------


def _single_reply(messages: list[Message], field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"field '{field}' is not one assistant reply")
    return messages[0]["content"]


def _reply(row: dict, key: str, roles: Mapping[str, str], **keys) -> str:
    """A reply given as a string, one message object, or a list holding one assistant message."""
    value = row.get(key)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return _single_reply(to_messages(value, roles, key, **keys), key)
    return required_str(row, key)


def trl_pair(row: dict, roles: Mapping[str, str]) -> Pair:
    """An explicit ``prompt`` with one reply each, or ``chosen`` / ``rejected`` whole conversations
    sharing their prompt (then a ``prompt`` column, as ``HuggingFaceH4/ultrafeedback_binarized``
    has, only repeats it)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    whole = (
        isinstance(chosen, list)
        and isinstance(rejected, list)
        and max(len(chosen), len(rejected)) > 1
    )
    if not whole:
        if row.get("prompt") is None:
            raise RowError(
                "no 'prompt', and 'chosen' / 'rejected' are not conversations to take it from"
            )
        return (
            _prompt_field(row, "prompt", roles),
            _reply(row, "chosen", roles),
            _reply(row, "rejected", roles),
        )
    # Here, not at the top: importing trl costs seconds (data/packing.py)
    from trl import (
        extract_prompt,
    )

    split = extract_prompt(
        {
            "chosen": to_messages(chosen, roles, "chosen"),
            "rejected": to_messages(rejected, roles, "rejected"),
        }
    )
    if not split["prompt"]:
        raise RowError("'chosen' and 'rejected' share no prompt")
    return (
        split["prompt"],
        _single_reply(split["chosen"], "chosen"),
        _single_reply(split["rejected"], "rejected"),
    )


def sharegpt_pair(row: dict, roles: Mapping[str, str]) -> Pair:
    """LLaMA-Factory: ``conversations`` is the prompt, ``chosen`` / ``rejected`` single
    ``{from, value}`` replies."""
    keys = {"role_key": "from", "content_key": "value"}
    return (
        sharegpt_messages(row, roles),
        _reply(row, "chosen", roles, **keys),
        _reply(row, "rejected", roles, **keys),
    )


def openai_pair(row: dict, roles: Mapping[str, str]) -> Pair:
    source = row.get("input")
    if not isinstance(source, dict):
        raise RowError("field 'input' is not an object with 'messages'")
    prompt = to_messages(source.get("messages"), roles, "input.messages")
    return (
        prompt,
        _reply(row, "preferred_output", roles),
        _reply(row, "non_preferred_output", roles),
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_REPLY = "\n\nAssistant:"


def hh_rlhf_pair(row: dict, roles: Mapping[str, str]) -> Pair:
    """Two ``Human:/Assistant:`` transcripts sharing a prompt, split at their last assistant
    turn."""
    prompt_text, chosen = _split_last_reply(required_str(row, "chosen"))
    rejected_prompt_text, rejected = _split_last_reply(required_str(row, "rejected"))
    if prompt_text != rejected_prompt_text:
        raise RowError("chosen and rejected transcripts do not share a prompt")
    # ["", "Human", " q", "Assistant", " a", ..., "Human", " q"].
    parts = _HH_TURN.split(prompt_text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("transcript is not '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    names = {"Human": "user", "Assistant": "assistant"}
    prompt = [
        {"role": names[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])
    ]
    return prompt, chosen.strip(), rejected.strip()


def _split_last_reply(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind(_HH_REPLY)
    if cut < 0:
        raise RowError("transcript has no '\\n\\nAssistant:' turn")
    return transcript[:cut], transcript[cut + len(_HH_REPLY) :]


def column_pair(
    row: dict,
    roles: Mapping[str, str],
    prompt_column: str,
    chosen_column: str,
    rejected_column: str,
    system_column: Optional[str] = None,
) -> Pair:
    """Prompt / chosen / rejected columns; chosen and rejected may be conversations ending in their
    reply."""
    chosen_context, chosen = _context_and_reply(row, chosen_column, roles)
    rejected_context, rejected = _context_and_reply(row, rejected_column, roles)
    if chosen_context != rejected_context:
        raise RowError("chosen and rejected continue different conversations")
    prompt = chosen_context or _prompt_field(row, prompt_column, roles)
    system = optional_str(row, system_column) if system_column else None
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen, rejected


def _context_and_reply(
    row: dict, column: str, roles: Mapping[str, str]
) -> tuple[list[Message], str]:
    """A string reply, or a conversation ending in one (everything before it is the context)."""
    if isinstance(row.get(column), list):
        messages = to_messages(row[column], roles, column)
        if messages[-1]["role"] != "assistant":
            raise RowError(f"field '{column}' does not end with an assistant message")
        return messages[:-1], messages[-1]["content"]
    return [], required_str(row, column)


_PREFERENCE_READERS: dict[str, Callable[..., Pair]] = {
    "sharegpt": sharegpt_pair,
    "openai_preference": openai_pair,
    "trl": trl_pair,
    "hh_rlhf": hh_rlhf_pair,
    "columns": column_pair,
}


def preference_reader(
    fmt: str, roles: Mapping[str, str], columns: Optional[dict] = None
) -> Callable[[dict], Pair]:
    """The row -> (prompt, chosen, rejected) function of a format (hashable by `datasets`)."""
    if fmt not in _PREFERENCE_READERS:
        raise UserError(
            f"data.format '{fmt}' is not a preference format (one of: "
            f"{', '.join(PREFERENCE_FORMATS)})"
        )
    # Format columns without column names (KTODataModule passes none) fails here with a TypeError,
    # not sft_reader's UserError; the type: ignore keeps that until it gets its own message.
    return functools.partial(
        _PREFERENCE_READERS[fmt],
        roles=roles,
        **(columns if fmt == "columns" else {}),  # type: ignore[arg-type]  # see above
    )


# ---- which format is this? -----------------------------------------------------------------


def detect_format(
    rows: list[dict], preference: bool, source: str, fallback: Optional[str] = None
) -> str:
    """The format most of a file's first rows show by their fields (see the module docstring).

    Args:
        rows: The first rows, decoded.
        preference: Whether the reader wants preference pairs (a file of the other kind is refused).
        source: The file or dataset, for messages.
        fallback: The format when no row shows one (a dataset module's own format).
    """
    guesses = Counter(_guess(row) for row in rows)
    pairs = sum(n for fmt, n in guesses.items() if fmt in _PAIR_GUESSES)
    known = sum(n for fmt, n in guesses.items() if fmt is not None)
    if (pairs > len(rows) / 2 and not preference) or (preference and known and not pairs):
        module = "qlora_lightning.PreferenceDataModule" if not preference else "an SFT DataModule"
        kind = "preference pairs" if not preference else "no preference pairs"
        raise UserError(
            f"data '{source}' holds {kind} (fields: {_fields(rows)}); read it with {module}"
        )
    guesses.pop(None, None)
    if guesses:
        guess = guesses.most_common(1)[0][0]
        assert guess is not None  # popped above
        return _PAIR_GUESSES.get(guess, guess)
    if fallback:
        return fallback
    formats = PREFERENCE_FORMATS if preference else SFT_FORMATS
    raise UserError(
        f"data '{source}': cannot tell its format from the fields {_fields(rows)}; "
        f"set data.format to one of {', '.join(formats)}"
    )


# Guesses that only preference rows give, and the format each means.
_PAIR_GUESSES = {
    "openai_preference": "openai_preference",
    "sharegpt_pair": "sharegpt",
    "hh_rlhf": "hh_rlhf",
    "trl_pair": "trl",
}


def _guess(row: dict) -> Optional[str]:
    """The format one row's fields show, ``*_pair`` for the preference twins of SFT formats; None
    when unclear."""

    def has(*keys):
        return all(row.get(key) is not None for key in keys)

    if has("preferred_output"):
        return "openai_preference"
    if has("chosen", "rejected"):
        if has("conversations"):
            return "sharegpt_pair"
        if not has("prompt") and isinstance(row["chosen"], str) and _HH_REPLY in row["chosen"]:
            return "hh_rlhf"
        return "trl_pair"
    turns = row.get("conversations") or row.get("messages")
    if isinstance(turns, list) and turns:
        return "sharegpt" if isinstance(turns[0], dict) and "from" in turns[0] else "openai"
    if has("prompt", "completion"):
        return "trl"
    if has("instruction", "output"):
        return "alpaca"
    if has("question", "answer"):
        return "gsm8k"
    if isinstance(row.get("text"), str) and "### Human:" in row["text"]:
        return "guanaco"
    return None


def holds_pairs(rows: list[dict]) -> bool:
    """Whether most of a file's first rows are preference pairs, by their fields."""
    return sum(_guess(row) in _PAIR_GUESSES for row in rows) > len(rows) / 2


def _fields(rows: list[dict]) -> str:
    return ", ".join(sorted(set().union(*(row.keys() for row in rows)))) or "(none)"


def fields_read(fmt: str, columns: Optional[dict] = None) -> Optional[set[str]]:
    """The top-level fields a format reads (the others are reported as unused when they hold text);
    None for a format of a user's own DataModule, whose reader this module does not know."""
    if fmt == "columns":
        return {name for name in (columns or {}).values() if name}
    return {
        "alpaca": {"instruction", "input", "output", "system"},
        "sharegpt": {"conversations", "messages", "system", "chosen", "rejected"},
        "openai": {"messages"},
        "trl": {"messages", "prompt", "completion", "chosen", "rejected"},
        "openai_preference": {"input", "preferred_output", "non_preferred_output"},
        "hh_rlhf": {"chosen", "rejected"},
        "guanaco": {"text"},
        "gsm8k": {"question", "answer"},
    }.get(fmt)
