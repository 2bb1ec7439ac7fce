"""The SFT DataModules end to end (file -> messages -> tokens -> padded batches): loss falls on
response tokens only, the truncation policy, dropped-row counts and one-line errors for bad data.

Expected prompts and responses are rebuilt here from the raw rows, independently of the
package's message functions; only the user templates are taken from the DataModule classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from qlora_lightning import (
    CodeAlpacaDataModule,
    ColumnDataModule,
    GSM8KDataModule,
    GuanacoDataModule,
)
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX
from tests.conftest import EXAMPLES, needs_shared, shared_path, tokenizer_at

Turns = list[tuple[str, str]]  # (prompt text, response text) per assistant turn


def gsm8k_turns(row: dict) -> Turns:
    prompt = GSM8KDataModule.default_user_template.format(content=row["question"].strip())
    return [(prompt, row["answer"].strip())]


def codealpaca_turns(row: dict) -> Turns:
    content = row["instruction"].strip()
    if (row.get("input") or "").strip():
        content += "\n\n### Input:\n" + row["input"].strip()
    return [(CodeAlpacaDataModule.default_user_template.format(content=content), row["output"])]


def guanaco_turns(row: dict) -> Turns:
    turns = []
    for exchange in row["text"].split("### Human:")[1:]:
        question, answer = exchange.split("### Assistant:")
        turns.append(
            (
                GuanacoDataModule.default_user_template.format(content=question.strip()),
                answer.strip(),
            )
        )
    return turns


def column_turns(row: dict) -> Turns:
    return [(ColumnDataModule.default_user_template.format(content=row["prompt"]), row["response"])]


def _runs(labels: list[int]) -> list[tuple[bool, int, int]]:
    """Maximal runs of labelled / unlabelled positions as (labelled, start, end)."""
    runs, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((labels[start] != IGNORE_INDEX, start, t))
            start = t
    return runs


def _same_text(tokenizer, decoded: str, expected: str) -> bool:
    # Exact, whitespace included, but through the tokenizer's own round trip: sentencepiece
    # tokenizers drop a leading space when decoding and normalize some characters.
    return decoded == tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])


def assert_masks_follow_turns(
    tokenizer, input_ids: list[int], labels: list[int], turns: Turns
) -> None:
    """Labels are the input ids on every response (+ EOS) and -100 on every prompt token."""
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    runs = _runs(labels)
    prompts = [(s, e) for labelled, s, e in runs if not labelled]
    responses = [(s, e) for labelled, s, e in runs if labelled]
    assert runs[0][0] is False and len(prompts) == len(responses) == len(turns), runs
    if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:
        assert input_ids[0] == tokenizer.bos_token_id
    for (prompt, response), (ps, pe), (rs, re) in zip(turns, prompts, responses):
        prompt_text = tokenizer.decode(input_ids[ps:pe], skip_special_tokens=True)
        assert _same_text(tokenizer, prompt_text, prompt), (prompt_text, prompt)
        assert input_ids[re - 1] == tokenizer.eos_token_id  # the model learns to stop
        response_text = tokenizer.decode(input_ids[rs : re - 1])
        assert _same_text(tokenizer, response_text, response), (response_text, response)


def _write_split_dir(root: Path, rows: list[dict]) -> Path:
    """``rows`` as both train.jsonl and test.jsonl: the test split is then read in file order."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return root


def check_datamodule(
    cls, rows: list[dict], turns_of: Callable[[dict], Turns], tokenizer, root: Path, **kwargs
) -> None:
    """Set ``cls`` up on ``rows`` and check every padded validation batch against ``turns_of``."""
    data = cls(
        path=str(_write_split_dir(root, rows)),
        tokenizer=tokenizer,
        batch_size=4,
        max_seq_length=8192,
        **kwargs,
    )
    data.setup("fit")
    assert not sum(data.dropped["val"].values()), data.dropped
    seen = 0
    for batch in data.val_dataloader():
        for ids, mask, labels in zip(
            batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n)  # right padding
            assert all(label == IGNORE_INDEX for label in labels[n:])  # no loss on padding
            assert_masks_follow_turns(tokenizer, ids[:n], labels[:n], turns_of(rows[seen]))
            seen += 1
    assert seen == len(rows)


