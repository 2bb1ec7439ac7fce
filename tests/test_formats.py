"""Real-world row formats: each reader gives the same conversation, roles are mapped or refused, the
exact trained tokens, the truncation policy (TRL's ``keep_end`` as the oracle for pairs), dedup
before the split, every dropped row named by its line, and ``fit`` on each format detected alone."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from trl.trainer.dpo_trainer import DataCollatorForPreference

from qlora_lightning import ColumnDataModule, GSM8KDataModule, PreferenceDataModule
from qlora_lightning.data.formats import DEFAULT_ROLES, preference_reader
from qlora_lightning.data.preference import pad_pairs, tokenize_pair
from qlora_lightning.data.tokenize import ChatFormat
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.run.cli import make_cli
from tests.conftest import REPO, shared_path, tokenizer_at

FMT = ChatFormat(GSM8KDataModule.default_user_template)  # every SFT module below renders with it

SYSTEM, Q1, A1, Q2 = "You answer in one word.", "Name a fruit.", "Apple.", "And a colour?"


def conversation(i: int) -> list[dict]:
    """Row ``i``'s conversation: a system message and two exchanges (distinct per row)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": f"{Q2} ({i})"},
        {"role": "assistant", "content": f"Red {i}."},
    ]


def _parts(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


# The same conversation as each format writes it.
SFT_ROWS = {
    "sharegpt": lambda c: {
        "conversations": [
            {
                "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                "value": m["content"],
            }
            for m in c
        ]
    },
    "sharegpt_system_field": lambda c: {
        "system": c[0]["content"],
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in c[1:]
        ],
    },
    "openai": lambda c: {
        "messages": [
            {
                "role": "developer" if m["role"] == "system" else m["role"],
                "content": _parts(m["content"]) if m["role"] != "assistant" else m["content"],
            }
            for m in c
        ]
    },
    "trl": lambda c: {"prompt": c[:-1], "completion": c[-1:]},
}
DETECTED = {
    "sharegpt": "sharegpt",
    "sharegpt_system_field": "sharegpt",
    "openai": "openai",
    "trl": "trl",
}


def expected_tokens(
    messages: list[dict], tokenizer, trained_roles=("assistant",), last_only: bool = False
):
    """The row as the policy states it: BOS, each turn tokenized on its own through the templates,
    EOS after each assistant turn; labels on the trained assistant turns only."""
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            piece = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            trained = m["role"] in trained_roles and (i == last or not last_only)
        else:
            template = FMT.system_template if m["role"] == "system" else FMT.user_template
            piece, trained = (
                tokenizer(template.format(content=m["content"]), add_special_tokens=False)[
                    "input_ids"
                ],
                False,
            )
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def trained_spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded text of each run of labelled tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
    return spans + ([tokenizer.decode(current, skip_special_tokens=True)] if current else [])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )
    return path


