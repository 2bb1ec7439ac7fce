"""Exact-match scoring of final numeric answers (GSM8K style), as pure functions.

A GSM8K answer ends with ``#### <number>``. A generation is scored by the number right after
its first ``####`` that has one (a model that keeps going and writes a second question and
answer is judged on the first), or, without one, by the last number it wrote (much like the strict
and the flexible rule of lm-evaluation-harness's GSM8K task, one after the other).
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

from qlora_lightning.losses import IGNORE_INDEX

ANSWER_MARKER = "####"
# "1,200", "-3", "0.50"; the comma is GSM8K's thousands separator.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The marker, then (after white space and an optional dollar sign) the number.
_MARKED = re.compile(re.escape(ANSWER_MARKER) + r"\s*\$?(" + _NUMBER.pattern + ")")


def normalize_number(text: str) -> str:
    """A canonical spelling of a number: no thousands commas, no trailing zeros after a point.

    ``"1,200"`` -> ``"1200"``, ``"5.50"`` -> ``"5.5"``, ``"7.0"`` -> ``"7"``, ``"-0"`` -> ``"0"``.
    """
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text.lstrip("-").lstrip("0") == "":
        return "0"
    negative = text.startswith("-")
    digits = text.lstrip("-").lstrip("0")
    digits = "0" + digits if digits.startswith(".") else digits
    return ("-" if negative else "") + digits


def extract_answer(text: str) -> Optional[str]:
    """The normalized final number of a worked answer, or None when it holds no number.

    The number right after the first ``####`` followed by one; else the last number in the text.
    """
    marked = _MARKED.search(text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(generation: str, reference: str) -> bool:
    """Whether the generation's final number equals the reference's (a reference without one never
    matches)."""
    gold = extract_answer(reference)
    return gold is not None and extract_answer(generation) == gold


def split_prompt_response(
    input_ids: Sequence[int], labels: Sequence[int]
) -> tuple[list[int], list[int]]:
    """A tokenized training row -> (prompt ids, response ids) around its last labelled run.

    The prompt is every token before the last response (so a multi-turn row is scored on
    its last turn), tokenized exactly as the model saw it in training; the response is the
    reference answer. Padding carries no label, so right-padded rows work too.
    """
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled:
        raise ValueError("the row has no labelled (response) token")
    end = labelled[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end])


def examples_in_batch(batch: dict) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example in a collated batch, padded or packed.

    A padded batch has one example per row, its tokens where ``attention_mask`` is 1. A packed
    batch (no mask, ``position_ids`` restarting at 0 at each example) has several per row.
    Pieces without a labelled token (the one-token pad "examples" of a packed row) are skipped.
    """
    for example_ids, example_labels in _examples(batch):
        if any(label != IGNORE_INDEX for label in example_labels):
            yield example_ids, example_labels


def _examples(batch: dict) -> Iterator[tuple[list[int], list[int]]]:
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    if batch.get("attention_mask") is not None:
        for row_ids, row_labels, row_mask in zip(ids, labels, batch["attention_mask"].tolist()):
            keep = [i for i, m in enumerate(row_mask) if m]
            yield [row_ids[i] for i in keep], [row_labels[i] for i in keep]
        return
    for row_ids, row_labels, row_positions in zip(ids, labels, batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(row_positions) if p == 0] + [len(row_positions)]
        for start, end in zip(starts, starts[1:]):
            yield row_ids[start:end], row_labels[start:end]