def _read_rows(path: Path, n: int) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for _, line in zip(range(n), f)]
    return json.loads(path.read_text())[:n]


DATASETS = {  # name: (DataModule, shipped example, file in ../shared, expected turns)
    "gsm8k": (GSM8KDataModule, "gsm8k_train.jsonl", ("gsm8k", "train.jsonl"), gsm8k_turns),
    "codealpaca": (
        CodeAlpacaDataModule,
        "codealpaca.json",
        ("codealpaca", "code_alpaca_2k.json"),
        codealpaca_turns,
    ),
    "guanaco": (
        GuanacoDataModule,
        "guanaco.jsonl",
        ("guanaco", "guanaco_style_en_validation.jsonl"),
        guanaco_turns,
    ),
}


@pytest.mark.parametrize("name", DATASETS)
def test_shipped_examples_have_loss_on_responses_only(name, tokenizer, tmp_path):
    cls, example, _, turns_of = DATASETS[name]
    check_datamodule(cls, _read_rows(EXAMPLES / example, 1000), turns_of, tokenizer, tmp_path)


@needs_shared
@pytest.mark.parametrize("tokenizer_dir", ["llama2", "mistral-7b-v0.1", "gpt2"])
@pytest.mark.parametrize("name", DATASETS)
def test_real_rows_with_real_tokenizers_have_loss_on_responses_only(name, tokenizer_dir, tmp_path):
    cls, _, shared_file, turns_of = DATASETS[name]
    rows = _read_rows(shared_path("datasets", *shared_file), 12)
    if name == "guanaco":  # the multi-turn conversations are the interesting ones
        rows = [
            r
            for r in _read_rows(shared_path("datasets", *shared_file), 200)
            if r["text"].count("### Human:") > 1
        ]
        rows = rows[:8]
        assert rows
    tokenizer = tokenizer_at(str(shared_path("tokenizers", tokenizer_dir)))
    check_datamodule(cls, rows, turns_of, tokenizer, tmp_path)


def test_column_datamodule_on_a_users_jsonl(tokenizer, tmp_path):
    rows = [
        {"prompt": "Translate 'chat' to English.", "response": "cat"},
        {
            "prompt": "Name three primary colours.",
            "response": "Red, yellow and blue.\nThose are the three.",
        },
        {"prompt": "Say nothing but OK, please, and nothing else at all.", "response": "OK"},
    ]
    check_datamodule(ColumnDataModule, rows, column_turns, tokenizer, tmp_path)


def test_column_datamodule_with_renamed_columns_and_messages(tokenizer, tmp_path):
    renamed = [{"q": "What is 6 times 7?", "a": "42"}, {"q": "Spell dog backwards.", "a": "god"}]
    check_datamodule(
        ColumnDataModule,
        renamed,
        lambda r: column_turns({"prompt": r["q"], "response": r["a"]}),
        tokenizer,
        tmp_path / "renamed",
        prompt_column="q",
        response_column="a",
    )

    chats = [
        {
            "messages": [
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Fine."},
            ]
        }
    ]
    template = ColumnDataModule.default_user_template
    expected = [
        (template.format(content="Hi!"), "Hello."),
        (template.format(content="How are you?"), "Fine."),
    ]
    check_datamodule(
        ColumnDataModule,
        chats,
        lambda r: expected,
        tokenizer,
        tmp_path / "chats",
        messages_column="messages",
    )


def test_multi_turn_guanaco_has_loss_on_every_assistant_turn(tokenizer, tmp_path):
    text = (
        "### Human: What is 2+2?### Assistant: 4.### Human: And times 3?### Assistant: 12."
        "### Human: Thanks!### Assistant: You are welcome."
    )
    rows = [{"text": text}]
    assert len(guanaco_turns(rows[0])) == 3
    check_datamodule(GuanacoDataModule, rows, guanaco_turns, tokenizer, tmp_path)


# ---- truncation and dropped rows ------------------------------------------------------------