def sft_data(path: Path, tokenizer, **kwargs) -> GSM8KDataModule:
    kwargs = {"max_seq_length": 256, "val_fraction": 0.25, "seed": 0, **kwargs}
    dm = GSM8KDataModule(path=str(path), tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def all_rows(dm) -> list[dict]:
    return [row for split in ("train", "val") for row in dm.splits[split]]


# ---- SFT formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SFT_ROWS))
def test_each_format_trains_exactly_the_assistant_turns(name, tokenizer, tmp_path, caplog):
    rows = [SFT_ROWS[name](conversation(i)) for i in range(8)]
    with caplog.at_level(logging.INFO, logger="qlora_lightning.data.base"):
        dm = sft_data(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer)
    assert dm.row_format == DETECTED[name]
    assert any(f"format '{DETECTED[name]}' (detected" in r.getMessage() for r in caplog.records)

    expected = {
        tuple(expected_tokens(conversation(i), tokenizer)[0]): expected_tokens(
            conversation(i), tokenizer
        )
        for i in range(8)
    }
    encoded = all_rows(dm)
    assert len(encoded) == 8
    for row in encoded:
        # KeyError: tokens differ from the stated rendering.
        ids, labels = expected[tuple(row["input_ids"])]
        assert row["labels"] == labels
        prompt = tokenizer.decode(
            row["input_ids"][: labels.index(next(t for t in labels if t != IGNORE_INDEX))]
        )
        assert SYSTEM in prompt and Q1 in prompt
        spans = trained_spans(row["input_ids"], row["labels"], tokenizer)
        assert [s.strip() for s in spans][0] == A1 and len(spans) == 2
        # No user turn is ever trained.
        assert not any(Q1 in s or Q2 in s or SYSTEM in s for s in spans)


def test_last_assistant_only_and_weight_zero_turns_are_shown_not_trained(tokenizer, tmp_path):
    c = conversation(0)
    dm = sft_data(
        write_jsonl(tmp_path / "a.jsonl", [SFT_ROWS["openai"](conversation(i)) for i in range(4)]),
        tokenizer,
        train_on="last_assistant",
        val_fraction=0.5,
    )
    row = next(
        r for r in all_rows(dm) if tuple(r["input_ids"]) == tuple(expected_tokens(c, tokenizer)[0])
    )
    assert row["labels"] == expected_tokens(c, tokenizer, last_only=True)[1]

    weighted = SFT_ROWS["openai"](c)
    # OpenAI's per-message weight: the first answer is shown only.
    weighted["messages"][2]["weight"] = 0
    rows = [weighted] + [SFT_ROWS["openai"](conversation(i)) for i in range(1, 4)]
    dm = sft_data(write_jsonl(tmp_path / "w.jsonl", rows), tokenizer, val_fraction=0.5)
    row = next(
        r for r in all_rows(dm) if tuple(r["input_ids"]) == tuple(expected_tokens(c, tokenizer)[0])
    )
    assert row["labels"] == expected_tokens(c, tokenizer, last_only=True)[1]


def test_tool_results_are_masked_and_tool_calls_trained(tokenizer, tmp_path):
    call = [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Weather in town {i}?"},
                {"role": "assistant", "content": None, "tool_calls": call},
                {"role": "tool", "content": f"Sunny, {20 + i}C"},
                {"role": "assistant", "content": f"It is sunny, {20 + i} degrees."},
            ]
        }
        for i in range(4)
    ]
    dm = sft_data(write_jsonl(tmp_path / "tools.jsonl", rows), tokenizer, val_fraction=0.5)
    for row in all_rows(dm):
        spans = [s.strip() for s in trained_spans(row["input_ids"], row["labels"], tokenizer)]
        assert len(spans) == 2 and "weather" in spans[0] and spans[1].startswith("It is sunny")
        assert not any("Sunny," in s or "Weather in" in s for s in spans)


def test_an_unmapped_role_stops_the_run_naming_it_and_its_line(tokenizer, tmp_path):
    rows = [SFT_ROWS["sharegpt"](conversation(i)) for i in range(6)]
    rows[2]["conversations"][3]["from"] = "narrator"
    path = write_jsonl(tmp_path / "roles.jsonl", rows)
    with pytest.raises(
        UserError,
        match=r"^line 3 of '.*roles.jsonl' \(\w+ split\): unmapped role 'narrator' .*data.roles",
    ):
        sft_data(path, tokenizer)

    dropped = sft_data(path, tokenizer, unmapped_roles="drop")  # the documented lenient mode
    entries = [d for split in dropped.report.values() for d in split["dropped_rows"]]
    assert entries == [{"at": "line 3", "reason": "unmapped role 'narrator' in 'conversations'"}]

    # Mapped: read as a user turn, masked.
    mapped = sft_data(path, tokenizer, roles={"narrator": "user"})
    assert len(all_rows(mapped)) == 6
    for row in all_rows(mapped):
        assert not any(Q2 in s for s in trained_spans(row["input_ids"], row["labels"], tokenizer))


