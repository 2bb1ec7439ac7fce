"""The entry point: every command listed with its purpose, answered without torch; unknown ones
refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlora_lightning.run.commands import COMMANDS
from tests.conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    # -X importtime lists every module imported, on stderr: the help must not need torch.
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qlora_lightning", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_command_without_importing_torch():
    for flag in ([], ["--help"], ["-h"]):
        result = _run(*flag)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith(
            "usage: qlora-lightning (or python -m qlora_lightning) COMMAND"
        )
        listed = [
            line.split()[0]
            for line in result.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()
        ]
        assert (
            listed
            == ["fit", "validate", "test", "predict", "eval", "merge", "export", "estimate"]
            == list(COMMANDS)
        )
        imported = {
            line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line
        }
        assert not {"torch", "transformers", "lightning"} & imported, sorted(imported)[:20]


def test_an_unknown_command_is_one_line_naming_the_commands():
    result = _run("frobnicate")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: unknown command 'frobnicate' (one of: fit, validate, test, predict, eval, merge, "
        "export, estimate"
    )


def test_a_commands_help_leads_with_the_projects_keys():
    from tests.test_cli import run_cli

    result = run_cli("fit", "--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("usage: qlora-lightning fit --config FILE")
    model, data, trainer = (
        text.find(key) for key in ("--model.lora.r", "--data.format", "Trainer keys")
    )
    assert 0 < model < data < trainer, (model, data, trainer)
    assert "--trainer.max_epochs" not in text and "--help-all" in text.splitlines()[-1]
    assert len(text.splitlines()) < 450  # not the ~760 lines of every Trainer option
    # The same text again, from the cache (help_cache.py) this time, without loading torch.
    again = _run("fit", "--help")
    assert again.returncode == 0 and again.stdout == text
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if "|" in line}
    assert not {"torch", "transformers", "lightning"} & imported, sorted(imported)[:20]


@pytest.mark.parametrize("offline", ["0", "1"])
def test_a_hub_id_that_cannot_be_reached_fails_in_one_line_without_retries(offline, tmp_path):
    # A closed local port as the hub: the connection is refused at once, as on a machine without a
    # network (HF_HUB_OFFLINE=0), or the hub libraries told they are offline (1).
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": offline,
        "HF_HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_lightning",
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--model.init_args.base.name_or_path",
            "nobody/no-such-model",
            "--model.init_args.base.random_init",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: model (tokenizer) 'nobody/no-such-model' is not a local folder, the hub "
        "(http://127.0.0.1:9) cannot be reached"
    ), last
    assert "point base.name_or_path at a local folder" in last
    assert "retry" not in result.stderr.lower() and "Retrying" not in result.stderr


def test_the_cached_help_goes_stale_with_a_source_file_or_a_library(tmp_path, monkeypatch):
    from qlora_lightning.run import help_cache

    sources = tmp_path / "package"
    sources.mkdir()
    (sources / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(help_cache, "PACKAGE_DIR", sources)
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    help_cache.write("fit", "the help")
    assert help_cache.read("fit") == "the help" and help_cache.read("validate") is None

    (sources / "module.py").write_text("x = 22\n")  # an edited source
    assert help_cache.read("fit") is None
    help_cache.write("fit", "the new help")
    assert help_cache.read("fit") == "the new help"
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")  # help that names environment variables
    assert help_cache.read("fit") is None
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV")
    monkeypatch.setattr(help_cache, "_version", lambda name: "0.0-other")  # an upgraded library
    assert help_cache.read("fit") is None
