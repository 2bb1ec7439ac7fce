"""Learning checks on a real pretrained model (stories260K, a TinyStories Llama from ../shared),
through the shipped configs: the eval callback's accuracy goes from about 0 to high on held-out
numbers, and a multi-LoRA `test` run scores each adapter high on its own task and low on the
other's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_lightning.evaluate.gsm8k_eval import GSM8KEval
from qlora_lightning.model.adapters import BASE_SPEC_FILE
from qlora_lightning.run.cli import make_cli
from tests.conftest import EXAMPLES, REPO, needs_shared, shared_path

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]


def _fit(root, task: str) -> tuple[list[dict], str]:
    """Train configs/digits_stories260k.yaml on ``task``; the GSM8KEval history and the adapter
    directory."""
    adapter = str(root / f"{task}-adapter")
    cli = make_cli(
        [
            "--config",
            str(REPO / "configs" / "digits_stories260k.yaml"),
            "--model.init_args.base.name_or_path",
            str(shared_path("models", "stories260K")),
            "--data.init_args.path",
            str(EXAMPLES / f"digits_{task}.jsonl"),
            "--model.init_args.adapter_dir",
            adapter,
            "--trainer.default_root_dir",
            str(root / task),
            "--trainer.enable_progress_bar",
            "false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GSM8KEval)]
    return callback.history, adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> dict[str, tuple[list[dict], str]]:
    root = tmp_path_factory.mktemp("digits")
    return {task: _fit(root, task) for task in ("echo", "first")}


def test_lora_learns_to_repeat_numbers_it_never_saw(trained):
    history, adapter = trained["echo"]
    assert [h["step"] for h in history] == [0, 100, 200]
    assert all(h["total"] == 18 for h in history)  # the held-out 20% of 90 numbers
    assert history[0]["accuracy"] <= 0.1  # the base tells stories
    assert history[-1]["accuracy"] >= 0.8
    # For `merge`.
    assert json.loads(Path(adapter, BASE_SPEC_FILE).read_text())["quantization"] == "none"


def test_multi_lora_eval_scores_each_adapter_on_its_own_task(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config names the shipped data by repository-relative paths
    paths = {task: adapter for task, (_, adapter) in trained.items()}
    cli = make_cli(
        [
            "--config",
            "configs/multi_lora_eval.yaml",
            "--model.init_args.base.name_or_path",
            str(shared_path("models", "stories260K")),
            "--model.init_args.adapters.paths",
            json.dumps(paths),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ],
        run=False,
    )
    (results,) = cli.trainer.test(cli.model, cli.datamodule)
    assert results["test/echo_acc"] >= 0.8
    assert results["test/first_acc"] >= 0.5
    assert results["test/echo_by_first_acc"] <= 0.2 and results["test/first_by_echo_acc"] <= 0.2
    assert {"test/echo_by_both_acc", "test/first_by_both_acc", "test/loss"} <= set(results)
    assert cli.model.model.active_adapter == "echo"  # every callback switched back