def test_alpaca_input_is_joined_under_the_instruction_and_unread_fields_are_named(
    tokenizer, tmp_path, caplog
):
    rows = [
        {
            "instruction": f"Fix the bug {i}.",
            "input": f"x = {i} +" if i % 2 else "",
            "output": f"x = {i} + 1",
            "meta": f"id{i}",
        }
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="qlora_lightning.data.base"):
        dm = ColumnDataModule(
            path=str(path),
            tokenizer=tokenizer,
            prompt_column="instruction",
            response_column="output",
            input_column="input",
            val_fraction=0.5,
            seed=0,
        )
        dm.setup("fit")
    assert dm.read_report["unused_fields"] == {"meta": 6}
    assert any("'meta' (6 rows)" in r.getMessage() for r in caplog.records)
    for row in all_rows(dm):
        prompt = tokenizer.decode(
            [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        )
        i = int(prompt.split("Fix the bug ")[1][0])
        assert ("### Input:\nx = %d +" % i in prompt) == bool(i % 2)

    auto = sft_data(path, tokenizer, val_fraction=0.5)  # the same file, format auto: alpaca
    assert auto.row_format == "alpaca" and auto.read_report["unused_fields"] == {"meta": 6}


def test_report_counts_match_the_file(tokenizer, tmp_path):
    rows = [SFT_ROWS["sharegpt"](conversation(i)) for i in range(10)]
    rows += [rows[1], rows[4]]  # duplicates: dropped before the split, named by line
    long_prompt = conversation(20)
    long_prompt[1]["content"] = " ".join(f"context{i}" for i in range(400))
    long_answer = conversation(21)
    long_answer[-1]["content"] = " ".join(str(i) for i in range(400)) + "\n#### 7"
    rows += [
        SFT_ROWS["sharegpt"](long_prompt),
        SFT_ROWS["sharegpt"](long_answer),
        {"conversations": "oops"},
    ]
    dm = sft_data(write_jsonl(tmp_path / "mixed.jsonl", rows), tokenizer, max_seq_length=96)

    assert dm.read_report["rows"] == 15 and dm.read_report["duplicates"] == 2
    assert dm.read_report["duplicate_rows"] == [
        {"at": "line 11", "reason": "duplicate (line 2)"},
        {"at": "line 12", "reason": "duplicate (line 5)"},
    ]
    total = {
        key: sum(split[key] for split in dm.report.values())
        for key in ("rows", "kept", "prompt_truncated", "response_truncated", "final_line_lost")
    }
    assert total == {
        "rows": 13,
        "kept": 12,
        "prompt_truncated": 2,
        "response_truncated": 1,
        "final_line_lost": 1,
    }
    (bad,) = [d for split in dm.report.values() for d in split["dropped_rows"]]
    assert bad == {
        "at": "line 15",
        "reason": "field 'conversations' is not a non-empty list of messages",
    }

    # The long prompt kept its system message (head) and its newest turns: the question survives.
    cut = next(
        r
        for r in all_rows(dm)
        if len(r["input_ids"]) == 96 and "(20)" in tokenizer.decode(r["input_ids"])
    )
    head = [tokenizer.bos_token_id] + tokenizer(
        FMT.system_template.format(content=SYSTEM), add_special_tokens=False
    )["input_ids"]
    assert cut["input_ids"][: len(head)] == head
    text = tokenizer.decode(cut["input_ids"])
    assert f"{Q2} (20)" in text and "context0 " not in text


def test_duplicates_never_sit_in_both_splits(tokenizer, tmp_path):
    rows = [SFT_ROWS["openai"](conversation(i)) for i in range(5)] * 4  # every row four times
    dm = sft_data(write_jsonl(tmp_path / "dup.jsonl", rows), tokenizer, val_fraction=0.4)
    train, val = ({tuple(r["input_ids"]) for r in dm.splits[s]} for s in ("train", "val"))
    assert len(train) + len(val) == 5 and not train & val and dm.read_report["duplicates"] == 15


# ---- preference formats ------------------------------------------------------------------------

PAIR_ROWS = {
    "trl": lambda c, good, bad: {
        "prompt": c,
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    },
    "trl_implicit": lambda c, good, bad: {
        "chosen": c + [{"role": "assistant", "content": good}],
        "rejected": c + [{"role": "assistant", "content": bad}],
    },
    "sharegpt": lambda c, good, bad: {
        "conversations": [
            {
                "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                "value": m["content"],
            }
            for m in c
        ],
        "chosen": {"from": "gpt", "value": good},
        "rejected": {"from": "gpt", "value": bad},
    },
    "openai_preference": lambda c, good, bad: {
        "input": {"messages": [{**m, "content": _parts(m["content"])} for m in c]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    },
}
PAIR_DETECTED = {
    "trl": "trl",
    "trl_implicit": "trl",
    "sharegpt": "sharegpt",
    "openai_preference": "openai_preference",
}


@pytest.mark.parametrize("name", list(PAIR_ROWS))
def test_each_preference_format_gives_the_same_pair_tokens(name, tokenizer, tmp_path):
    prompts = [conversation(i)[:-1] for i in range(6)]
    rows = [PAIR_ROWS[name](p, f"Blue {i}.", f"Soup {i}.") for i, p in enumerate(prompts)]
    dm = PreferenceDataModule(
        path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
        tokenizer=tokenizer,
        max_seq_length=128,
        val_fraction=0.5,
        seed=0,
    )
    dm.setup("fit")
    assert dm.row_format == PAIR_DETECTED[name]
    fmt = dm.chat_format
    for row in all_rows(dm):
        i = int(tokenizer.decode(row["chosen_ids"]).split("Blue ")[1][0])
        want = tokenize_pair(prompts[i], f"Blue {i}.", f"Soup {i}.", tokenizer, fmt, 128, 64, False)
        assert {k: row[k] for k in want if k.endswith("_ids")} == {
            k: v for k, v in want.items() if k.endswith("_ids")
        }
        # The prompt is the whole conversation before the reply (earlier answers included,
        # untrained).
        prompt = tokenizer.decode(row["chosen_prompt_ids"])
        assert (
            SYSTEM in prompt
            and A1 in prompt
            and prompt.rstrip().endswith(fmt.user_template.split("{content}")[1].strip())
        )


def test_pair_truncation_is_trls_keep_end_behind_the_kept_head(tokenizer):
    limit, floor = 64, 32
    collator = DataCollatorForPreference(
        pad_token_id=0, max_length=limit - 1, truncation_mode="keep_end"
    )
    for words in (3, 30, 60, 200):  # from no cut to a cut of most of the prompt
        prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}]
        replies = ("Short.", "A somewhat longer reply, cut nowhere.")
        full = tokenize_pair(prompt, *replies, tokenizer, FMT, 10**6, floor, False)
        ours = tokenize_pair(prompt, *replies, tokenizer, FMT, limit, floor, False)
        assert full["chosen_prompt_ids"][0] == tokenizer.bos_token_id  # the head: BOS alone
        theirs = collator(
            [
                {
                    "prompt_ids": full["chosen_prompt_ids"][1:],
                    "chosen_ids": full["chosen_ids"],
                    "rejected_ids": full["rejected_ids"],
                }
            ]
        )
        batch = pad_pairs([ours], pad_id=0)
        for k in range(2):  # chosen, rejected
            kept = batch["attention_mask"][k].bool()
            assert batch["input_ids"][k][kept][0] == tokenizer.bos_token_id
            trl_kept = theirs["attention_mask"][k].bool()
            assert (
                batch["input_ids"][k][kept][1:].tolist()
                == theirs["input_ids"][k][trl_kept].tolist()
            ), words
            assert (batch["labels"][k][kept][1:] != IGNORE_INDEX).tolist() == theirs[
                "completion_mask"
            ][k][trl_kept].bool().tolist()


