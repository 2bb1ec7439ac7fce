"""``eval`` and ``LMEvalCallback``: lm-evaluation-harness on the model in memory, the shipped local
GSM8K task, results beside the run and in the loggers, bad input in one line.

CPU, a tiny random 4-bit Llama and the shipped GSM8K-format examples: the scores are 0 and mean
nothing; what is checked is what lm-eval is given (the model as trained, lm-eval's own gsm8k task
on local files) and where its results go.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qlora_lightning.errors import UserError
from tests.conftest import EXAMPLES, cpu_trainer, sft_module, tiny_spec

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from qlora_lightning.evaluate import lmeval  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Keys that make gsm8k_local read local files instead of the hub; everything else must be gsm8k's.
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "custom_dataset"}


def _yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)


def test_the_local_task_is_lm_evals_gsm8k_on_local_files():
    upstream = _yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml")
    local = _yaml(lmeval.TASKS_DIR / "gsm8k_local.yaml")
    assert local["task"] == "gsm8k_local"
    assert {k: v for k, v in local.items() if k not in DATA_KEYS} == {
        k: v for k, v in upstream.items() if k not in DATA_KEYS
    }
    assert local["custom_dataset"].endswith("qlora_lightning.evaluate.lmeval.load_gsm8k_local")
    splits = lmeval.load_gsm8k_local()  # the shipped examples by default
    assert (len(splits["test"]), len(splits["train"])) == (8, 20)
    assert splits["test"][0]["answer"].endswith("#### 41")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A saved adapter as fit saves one (tokenizer and base spec beside it), with a non-zero B."""
    from qlora_lightning.model.adapters import save_base_spec
    from qlora_lightning.model.build import LoraSpec, build_model, load_tokenizer, tokenizer_source

    spec = tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    folder = tmp_path_factory.mktemp("run") / "adapter"
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_source(spec)).save_pretrained(folder)
    save_base_spec(spec, folder)
    return folder


def _samples(path: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in path.with_name(path.stem + ".samples.jsonl").read_text().splitlines()
    ]


def test_eval_scores_the_adapter_on_its_4bit_base_as_trained(adapter, capsys):
    from qlora_lightning.evaluate.generation import greedy_generate, stop_token_ids
    from qlora_lightning.evaluate.merge import adapter_on_base, base_spec_for
    from qlora_lightning.model.build import load_tokenizer

    path = lmeval.main(
        [
            "--adapter",
            str(adapter),
            "--limit",
            "3",
            "--num_fewshot",
            "0",
            "--max_gen_toks",
            "12",
            "--batch_size",
            "2",
        ]
    )
    # Beside the run.
    assert path.parent == adapter.parent / "lm_eval" and path.name.startswith("gsm8k_local-")
    results = json.loads(path.read_text())
    assert set(results["results"]["gsm8k_local"]) >= {
        "exact_match,strict-match",
        "exact_match,flexible-extract",
    }
    assert results["n-samples"]["gsm8k_local"]["effective"] == 3
    assert results["qlora_lightning"]["adapter"] == str(adapter)
    assert "strict-match" in capsys.readouterr().out  # lm-eval's table
    samples = _samples(path)
    assert sorted((s["doc_id"], s["filter"]) for s in samples) == sorted(
        (i, f) for i in range(3) for f in ("strict-match", "flexible-extract")
    )

    # What lm-eval generated is what the project's own greedy generation makes from the adapter on
    # its 4-bit base for the same prompt (0-shot: "Question: ...\nAnswer:"), cut at gsm8k's stop
    # sequence.
    tokenizer = load_tokenizer(str(adapter))
    model = adapter_on_base(adapter, base_spec_for(adapter))
    for sample in (s for s in samples if s["filter"] == "strict-match"):
        prompt = tokenizer.encode(f"Question: {sample['doc']['question']}\nAnswer:")
        tokens = greedy_generate(
            model, [prompt], tokenizer.pad_token_id, stop_token_ids(model, tokenizer), 12
        )[0]
        expected = tokenizer.decode(tokens, skip_special_tokens=True).split("Question:")[0]
        assert sample["resps"] == [[expected]]
    # The adapter is used: switched off, the generations differ.
    off = lmeval.main(
        [
            "--adapter",
            str(adapter),
            "--without_adapter",
            "--limit",
            "3",
            "--num_fewshot",
            "0",
            "--max_gen_toks",
            "12",
            "--output",
            str(adapter.parent / "base.json"),
        ]
    )
    assert [s["resps"] for s in _samples(off)] != [s["resps"] for s in samples]


