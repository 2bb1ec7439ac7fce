"""GSM8K exact match: answer extraction, prompts cut from training rows, batched greedy generation,
the GSM8KEval callback in fit (TensorBoard scalars and text) and in `test`, and `predict` to
JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lightning.data import GSM8KDataModule, pad_batch
from qlora_lightning.data.tokenize import ChatFormat, tokenize_messages, tokenize_prompt
from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.evaluation import (
    examples_in_batch,
    extract_answer,
    is_correct,
    split_prompt_response,
)
from qlora_lightning.evaluate.generation import (
    cut_at_stop,
    greedy_generate,
    left_pad,
    stop_token_ids,
)
from qlora_lightning.evaluate.gsm8k_eval import GSM8KEval
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.model.build import LoraSpec, build_model
from qlora_lightning.run.cli import make_cli
from tests.conftest import (
    EXAMPLES,
    TINY_LLAMA,
    cpu_trainer,
    needs_shared,
    sft_module,
    shared_path,
    tiny_spec,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GSM8K_FORMAT = ChatFormat("Question: {content}\nAnswer:")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gold(answer: str) -> str:
    """The oracle: GSM8K's final answers are integers, some with thousands commas."""
    return str(int(answer.split("####")[1].strip().replace(",", "")))


# ---- answer extraction -------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("split", ["train", "test"])
def test_extraction_is_right_on_every_gsm8k_gold_answer(split):
    rows = _rows(shared_path("datasets", "gsm8k", f"{split}.jsonl"))
    assert len(rows) in (7473, 1319)
    wrong = [r["answer"] for r in rows if extract_answer(r["answer"]) != _gold(r["answer"])]
    assert not wrong, wrong[:3]
    assert all(is_correct(r["answer"], r["answer"]) for r in rows)


def test_extraction_is_right_on_the_shipped_examples():
    rows = _rows(EXAMPLES / "gsm8k_train.jsonl") + _rows(EXAMPLES / "gsm8k_test.jsonl")
    assert len(rows) == 28
    assert [extract_answer(r["answer"]) for r in rows] == [_gold(r["answer"]) for r in rows]


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so 3 + 4 = 7\n#### 1,200", "1200"),  # marker wins over earlier numbers
        (
            "#### 41\n\nQuestion: Tom has 3 cats?\nAnswer: #### 3",
            "41",
        ),  # a model that keeps going: the first
        ("The answer is $5.50.", "5.5"),  # no marker: the last number
        ("It costs 12 dollars, so 7.0", "7"),
        ("#### -3", "-3"),
        ("####\nsomething 8 then 9", "9"),  # marker without a number: the last number
        ("She had 05 apples", "5"),
        ("no number at all", None),
    ],
)
def test_extraction_rules(text, answer):
    assert extract_answer(text) == answer


def test_a_reference_without_a_number_never_matches():
    assert not is_correct("nothing", "nothing either")
    assert is_correct("#### 7", "The answer\n#### 7") and not is_correct("#### 8", "#### 7")


# ---- prompts from tokenized training rows -------------------------------------------------


def test_prompt_is_the_training_prefix_and_the_response_the_reference(tokenizer):
    messages = [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7\n#### 7"},
    ]
    row = tokenize_messages(messages, tokenizer, GSM8K_FORMAT, max_seq_length=128)
    prompt, response = split_prompt_response(row["input_ids"], row["labels"])
    assert prompt == tokenize_prompt(messages[:1], tokenizer, GSM8K_FORMAT, max_seq_length=128)
    assert prompt[0] == tokenizer.bos_token_id and response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response, skip_special_tokens=True) == "3 + 4 = 7\n#### 7"


def test_a_multi_turn_row_is_scored_on_its_last_turn(tokenizer):
    messages = [
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "#### 2"},
        {"role": "user", "content": "and 2 + 2?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    row = tokenize_messages(messages, tokenizer, GSM8K_FORMAT, max_seq_length=128)
    prompt, response = split_prompt_response(row["input_ids"], row["labels"])
    assert tokenizer.decode(response, skip_special_tokens=True) == "#### 4"
    assert "#### 2" in tokenizer.decode(prompt) and prompt == row["input_ids"][: len(prompt)]


def test_padded_and_packed_batches_give_the_same_examples(tokenizer):
    rows = [
        tokenize_messages(
            [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ],
            tokenizer,
            GSM8K_FORMAT,
            256,
        )
        for r in _rows(EXAMPLES / "gsm8k_test.jsonl")[:3]
    ]
    expected = [(r["input_ids"], r["labels"]) for r in rows]
    padded = pad_batch(rows, tokenizer.pad_token_id)
    # A packed row as data/packing.py lays it out: examples end to end, positions restarting at 0, a
    # one-token pad "example" at the end, no attention mask.
    ids = sum((r["input_ids"] for r in rows), []) + [tokenizer.pad_token_id]
    labels = sum(([IGNORE_INDEX] + r["labels"][1:] for r in rows), []) + [IGNORE_INDEX]
    positions = sum((list(range(len(r["input_ids"]))) for r in rows), []) + [0]
    packed = {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }
    assert list(examples_in_batch(padded)) == expected
    assert [split_prompt_response(*e) for e in examples_in_batch(packed)] == [
        split_prompt_response(*e) for e in expected
    ]


# ---- batched greedy generation ------------------------------------------------------------


def test_left_pad_and_stop_tokens():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 5, 2, 6, 2], [2]) == [4, 5] and cut_at_stop([4, 5], [2]) == [4, 5]