def test_sharegpt_pairs_at_512_256_with_mistral_keep_every_pair_that_truncation_can_fit(tmp_path):
    tokenizer = tokenizer_at(str(shared_path("tokenizers", "mistral-7b-v0.1")))
    rows = []
    for i in range(24):  # prompts of about 30 to 2,000 tokens, replies of about 10 to 600
        turns = [{"from": "system", "value": "Be helpful and brief."}]
        for t in range(1 + i % 4):
            turns += [
                {"from": "human", "value": f"Question {i}.{t}: " + "tell me more " * (i * i % 170)},
                {"from": "gpt", "value": f"Answer {i}.{t}."},
            ]
        turns.append({"from": "human", "value": f"Final question {i}?"})
        rows.append(
            {
                "conversations": turns,
                "chosen": {"from": "gpt", "value": "Yes. " * (1 + i * 7 % 300)},
                "rejected": {"from": "gpt", "value": f"No {i}."},
            }
        )
    dm = PreferenceDataModule(
        path=str(write_jsonl(tmp_path / "lf.jsonl", rows)),
        tokenizer=tokenizer,
        max_seq_length=512,
        max_prompt_length=256,
        val_fraction=0.25,
        seed=0,
    )
    dm.setup("fit")
    assert dm.row_format == "sharegpt"
    assert not any(split["dropped"] for split in dm.report.values()), dm.report
    # The test does cut prompts.
    assert sum(split["prompt_truncated"] for split in dm.report.values()) > 0
    read = preference_reader("sharegpt", DEFAULT_ROLES)
    for row in all_rows(dm):
        i = int(
            re.search(r"Final question (\d+)", tokenizer.decode(row["chosen_prompt_ids"])).group(1)
        )
        whole = tokenize_pair(*read(rows[i]), tokenizer, dm.chat_format, 10**6, 256, False)
        for name in ("chosen", "rejected"):
            prompt, reply = row[f"{name}_prompt_ids"], row[f"{name}_ids"]
            # Within the context, the prompt cut no shorter than 256 tokens (or left whole), the
            # reply cut only when the prompt is down to 256.
            assert len(prompt) + len(reply) <= 512
            assert len(prompt) >= min(256, len(whole[f"{name}_prompt_ids"]))
            assert reply == whole[f"{name}_ids"] or len(prompt) == 256
            text = tokenizer.decode(prompt)
            # Head and question kept.
            assert "Be helpful and brief." in text and f"Final question {i}?" in text