def _one_line(args: list[str]) -> str:
    with pytest.raises(UserError) as err:
        lmeval.main(args)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_bad_input_is_one_line(adapter, tmp_path, monkeypatch):
    assert (
        _one_line(["--adapter", str(tmp_path / "nope")])
        == f"adapter '{tmp_path / 'nope'}' does not exist"
    )
    assert "is not a PEFT adapter folder" in _one_line(["--adapter", str(tmp_path)])
    assert "holds no config.json: it is an adapter, use --adapter" in _one_line(
        ["--model", str(adapter)]
    )
    assert (
        _one_line(["--adapter", str(adapter), "--gsm8k_test", "missing.jsonl"])
        == "--gsm8k_test 'missing.jsonl' does not exist"
    )
    assert _one_line(["--adapter", str(adapter), "--metadata", "{oops"]).startswith(
        "--metadata is not JSON"
    )
    assert (
        _one_line(["--adapter", str(adapter), "--include_path", str(tmp_path / "x")])
        == f"--include_path '{tmp_path / 'x'}' does not exist"
    )
    assert "NAME=PATH" in _one_line(["--adapter", str(adapter), "--extra_adapter", str(adapter)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(
        UserError, match=r"gsm8k_local: line 1 of .* is not a \{question, answer\} JSON row"
    ):
        lmeval.load_gsm8k_local(str(bad))
    # A task name nobody knows: lm-eval's own tasks are indexed too (~30 s), so here they are left
    # out.
    from lm_eval import tasks as lm_tasks

    original = lm_tasks.TaskManager
    monkeypatch.setattr(
        lm_tasks,
        "TaskManager",
        lambda include_defaults=True, **kw: original(include_defaults=False, **kw),
    )
    assert (
        _one_line(["--adapter", str(adapter), "--tasks", "gsm8k_locl"])
        == "unknown lm-eval task 'gsm8k_locl'; did you mean gsm8k_local?"
    )
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert (
        _one_line(["--adapter", str(adapter)])
        == "eval needs lm-evaluation-harness: pip install -e '.[eval]'"
    )


def test_the_command_line_says_what_is_wrong_in_one_line(adapter):
    from tests.test_cli import run_cli

    result = run_cli(
        "eval", "--adapter", str(adapter), "--without_adapter", "--model", str(adapter)
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: argument --model: not allowed with argument")
    )


def test_the_callback_scores_during_fit_and_leaves_training_as_it_was(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from qlora_lightning.data import GSM8KDataModule
    from qlora_lightning.model.build import load_tokenizer, tokenizer_source

    def fit(root: Path, callbacks: list) -> torch.nn.Module:
        torch.manual_seed(0)
        module = sft_module(base=tiny_spec(initializer_range=0.3), lr=1e-2)
        data = GSM8KDataModule(
            path=str(EXAMPLES / "gsm8k_train.jsonl"),
            tokenizer=load_tokenizer(tokenizer_source(module.base)),
            max_seq_length=128,
            batch_size=4,
            val_fraction=0.2,
        )
        trainer = cpu_trainer(
            root, max_steps=3, logger=CSVLogger(root), callbacks=callbacks, limit_val_batches=0
        )
        trainer.fit(module, data)
        return module

    callback = lmeval.LMEvalCallback(
        every_n_steps=2, limit=2, num_fewshot=1, max_gen_toks=6, batch_size=2
    )
    with_eval = fit(tmp_path / "with", [callback])
    without = fit(tmp_path / "without", [])
    # Train mode, the RNG streams and the adapter after training are those of the run without it.
    assert with_eval.model.training
    for (name, a), (_, b) in zip(
        with_eval.model.named_parameters(), without.model.named_parameters()
    ):
        if a.requires_grad:
            assert torch.equal(a, b), name
    # Evaluated at step 2 (every_n_steps) and step 3 (the end), logged and written beside the run.
    assert [h["step"] for h in callback.history] == [2, 3]
    run = tmp_path / "with" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (run / "lm_eval").iterdir()) == [
        "step_2.json",
        "step_2.samples.jsonl",
        "step_3.json",
        "step_3.samples.jsonl",
    ]
    logged = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {
        "lmeval/gsm8k_local/exact_match/strict-match",
        "lmeval/gsm8k_local/exact_match/flexible-extract",
    } <= set(logged)


def test_the_callback_refuses_an_unknown_task_before_training(tmp_path, monkeypatch):
    from lm_eval import tasks as lm_tasks

    original = lm_tasks.TaskManager
    monkeypatch.setattr(
        lm_tasks,
        "TaskManager",
        lambda include_defaults=True, **kw: original(include_defaults=False, **kw),
    )
    callback = lmeval.LMEvalCallback(tasks=["no_such_task"])
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task'"):
        callback.setup(cpu_trainer(tmp_path), None, "fit")


def test_a_merged_folder_and_an_extra_adapter_are_scored_too(adapter, tmp_path):
    from qlora_lightning.evaluate.merge import base_spec_for, merge_adapter
    from qlora_lightning.model.build import load_tokenizer

    merged = tmp_path / "merged"
    merge_adapter(adapter, base_spec_for(adapter), dtype=torch.float32).save_pretrained(merged)
    load_tokenizer(str(adapter)).save_pretrained(merged)
    quick = ["--limit", "2", "--num_fewshot", "0", "--max_gen_toks", "8"]
    path = lmeval.main(["--model", str(merged), *quick])
    assert path.parent == merged / "lm_eval" and len(_samples(path)) == 4
    # The same adapter loaded again under another name and made active scores as the module's own.
    own = lmeval.main(["--adapter", str(adapter), *quick, "--output", str(tmp_path / "own.json")])
    again = lmeval.main(
        [
            "--adapter",
            str(adapter),
            "--extra_adapter",
            f"again={adapter}",
            "--active",
            "again",
            *quick,
            "--output",
            str(tmp_path / "again.json"),
        ]
    )
    assert [s["resps"] for s in _samples(again)] == [s["resps"] for s in _samples(own)]
    assert json.loads(again.read_text())["qlora_lightning"]["active"] == "again"
