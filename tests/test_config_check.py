"""The early check (config_check.py): after one parse has recorded a command's keys, a mistake the
record proves stops the next command with LightningCLI's own line, before torch is imported, and
nothing valid is ever refused."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lightning.run import config_check, help_cache
from qlora_lightning.run.cli import QLoRACLI, make_cli
from qlora_lightning.run.cli import main as full_main
from tests.conftest import REPO

BASE = ["fit", "--config", "configs/quickstart.yaml"]


class _Parsed(Exception):
    pass


def parse_only(argv: list[str], monkeypatch) -> None:
    """LightningCLI's parse of ``argv``, which records its keys, stopping before anything is
    built."""

    def stop(self):
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(QLoRACLI, "instantiate_classes", stop)
        with pytest.raises(_Parsed):
            make_cli(argv)


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.chdir(REPO)
    parse_only(BASE, monkeypatch)


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "more.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_no_shipped_config_is_refused(config, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["fit", "--config", f"configs/{config}"]
    parse_only(argv, monkeypatch)
    assert config_check.check(argv) is None
    assert (
        config_check.check(argv + ["--trainer.max_steps", "3", "--model.init_args.lora.r", "8"])
        is None
    )


MISTAKES = {
    "unknown model key": ["--model.init_args.bogus", "1"],
    "unknown data key (YAML)": ["--config", "data:\n  init_args:\n    batch_sise: 2\n"],
    "unknown trainer key (YAML)": ["--config", "trainer:\n  max_stepz: 3\n"],
    "unknown top-level key (YAML)": ["--config", "bogus_top: 3\n"],
    "a word for an int": ["--data.init_args.batch_size", "two"],
    "a word for a float": ["--model.init_args.warmup_ratio", "half"],
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_gets_lightningclis_own_line(mistake, recorded, tmp_path, monkeypatch):
    args = MISTAKES[mistake]
    if args[0] == "--config":
        args = ["--config", _yaml(tmp_path, args[1])]
    early = config_check.check(BASE + args)
    monkeypatch.setattr(
        "qlora_lightning.model.build.build_model", lambda *a, **k: pytest.fail("model was built")
    )
    with pytest.raises(SystemExit) as full:
        full_main(BASE + args)
    assert early is not None, "the early check let the mistake through"
    assert f"error: {early} (see --help)" == full.value.code


def test_an_unknown_trainer_key_on_the_command_line_is_named(recorded):
    # LightningCLI says "unrecognized arguments" here; the early line names the same key.
    assert (
        config_check.check(BASE + ["--trainer.max_stepz", "3"])
        == "Subcommand 'fit' does not accept option 'trainer.max_stepz'"
    )


def test_a_missing_config_file_needs_no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))  # nothing recorded there
    assert (
        config_check.check(["fit", "--config", "configs/no_such.yaml"])
        == "--config configs/no_such.yaml: no such file"
    )


def test_what_the_record_cannot_prove_goes_on_to_lightningcli(recorded, monkeypatch):
    # A class never parsed, a nested key, a value the class bounds itself, a flag: no early answer.
    assert (
        config_check.check(
            BASE + ["--data.class_path", "my_project.MyData", "--data.init_args.x", "1"]
        )
        is None
    )
    assert config_check.check(BASE + ["--model.init_args.lora.bogus", "1"]) is None
    assert config_check.check(BASE + ["--model.init_args.lora.r", "0"]) is None
    assert config_check.check(BASE + ["--print_config"]) is None
    assert config_check.check(BASE + ["--model.init_args.bogus", "1"]) is not None
    monkeypatch.setattr(help_cache, "source_key", lambda: "another version of the sources")
    assert config_check.check(BASE + ["--model.init_args.bogus", "1"]) is None, (
        "a stale record was used"
    )


def test_the_early_answer_imports_no_torch(recorded):
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "qlora_lightning",
            *BASE,
            "--model.init_args.bogus",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    lines = result.stderr.splitlines()
    assert (
        result.returncode == 1
        and lines[-1] == "error: model: Option 'bogus' is not accepted (see --help)"
    ), result.stderr[-2000:]
    heavy = [ln for ln in lines if re.search(r"\|\s*(torch|lightning|transformers)(\.|$)", ln)]
    assert not heavy, heavy[:5]