def test_a_preference_file_given_to_sft_says_which_module_reads_it(tokenizer, tmp_path):
    rows = [PAIR_ROWS["trl"](conversation(i)[:-1], "a", "b") for i in range(4)]
    with pytest.raises(UserError, match="holds preference pairs .*PreferenceDataModule"):
        sft_data(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)


# ---- the CLI: one path, format auto ------------------------------------------------------------


def _fit(config: str, path: Path, root: Path) -> None:
    make_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config),
            "--data.init_args.path",
            str(path),
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(root),
        ]
    )


def test_fit_runs_on_each_format_from_its_path_alone(tmp_path, caplog):
    files = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", [make(conversation(i)) for i in range(12)])
        for name, make in SFT_ROWS.items()
    }
    files["alpaca"] = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"} for i in range(12)],
    )
    pairs = {
        name: write_jsonl(
            tmp_path / f"pairs_{name}.jsonl",
            [make(conversation(i)[:-1], f"Blue {i}.", f"Soup {i}.") for i in range(12)],
        )
        for name, make in PAIR_ROWS.items()
    }
    pairs["hh_rlhf"] = write_jsonl(
        tmp_path / "pairs_hh.jsonl",
        [
            {
                key: f"\n\nHuman: Name colour {i}.\n\nAssistant: {reply} {i}."
                for key, reply in (("chosen", "Blue"), ("rejected", "Soup"))
            }
            for i in range(12)
        ],
    )
    with caplog.at_level(logging.INFO, logger="qlora_lightning.data.base"):
        for name, path in files.items():
            _fit("quickstart.yaml", path, tmp_path / name)
        for name, path in pairs.items():
            _fit("dpo_quickstart.yaml", path, tmp_path / f"pairs_{name}")
    detected = [
        r.getMessage() for r in caplog.records if "(detected from the fields" in r.getMessage()
    ]
    assert len(detected) == len(files) + len(pairs)
    for name in files:
        assert list(
            (tmp_path / name).glob("lightning_logs/version_0/adapter/adapter_model.safetensors")
        ), name
        report = json.loads(
            next((tmp_path / name).glob("lightning_logs/version_0/data_report.json")).read_text()
        )
        assert report["format"] == DETECTED.get(name, name)
    for name in pairs:
        assert list(
            (tmp_path / f"pairs_{name}").glob(
                "lightning_logs/version_0/adapter/adapter_model.safetensors"
            )
        )


def test_a_dataset_module_of_its_own_layout_as_the_readme_writes_it(tokenizer, tmp_path):
    namespace: dict = {}
    readme = (REPO / "README.md").read_text()
    # the README's code
    exec(readme.split("# my_project/data.py\n")[1].split("```")[0], namespace)  # noqa: S102
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(6)]
    dm = namespace["TriviaDataModule"](
        path=str(write_jsonl(tmp_path / "trivia.jsonl", rows)),
        tokenizer=tokenizer,
        val_fraction=0.5,
        seed=0,
    )
    dm.setup("fit")
    assert dm.row_format == "trivia" and len(all_rows(dm)) == 6
    for row in all_rows(dm):
        (answer,) = trained_spans(row["input_ids"], row["labels"], tokenizer)
        assert f"is {int(answer) - 1} + 1?" in tokenizer.decode(row["input_ids"])


def test_an_sft_file_given_to_the_preference_module_says_which_module_reads_it(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl", [SFT_ROWS["openai"](conversation(i)) for i in range(4)]
    )
    with pytest.raises(UserError, match="holds no preference pairs .*an SFT DataModule"):
        PreferenceDataModule(path=str(path), tokenizer=tokenizer).setup("fit")


def test_columns_format_outside_the_column_module_is_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"q": f"a{i}", "r": "b"} for i in range(8)])
    with pytest.raises(UserError, match="ColumnDataModule"):
        sft_data(path, tokenizer, format="columns")
    with pytest.raises(
        UserError,
        match=r"1 usable rows cannot make a training split and a validation split of 0.25",
    ):
        sft_data(
            write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "#### 1"}]), tokenizer
        )
