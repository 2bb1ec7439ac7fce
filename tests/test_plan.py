"""The training plan: the checkpointing modes a config names, what ``auto`` picks for the data's
declared micro-batch, FSDP's rules, the optimizer kind, and ``estimate`` printing it all."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from qlora_lightning.errors import UserError
from qlora_lightning.model.build import LoraSpec, build_model
from qlora_lightning.model.plan import (
    HALVES,
    MicroBatch,
    TrainingPlan,
    declared_micro_batch,
    optimizer_kind,
    resolve_plan,
)
from qlora_lightning.modules import DPOModule, KTOModule, paged_adamw_8bit
from qlora_lightning.run.cli import make_cli
from qlora_lightning.run.estimate import main as estimate_main
from qlora_lightning.speed.checkpointing import CheckpointMode
from tests.conftest import REPO, cpu_trainer, sft_module, tiny_spec

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


class NoShapeDataModule(LightningDataModule):
    """A DataModule that declares neither its batch size nor its sequence length."""

    def train_dataloader(self):
        ids = torch.randint(0, 512, (1, 16))
        return DataLoader(
            [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
            batch_size=None,
        )


@pytest.mark.parametrize(
    "value, mode",
    [
        (False, CheckpointMode.KEEP_ACTIVATIONS),
        (True, CheckpointMode.RECOMPUTE_LAYERS),
        ("offload", CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS),
        ("offload_halves", CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS),
        ("offload_all", CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE),
    ],
)
def test_every_config_value_names_one_mode(value, mode):
    assert CheckpointMode.of(value) is mode is CheckpointMode(value) is CheckpointMode.of(mode)
    assert mode.value is value or mode.value == value  # written back as the config wrote it
    assert resolve_plan(tiny_spec(), LoraSpec(), value).checkpointing is mode
    assert mode.checkpoints == (value is not False)
    assert mode.recomputes == (value in (True, "offload", "offload_halves"))
    assert mode.offloads_inputs == (value in ("offload", "offload_halves"))


def test_a_value_that_names_no_mode_is_one_line():
    with pytest.raises(
        ValueError, match="is none of false, true, offload, offload_halves, offload_all"
    ):
        CheckpointMode.of("offlaod")
    with pytest.raises(UserError, match="^model.gradient_checkpointing 'offlaod' is none of"):
        resolve_plan(tiny_spec(), LoraSpec(), "offlaod")


@pytest.mark.parametrize(
    "mode, base_last",
    [
        (CheckpointMode.KEEP_ACTIVATIONS, "nowhere"),
        (CheckpointMode.RECOMPUTE_LAYERS, "decoder layers"),
        (CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS, "decoder layers"),
        (CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS, "attention and MLP"),
        (
            CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE,
            "nowhere",
        ),  # nothing is recomputed: nothing to skip
    ],
)
def test_the_base_last_order_and_the_compile_split_follow_from_the_mode(mode, base_last):
    assert TrainingPlan(mode).base_last == base_last
    assert TrainingPlan(mode, skip_last_recompute=False).base_last == "nowhere"
    assert TrainingPlan(mode, compile=True).compile_split == (
        HALVES if mode.splits_halves else frozenset()
    )
    assert TrainingPlan(mode, compile=False).compile_split == frozenset()


def test_the_optimizer_kind_is_read_without_building_one():
    assert optimizer_kind(paged_adamw_8bit) == "PagedAdamW8bit"
    assert optimizer_kind(functools.partial(torch.optim.SGD, lr=0.1)) == "SGD"
    assert optimizer_kind(torch.optim.AdamW) == "AdamW"
    assert optimizer_kind("bitsandbytes.optim.AdamW8bit") == "AdamW8bit"
    # Unknown: fp32 moments.
    assert optimizer_kind(lambda params: torch.optim.SGD(params, lr=0.1)) == "AdamW"
    # As a config gives it: jsonargparse's partial around the class named by class_path.
    cli = make_cli(
        ["--config", QUICKSTART, "--trainer.accelerator", "cpu", "--trainer.logger", "false"],
        run=False,
    )
    assert optimizer_kind(cli.model.optimizer_factory) == "AdamW"


def _attached(module, datamodule, strategy=None):
    """``module`` as a Trainer would hold it: on ``strategy`` (None: the CPU), fitting
    ``datamodule``."""
    module._trainer = SimpleNamespace(
        strategy=strategy, datamodule=datamodule, precision="bf16-mixed"
    )
    return module


def test_auto_plans_a_config_for_its_datamodules_micro_batch_and_budget(caplog):
    args = [
        "--config",
        QUICKSTART,
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--model.init_args.gradient_checkpointing",
        "auto",
    ]
    ample = make_cli([*args, "--model.init_args.memory_budget_gib", "100"], run=False)
    plan = _attached(ample.model, ample.datamodule).plan_training()
    assert plan.checkpointing is CheckpointMode.KEEP_ACTIVATIONS  # everything fits: the fastest
    assert (
        plan.micro_batch == MicroBatch(4, 256)
        and plan.budget_gib == 100
        and 0 < plan.peak_gib < 100
    )
    assert plan.optimizer == "AdamW" and plan.reason.startswith("auto: the fastest that fits")
    tiny = make_cli([*args, "--model.init_args.memory_budget_gib", "0.0001"], run=False)
    with caplog.at_level(logging.WARNING):
        plan = _attached(tiny.model, tiny.datamodule).plan_training()
    assert plan.checkpointing is CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS  # the leanest
    assert plan.reason.startswith("auto: no mode fits") and "no mode fits" in caplog.text


def test_fit_logs_the_plan_in_one_line(tmp_path, caplog):
    module = sft_module(gradient_checkpointing="offload_all")
    ids = torch.randint(0, 512, (1, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with caplog.at_level(logging.INFO, logger="qlora_lightning"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, DataLoader([batch], batch_size=None))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert lines == [module.plan.line()] and "\n" not in lines[0]
    assert "gradient_checkpointing offload_all (set in the config)" in lines[0]


@pytest.mark.parametrize("setting", ["offload", "auto"])
def test_fsdps_own_activation_checkpointing_turns_transformers_off(setting):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = FSDPStrategy(
        parallel_devices=[torch.device("cuda", 0)],
        activation_checkpointing_policy={LlamaDecoderLayer},
    )
    module = _attached(
        sft_module(gradient_checkpointing=setting, memory_budget_gib=10), None, strategy
    )
    plan = module.plan_training()
    assert plan.checkpointing is CheckpointMode.KEEP_ACTIVATIONS and plan.base_last == "nowhere"
    # Compile_layers auto: left out under FSDP.
    assert plan.reason.startswith("FSDP") and not plan.compile


def test_a_datamodule_without_a_declared_shape_fails_in_one_line_naming_it(tmp_path):
    module = sft_module(gradient_checkpointing="auto", memory_budget_gib=10)
    with pytest.raises(UserError) as err:
        cpu_trainer(tmp_path, max_steps=1).fit(module, datamodule=NoShapeDataModule())
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "NoShapeDataModule declares no batch_size or max_seq_length"
    )
    # A mode set in the config needs no shape.
    assert (
        _attached(sft_module(gradient_checkpointing=True), NoShapeDataModule())
        .plan_training()
        .micro_batch
        is None
    )
    with pytest.raises(UserError, match="there is no DataModule"):
        _attached(
            sft_module(gradient_checkpointing="auto", memory_budget_gib=10), None
        ).plan_training()
    with pytest.raises(UserError, match="^Half declares no max_seq_length"):
        declared_micro_batch(SimpleNamespace(batch_size=2), name="Half")


def test_preference_modules_count_sequences_per_pair_as_before():
    shape = SimpleNamespace(batch_size=3, max_seq_length=64)
    dpo = _attached(DPOModule(base=tiny_spec(), gradient_checkpointing=False), shape)
    kto = _attached(KTOModule(base=tiny_spec(), gradient_checkpointing=False), shape)
    assert dpo.plan_training(estimate=True).micro_batch == MicroBatch(6, 64)  # chosen and rejected
    assert kto.plan_training(estimate=True).micro_batch == MicroBatch(3, 64)


def test_build_model_takes_a_plan_or_a_mode_not_both():
    plan = resolve_plan(tiny_spec(), LoraSpec(r=4), "offload_all")
    with pytest.raises(TypeError, match="a plan or a gradient_checkpointing mode"):
        build_model(tiny_spec(), LoraSpec(r=4), plan, gradient_checkpointing=True)


def test_estimate_prints_the_plan_before_the_memory_table(capsys):
    estimate_main(
        [
            "--config",
            QUICKSTART,
            "--model.init_args.gradient_checkpointing",
            "auto",
            "--model.init_args.memory_budget_gib",
            "100",
        ]
    )
    out = capsys.readouterr().out
    plan = out.split("gradient_checkpointing False")[0]
    for name, _ in TrainingPlan(CheckpointMode.KEEP_ACTIVATIONS).items():
        assert f"\n  {name} " in plan, name
    assert "false = KEEP_ACTIVATIONS" in plan and "4 x 256 tokens" in plan and "100.00 GiB" in plan
    assert "auto: the fastest that fits" in plan
    assert (
        out.index("training plan")
        < out.index("gradient_checkpointing False (what auto picks")
        < out.index("predicted peak")
    )


def test_estimate_reads_the_classes_fit_would_build():
    # The estimate parses the config as `fit` does: a data class fit would refuse is refused, in one
    # line.
    with pytest.raises(
        SystemExit, match=r"^error: data: .*NoShapeDataModule does not correspond to a subclass"
    ):
        estimate_main(
            ["--config", QUICKSTART, "--data.class_path", "tests.test_plan.NoShapeDataModule"]
        )