@pytest.fixture(scope="module")
def tiny_peft(one_thread):
    """The tiny 4-bit Llama with a LoRA adapter whose B is not zero (so the adapter changes
    outputs)."""
    torch.manual_seed(0)
    model = build_model(
        tiny_spec(), LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_peft, tokenizer):
    questions = [r["question"] for r in _rows(EXAMPLES / "gsm8k_test.jsonl")]
    prompts = [
        tokenize_prompt([{"role": "user", "content": q}], tokenizer, GSM8K_FORMAT, 256)
        for q in questions
    ]
    assert len({len(p) for p in prompts}) > 3  # batches really are left-padded
    batched = greedy_generate(
        tiny_peft, prompts, tokenizer.pad_token_id, [], max_new_tokens=12, batch_size=8
    )
    single = [
        greedy_generate(tiny_peft, [p], tokenizer.pad_token_id, [], max_new_tokens=12)[0]
        for p in prompts
    ]
    assert batched == single
    assert all(len(g) == 12 for g in batched) and len({tuple(g) for g in batched}) > 1


# ---- the callback -------------------------------------------------------------------------


def _gsm8k_data(**kwargs) -> GSM8KDataModule:
    return GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=TINY_LLAMA,
        val_fraction=0.25,
        max_seq_length=256,
        batch_size=2,
        **kwargs,
    )


def test_callback_scores_at_start_and_every_n_steps_and_writes_tensorboard(tmp_path):
    module = sft_module()
    callback = GSM8KEval(
        every_n_steps=2, num_samples=3, max_new_tokens=6, batch_size=2, num_text_samples=2
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        logger=logger,
        callbacks=[callback],
        limit_val_batches=0,
    )
    trainer.fit(module, _gsm8k_data())

    assert [(h["stage"], h["step"], h["total"]) for h in callback.history] == [
        ("val", 0, 3),
        ("val", 2, 3),
        ("val", 4, 3),
    ]
    assert module.model.training  # generation ran in eval mode and handed training mode back
    assert "val/gsm8k_acc" in trainer.callback_metrics
    events = EventAccumulator(
        str(next(Path(logger.log_dir).glob("events*"))), size_guidance={"tensors": 0}
    )
    events.Reload()
    assert [e.step for e in events.Scalars("val/gsm8k_acc")] == [0, 2, 4]
    text = events.Tensors("val/gsm8k_samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    # Prompt and reference.
    assert text.count("**generation**") == 2 and "Question:" in text and "####" in text


def test_callback_scores_the_whole_split_in_validate(tmp_path):
    callback = GSM8KEval(max_new_tokens=4, num_samples=1)  # num_samples applies to fit only
    (results,) = cpu_trainer(tmp_path, callbacks=[callback]).validate(sft_module(), _gsm8k_data())
    assert "val/gsm8k_acc" in results and callback.history == [
        {"stage": "val", "step": 0, "accuracy": results["val/gsm8k_acc"], "total": 5}
    ]


def test_callback_refuses_batches_without_labels(tokenizer):
    preference = SimpleNamespace(val_dataloader=lambda: [{"chosen_input_ids": torch.zeros(1, 3)}])
    trainer = SimpleNamespace(
        datamodule=preference, lightning_module=SimpleNamespace(tokenizer=tokenizer)
    )
    with pytest.raises(UserError, match="SFT data module"):
        GSM8KEval()._stage_examples(trainer, "val")


def test_callback_scores_the_whole_test_split_in_the_test_subcommand(tmp_path, tiny_peft):
    # configs/gsm8k_eval.yaml with the tiny model, its adapter and the shipped examples in place of
    # Mistral, a GSM8K adapter and GSM8K.
    tiny_peft.save_pretrained(tmp_path / "adapter")
    cli = make_cli(
        [
            "--config",
            "configs/gsm8k_eval.yaml",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.base.name_or_path",
            TINY_LLAMA,
            "--model.init_args.base.random_init",
            "true",
            "--model.init_args.base.compute_dtype",
            "float32",
            "--model.init_args.lora.init_adapter",
            str(tmp_path / "adapter"),
            "--trainer.callbacks.init_args.max_new_tokens",
            "4",
            "--data.init_args.path",
            str(EXAMPLES / "gsm8k_train.jsonl"),
            "--data.init_args.val_split",
            "null",
            "--data.init_args.val_fraction",
            "0.25",
        ],
        run=False,
    )
    (results,) = cli.trainer.test(cli.model, cli.datamodule)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GSM8KEval)]
    assert {"test/gsm8k_acc", "test/loss"} <= set(results)
    # 25% of 20 rows.
    assert callback.history[-1]["stage"] == "test" and callback.history[-1]["total"] == 5


# ---- predict ------------------------------------------------------------------------------


def test_predict_writes_one_line_per_prompt_in_order(tmp_path):
    output = tmp_path / "predictions.jsonl"
    cli = make_cli(
        [
            "--config",
            "configs/predict_quickstart.yaml",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks.init_args.output",
            str(output),
            "--model.init_args.max_new_tokens",
            "5",
            "--data.init_args.batch_size",
            "3",
        ],
        run=False,
    )
    cli.trainer.predict(cli.model, cli.datamodule, return_predictions=False)

    lines = _rows(output)
    questions = [r["question"] for r in _rows(EXAMPLES / "gsm8k_test.jsonl")]
    assert [line["question"] for line in lines] == questions and all(
        "answer" in line for line in lines
    )
    tokenizer = cli.model.tokenizer
    prompts = [
        tokenize_prompt([{"role": "user", "content": q}], tokenizer, GSM8K_FORMAT, 512)
        for q in questions
    ]
    model = cli.model.model
    direct = greedy_generate(
        model, prompts, tokenizer.pad_token_id, stop_token_ids(model, tokenizer), 5
    )
    assert [line["generation"] for line in lines] == tokenizer.batch_decode(
        direct, skip_special_tokens=True
    )
