"""Model cards: ``fit`` writes README.md into the adapter folder, ``merge`` into the merged folder,
``export`` into the GGUF folder; ``--push_to_hub`` uploads the real folder through ``HfApi`` (its
two network calls replaced here: no request leaves the machine)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from qlora_lightning.errors import UserError
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHub:
    """Stands in for the hub: records each ``create_repo`` and, for each ``upload_folder``, the
    folder's files (name -> sha256) as they were when handed over."""

    def __init__(self):
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        self.fail: Exception | None = None

    def install(self, monkeypatch) -> "FakeHub":
        from huggingface_hub import HfApi

        hub = self

        def create_repo(api, repo_id, **kwargs):
            if hub.fail:
                raise hub.fail
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            files = {
                str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
            hub.uploads.append({"repo_id": repo_id, "folder": folder, "files": files, **kwargs})
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The quickstart for 4 optimizer steps through the CLI, pushed to a fake hub; (run folder,
    hub)."""
    from qlora_lightning.run.cli import make_cli

    root = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # LightningCLI warns when given args beside pytest's.
        monkeypatch.setattr(sys, "argv", sys.argv[:1])
        hub = FakeHub().install(monkeypatch)
        make_cli(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--trainer.max_steps",
                "4",
                "--trainer.val_check_interval",
                "4",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(root),
                "--push_to_hub",
                "my-org/tiny-adapter",
            ]
        )
    (run,) = (root / "lightning_logs").glob("version_*")
    return run, hub


def test_fit_writes_a_card_into_the_adapter_folder(fitted):
    run, _ = fitted
    adapter = run / "adapter"
    card = _card(adapter)
    assert (
        card.data.library_name == "peft"
        and "qlora_lightning" in card.data.tags
        and "sft" in card.data.tags
    )
    assert card.data.base_model is None  # a random-weight base names no hub model
    text = card.text
    for expected in (
        "# tiny-adapter",
        "qlora_lightning/assets/tiny-llama` with random weights",
        "quantized to nf4 with double quantization",
        "qlora_lightning/assets/examples/gsm8k_train.jsonl",
        "through `GSM8KDataModule`, format `gsm8k`",
        "| train | 16 | 16 |",
        "| val | 4 | 4 |",
        "| r | 16 |",
        "| alpha | 32 |",
        "AdamW(lr=0.002",
        "| lr_scheduler | `cosine` |",
        "| steps_done | 4 |",
        "| val/loss |",
        "| train/loss |",
        'adapter_on_base("my-org/tiny-adapter"',
        'AutoPeftModelForCausalLM.from_pretrained("my-org/tiny-adapter")',
    ):
        assert expected in text, expected
    summary = json.loads((adapter / "training_summary.json").read_text())
    report = json.loads((run / "data_report.json").read_text())
    assert summary["data"]["splits"]["train"]["kept"] == report["splits"]["train"]["kept"] == 16
    assert summary["trainer"]["steps_done"] == 4 and summary["lora"]["r"] == 16
    assert f"{summary['metrics']['val/loss']:.6g}" in text


def test_fit_pushes_the_adapter_folder_as_written(fitted):
    run, hub = fitted
    assert [r["repo_id"] for r in hub.repos] == ["my-org/tiny-adapter"] and hub.repos[0]["exist_ok"]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "my-org/tiny-adapter" and upload["folder"] == run / "adapter"
    assert upload["files"] == _digests(run / "adapter")  # the real folder, its card included
    assert {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    } <= set(upload["files"])


def test_merge_writes_a_card_carrying_the_training_and_pushes(fitted, tmp_path, monkeypatch):
    from qlora_lightning.evaluate.merge import main as merge

    run, _ = fitted
    hub = FakeHub().install(monkeypatch)
    merged = tmp_path / "merged"
    report = merge(
        [
            "--adapter",
            str(run / "adapter"),
            "--output",
            str(merged),
            "--push_to_hub",
            "my-org/merged",
        ]
    )
    card = _card(merged)
    assert card.data.library_name == "transformers" and "merged-lora" in card.data.tags
    text = card.text
    assert "## Merge check: passed" in text and "| kl |" in text
    assert f"on {report['positions']} positions" in text
    # The adapter's facts.
    assert "### Data" in text and "| train | 16 | 16 |" in text and "| r | 16 |" in text
    assert 'AutoModelForCausalLM.from_pretrained("my-org/merged")' in text
    summary = json.loads((merged / "training_summary.json").read_text())
    assert (
        summary["stage"] == "merged"
        and summary["merge"]["passed"] is True
        and summary["lora"]["r"] == 16
    )
    (upload,) = hub.uploads
    assert upload["folder"] == merged and upload["files"] == _digests(merged)
    assert {"README.md", "model.safetensors", "config.json", "merge_report.json"} <= set(
        upload["files"]
    )


def test_export_writes_a_card_and_pushes_the_gguf_folder(fitted, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="needs the real extra: pip install -e '.[real]'")
    from qlora_lightning.evaluate.export import main as export
    from qlora_lightning.evaluate.merge import main as merge

    run, _ = fitted
    merged = tmp_path / "merged"
    merge(["--adapter", str(run / "adapter"), "--output", str(merged)])
    hub = FakeHub().install(monkeypatch)
    out = tmp_path / "gguf"
    path = export(
        [
            "--model",
            str(merged),
            "--dtype",
            "q8_0",
            "--output",
            str(out),
            "--push_to_hub",
            "my-org/gguf",
        ]
    )
    card = _card(out)
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags
    assert f"| `{path.name}` | Q8_0 |" in card.text and f"llama-cli -m {path.name}" in card.text
    assert "### LoRA" in card.text and "ollama run hf.co/my-org/gguf" in card.text
    (upload,) = hub.uploads
    assert upload["folder"] == out and upload["files"] == _digests(out)
    assert set(upload["files"]) == {"README.md", "training_summary.json", path.name}
    assert len(gguf.GGUFReader(path).tensors) == 21  # a whole file went up


def test_a_bad_repository_id_fails_before_training(tmp_path, monkeypatch):
    from qlora_lightning.evaluate.card import check_repo_id
    from qlora_lightning.run.cli import make_cli

    for bad in ("no-organization", "a/b/c", "org/bad name"):
        with pytest.raises(UserError) as err:
            check_repo_id(bad)
        assert "\n" not in str(err.value) and bad in str(err.value)
    hub = FakeHub().install(monkeypatch)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(UserError, match="--push_to_hub 'no-organization'"):
        make_cli(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--trainer.max_steps",
                "1",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--push_to_hub",
                "no-organization",
            ]
        )
    assert not list(tmp_path.iterdir()) and not hub.uploads  # no run folder, no adapter


def test_an_upload_that_fails_is_one_line(tmp_path, monkeypatch):
    from qlora_lightning.evaluate.card import push_folder

    hub = FakeHub().install(monkeypatch)
    hub.fail = OSError("401 Client Error: Unauthorized\nInvalid credentials")
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(UserError) as err:
        push_folder(tmp_path, "my-org/name", "a commit")
    assert (
        str(err.value)
        == f"--push_to_hub my-org/name: upload of '{tmp_path}' failed: 401 Client Error: "
        "Unauthorized"
    )
    with pytest.raises(UserError, match="does not exist"):
        push_folder(tmp_path / "missing", "my-org/name", "a commit")
