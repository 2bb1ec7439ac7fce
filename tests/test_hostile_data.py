"""200 malformed rows per DataModule: no crash, and every row is accounted for in the report."""

import json
import random

import pytest

from qlora_lightning import (
    CodeAlpacaDataModule,
    ColumnDataModule,
    GSM8KDataModule,
    GuanacoDataModule,
)
from qlora_lightning.errors import UserError

GOOD = {
    GuanacoDataModule: {"text": "### Human: Hi there?### Assistant: Hello!"},
    CodeAlpacaDataModule: {
        "instruction": "Add two numbers.",
        "input": "",
        "output": "def add(a, b): return a + b",
    },
    GSM8KDataModule: {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    ColumnDataModule: {"prompt": "Say hi.", "response": "Hi!"},
}
ODD = [
    "",
    " ",
    "\u200b\u200f",
    "🙂" * 50,
    "\ud800",
    "x" * 100_000,
    "\x00",
    "### Human:",
    "####",
    "é" * 3,
]
WRONG = [None, 0, 3.5, True, [], ["a"], {}, {"a": 1}]


def _hostile(good: dict, rng: random.Random) -> dict:
    """One malformed row: a key dropped, a value of the wrong type, or an odd string."""
    row = dict(good)
    key = rng.choice(sorted(row))
    kind = rng.randrange(4)
    if kind == 0:
        del row[key]
    elif kind == 1:
        row[key] = rng.choice(WRONG)
    elif kind == 2:
        row[key] = rng.choice(ODD)
    else:
        row = {"unrelated": rng.choice(ODD + WRONG)}
    return row


def _write(path, rows):
    # ensure_ascii keeps lone surrogates writable; extra lines are not JSON at all.
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]", "42"]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_malformed_rows_are_counted_not_fatal(cls, tokenizer, tmp_path):
    rng = random.Random(0)
    # Good rows (each string made distinct) among the hostile ones, and 5 copies of one of them.
    good = [
        {key: f"{value} {i}" if value else value for key, value in GOOD[cls].items()}
        for i in range(20)
    ]
    rows = good + [good[0]] * 5 + [_hostile(GOOD[cls], rng) for _ in range(200)]
    total = _write(tmp_path / "rows.jsonl", rows)
    dm = cls(
        path=str(tmp_path / "rows.jsonl"),
        tokenizer=tokenizer,
        max_seq_length=64,
        val_fraction=0.2,
        seed=0,
    )
    dm.setup("fit")

    report, read = dm.report, dm.read_report
    assert read["rows"] == total == sum(r["rows"] for r in report.values()) + read["duplicates"]
    # Of good[0].
    copies = [d["at"] for d in read["duplicate_rows"] if d["reason"] == "duplicate (line 1)"]
    assert copies == [f"line {n}" for n in range(21, 26)]
    for split in report.values():
        assert split["kept"] + sum(split["dropped"].values()) == split["rows"]
        # Each named by its line.
        assert len(split["dropped_rows"]) == sum(split["dropped"].values())
        assert all(d["at"].startswith("line ") for d in split["dropped_rows"])
    reasons = set().union(*(split["dropped"] for split in report.values()))
    assert "invalid JSON" in reasons
    assert any(r.startswith("missing field") for r in reasons)
    kept = [row for split in dm.splits.values() for row in split]
    assert kept and all(len(row["input_ids"]) <= 64 for row in kept)


def test_strict_mode_names_the_first_bad_row_by_its_line(tokenizer, tmp_path):
    _write(tmp_path / "rows.jsonl", [GOOD[GSM8KDataModule], {"question": "no answer"}])
    dm = GSM8KDataModule(
        path=str(tmp_path / "rows.jsonl"), tokenizer=tokenizer, strict=True, val_fraction=0.5
    )
    with pytest.raises(
        UserError,
        match=r"^line 2 of '.*rows.jsonl' \(\w+ split\): missing field 'answer' .*data.strict",
    ):
        dm.setup("fit")
