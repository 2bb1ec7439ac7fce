"""Every private symbol of another library that the package reads, overrides or patches still exists.

Such code is written against one version (``setup.cfg`` bounds each library to the releases it
was checked with); after an upgrade, a renamed or removed internal fails here, in one test that
names the code depending on it, instead of deep inside training or, for the ones read with a
``getattr`` default, not at all.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

# (object path, attribute or None for the object itself, the code that depends on it)
SYMBOLS = [
    ("transformers.masking_utils", "_ignore_causal_mask_sdpa", "qlora_lightning/speed/masks.py patches it"),
    ("transformers.configuration_utils.PreTrainedConfig", "_attn_implementation",
     "qlora_lightning/modules/sft.py reads it"),
    ("transformers.modeling_utils.PreTrainedModel", "_no_split_modules",
     "qlora_lightning/model/build.py and distributed.py read it"),
    ("torch", "_foreach_mul_", "qlora_lightning/modules/sft.py calls it"),
    ("torch.distributed.fsdp._common_utils", "FSDP_WRAPPED_MODULE", "qlora_lightning/model/distributed.py imports it"),
    ("torch.distributed.fsdp._common_utils", "clean_tensor_name", "qlora_lightning/model/distributed.py imports it"),
    ("peft.tuners.lora.bnb", "Linear4bit", "qlora_lightning/speed/lora_forward.py subclasses it"),
    ("trl.trainer.utils", "use_adapter", "qlora_lightning/modules/dpo.py imports it"),
    ("bitsandbytes.optim.AdamW8bit", "init_state", "qlora_lightning/speed/optim.py calls it"),
    ("bitsandbytes.optim.AdamW8bit", "update_step", "qlora_lightning/speed/optim.py calls it"),
    ("bitsandbytes.optim.AdamW8bit", "check_overrides", "qlora_lightning/speed/optim.py calls it"),
    ("bitsandbytes.functional.QuantState", "__init__", "qlora_lightning/speed/nf4.py reads its fields (below)"),
    ("lightning.pytorch.cli.LightningCLI", "_instantiate_trainer", "qlora_lightning/run/cli.py overrides it"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path", "qlora_lightning/run/cli.py overrides it"),
    ("lightning.pytorch.callbacks.RichProgressBar", "_get_train_description",
     "qlora_lightning/run/progress.py overrides it"),
]


def _resolve(path: str):
    """``a.b.C`` -> the module ``a.b``'s ``C`` (or the module ``a.b.C`` itself)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path, name, user", SYMBOLS, ids=[f"{p}.{n}" for p, n, _ in SYMBOLS])
def test_private_symbol_exists(path, name, user):
    owner = _resolve(path)
    assert hasattr(owner, name), f"{path}.{name} is gone: {user}"


def test_gradient_checkpointing_layer_calls_the_function_checkpointing_py_replaces():
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert "self._gradient_checkpointing_func(" in inspect.getsource(GradientCheckpointingLayer), (
        "transformers' GradientCheckpointingLayer no longer calls _gradient_checkpointing_func, which "
        "qlora_lightning/speed/checkpointing.py sets to offload layer inputs")


def test_quant_state_fields_nf4_py_reads():
    from bitsandbytes.functional import QuantState

    fields = inspect.signature(QuantState.__init__).parameters
    for field in ("absmax", "shape", "code", "blocksize", "quant_type", "offset", "state2"):
        assert field in fields, f"bitsandbytes QuantState has no {field}: qlora_lightning/speed/nf4.py reads it"


def test_lightning_state_that_resume_and_cli_rely_on(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.strategies import FSDPStrategy

    from qlora_lightning.modules.resume import StepCheckpoint

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    state = trainer.fit_loop.state_dict()
    for key in ("epoch_progress", "epoch_loop.batch_progress", "epoch_loop.state_dict"):
        assert key in state, f"Lightning's fit loop state has no {key}: resume.as_saved_after_last_batch rewrites it"
    assert "_batches_that_stepped" in trainer.fit_loop.epoch_loop.on_save_checkpoint(), (
        "resume.as_saved_after_last_batch rewrites _batches_that_stepped")
    assert hasattr(StepCheckpoint(), "_last_global_step_saved"), "resume.StepCheckpoint sets it"
    for logger in (TensorBoardLogger(tmp_path), CSVLogger(tmp_path)):
        assert hasattr(logger, "_version"), f"{type(logger).__name__}._version: cli.continue_run_folder sets it"
    assert isinstance(TensorBoardLogger(tmp_path)._kwargs, dict), "cli.continue_run_folder sets purge_step in it"
    fsdp = FSDPStrategy()
    for name in ("_state_dict_type", "_activation_checkpointing_kwargs"):
        assert hasattr(fsdp, name), f"FSDPStrategy.{name}: modules/checkpoint_state.py and distributed.py read it"


def test_dataset_fingerprint_preference_py_reads():
    import datasets

    assert isinstance(datasets.Dataset.from_dict({"a": [1]})._fingerprint, str), (
        "datasets.Dataset._fingerprint: qlora_lightning/data/preference.py hashes it to cache reference log-probs")


def test_fused_adam_says_it_skips_steps_on_the_device():
    import torch

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    assert optimizer._step_supports_amp_scaling, (
        "torch's fused AdamW no longer sets _step_supports_amp_scaling: modules/stepping.py guard_nonfinite reads it "
        "(with a default of False, so it would silently wait for the GPU at every step)")