def _encode_one(data, row: dict) -> dict:
    """One raw row through the DataModule's own tokenization (as ``setup`` maps it)."""
    encode, kwargs = data.encoder()
    return encode(row, **kwargs)


def test_long_prompt_is_cut_from_the_left_and_the_response_kept(tokenizer):
    row = {
        "question": " ".join(f"word{i}" for i in range(200)) + " How many?",
        "answer": "It is 5.\n#### 5",
    }
    data = GSM8KDataModule(path="unused.jsonl", tokenizer=tokenizer, max_seq_length=64)
    out = _encode_one(data, row)
    ids, labels = out["input_ids"], out["labels"]
    assert (
        out["prompt_truncated"]
        and not out["response_truncated"]
        and out["drop_reason"] == ""
        and len(ids) == 64
    )
    assert ids[0] == tokenizer.bos_token_id  # BOS survives the cut
    ((prompt, response),) = gsm8k_turns(row)
    runs = _runs(labels)
    assert [labelled for labelled, _, _ in runs] == [False, True]
    kept_prompt = tokenizer.decode(ids[1 : runs[0][2]], skip_special_tokens=True)
    # The oldest text went.
    assert kept_prompt.endswith("How many?\nAnswer:") and "word0 " not in kept_prompt
    assert (
        _same_text(tokenizer, tokenizer.decode(ids[runs[1][1] : -1]), response)
        and ids[-1] == tokenizer.eos_token_id
    )


def test_overlong_response_is_cut_on_the_right(tokenizer):
    row = {"question": "Count.", "answer": " ".join(str(i) for i in range(300)) + "\n#### 300"}
    data = GSM8KDataModule(path="unused.jsonl", tokenizer=tokenizer, max_seq_length=48)
    out = _encode_one(data, row)
    ids, labels = out["input_ids"], out["labels"]
    assert out["response_truncated"] and out["final_line_lost"] and len(ids) == 48
    labelled = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.eos_token_id not in labelled  # the end was cut off
    assert "0 1 2 3" in tokenizer.decode(labelled) and "299" not in tokenizer.decode(labelled)


def test_rows_without_a_response_are_dropped_and_counted(tokenizer, tmp_path):
    rows = [
        {"prompt": "Say hi.", "response": "hi"},
        {"prompt": "Say nothing.", "response": ""},
        {"prompt": "Say nothing again.", "response": "   "},
        {"prompt": "No response field at all."},
        {"prompt": "Say bye.", "response": "bye"},
    ]
    data = ColumnDataModule(path=str(_write_split_dir(tmp_path, rows)), tokenizer=tokenizer)
    data.setup("fit")
    for split in ("train", "val"):
        assert len(data.splits[split]) == 2
        assert sum(data.dropped[split].values()) == 3
        assert sum(n for why, n in data.dropped[split].items() if "empty" in why) == 2
        assert (
            sum(
                n
                for why, n in data.dropped[split].items()
                if "response" in why and "empty" not in why
            )
            == 1
        )


def test_all_rows_lacking_the_field_is_one_line_naming_it(tokenizer, tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(
        "".join(
            json.dumps({"q": f"What is {i}+{i}?", "answer": f"#### {2 * i}"}) + "\n"
            for i in range(5)
        )
    )
    with pytest.raises(UserError) as err:
        GSM8KDataModule(path=str(path), tokenizer=tokenizer).setup("fit")
    message = str(err.value)
    assert "'question'" in message and "\n" not in message


@pytest.mark.parametrize("filename", ["missing.jsonl", "missing_dir/train.json"])
def test_missing_data_file_is_one_line_naming_it(filename, tokenizer, tmp_path):
    path = str(tmp_path / filename)
    with pytest.raises(UserError) as err:
        GSM8KDataModule(path=path, tokenizer=tokenizer).setup("fit")
    assert path in str(err.value) and "\n" not in str(err.value)


def test_unsupported_file_type_is_one_line_naming_it(tokenizer, tmp_path):
    path = tmp_path / "rows.xlsx"
    path.write_bytes(b"not a spreadsheet")
    with pytest.raises(UserError) as err:
        GSM8KDataModule(path=str(path), tokenizer=tokenizer).setup("fit")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
