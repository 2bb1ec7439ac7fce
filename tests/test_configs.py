"""Every YAML in ``configs/`` parses and instantiates through the CLI, offline, building nothing.

The hub libraries are offline for the whole session (see conftest), so a config whose classes
reached for a model, tokenizer or dataset at construction time would fail here.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer

from qlora_lightning.modules import QLoRAModule
from qlora_lightning.run.cli import make_cli
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(path.name == "quickstart.yaml" for path in CONFIGS)


def machine_overrides(path) -> list[str]:
    """What this machine changes in a config: the whole YAML is still parsed and checked first.

    GPU configs name accelerator: gpu; on a CPU machine the accelerator is swapped, and an FSDP
    strategy (which Lightning refuses without a GPU) for DDP (tests/test_distributed.py builds it).
    Multi-GPU configs get no more devices than the machine has.
    """
    trainer = yaml.safe_load(path.read_text()).get("trainer", {})
    if not torch.cuda.is_available():
        strategy = trainer.get("strategy")
        fsdp = isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy")
        return ["--trainer.accelerator", "cpu"] + (["--trainer.strategy", "ddp"] if fsdp else [])
    devices = trainer.get("devices")
    if isinstance(devices, int) and devices > torch.cuda.device_count():
        return ["--trainer.devices", str(torch.cuda.device_count())]
    return []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_instantiates_offline_and_lazily(path):
    header = path.read_text().splitlines()
    # Rule: the launch command sits in the header comment.
    assert any(
        line.startswith("#") and f"--config configs/{path.name}" in line for line in header
    ), path.name

    cli = make_cli(["--config", str(path)] + machine_overrides(path), run=False)

    assert isinstance(cli.model, QLoRAModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer, Trainer)
    # Nothing was loaded: the model is built in configure_model, the tokenizer on first use.
    assert cli.model.model is None and cli.model._tokenizer is None
    base = cli.model.base
    # Linked from the model.
    assert cli.datamodule.tokenizer == (base.tokenizer or base.name_or_path)

    # The typed specs hold what the YAML says.
    raw = yaml.safe_load(path.read_text())["model"]["init_args"]
    for section, spec in (("base", cli.model.base), ("lora", cli.model.lora)):
        for key, value in (raw.get(section) or {}).items():
            assert getattr(spec, key) == value, f"{path.name}: model.init_args.{section}.{key}"
    accumulate = yaml.safe_load(path.read_text()).get("trainer", {}).get("accumulate_grad_batches")
    if accumulate is not None:
        assert cli.trainer.accumulate_grad_batches == accumulate
