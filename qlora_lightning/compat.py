"""Every place the package reads, overrides or patches another library's private code, in one list,
with the releases it was written for.

Such code is written against one version. ``RANGES`` are the releases each library was checked
with, and they are ``setup.cfg``'s bounds too (``tests/test_compat.py`` keeps the two equal).
After an upgrade, a renamed or removed internal fails in ``tests/test_compat.py``, in a test that
names the code depending on it. Without that test it would fail deep inside training, or, for
internals read with a ``getattr`` default, not at all.

No patch applies at import. Patches of module-level functions apply inside a context manager, for
the length of one forward. Patches of objects apply to the package's own instances, as it builds
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The releases the private code below was written and checked for: setup.cfg's install_requires.
RANGES = {
    "transformers": ">=5.17,<5.26",
    "torch": ">=2.6,<2.14",
    "peft": ">=0.21,<0.22",
    "trl": ">=1.15,<1.17",
    "bitsandbytes": ">=0.50,<0.51",
    "lightning": ">=2.6,<2.7",
    "datasets": ">=4,<5.3",
}


@dataclass(frozen=True)
class Private:
    """One private symbol of ``library``: ``owner`` (an object path) and its attribute ``name``
    (None: ``owner`` itself), what the package does with it and where, and how a patch is scoped."""

    library: str
    owner: str
    name: Optional[str]
    use: str
    scope: str = ""
    # An attribute that instances get in __init__, checked on an instance by this test of
    # tests/test_compat.py rather than on the class.
    checked_by: str = ""


PRIVATE = [
    Private(
        "transformers",
        "transformers.masking_utils",
        "_ignore_causal_mask_sdpa",
        "speed/masks.py replaces it (and the public find_packed_sequence_indices beside it)",
        "inside masks.known_to_the_host, entered by the module around its own forward; restored "
        "after",
    ),
    Private(
        "transformers",
        "transformers.modeling_layers.GradientCheckpointingLayer",
        "__call__",
        "speed/checkpointing.py sets each decoder layer's _gradient_checkpointing_func, which it "
        "calls",
        "on the layers of the model the package builds",
    ),
    Private(
        "transformers",
        "transformers.configuration_utils.PreTrainedConfig",
        "_attn_implementation",
        "modules/sft.py reads it",
    ),
    Private(
        "transformers",
        "transformers.modeling_utils.PreTrainedModel",
        "_no_split_modules",
        "model/build.py and model/distributed.py read it",
    ),
    Private("torch", "torch", "_foreach_mul_", "modules/sft.py calls it"),
    Private(
        "torch",
        "torch.distributed.fsdp._common_utils",
        "FSDP_WRAPPED_MODULE",
        "model/distributed.py imports it",
    ),
    Private(
        "torch",
        "torch.distributed.fsdp._common_utils",
        "clean_tensor_name",
        "model/distributed.py imports it",
    ),
    Private(
        "torch",
        "torch.optim.AdamW",
        "_step_supports_amp_scaling",
        "modules/stepping.py guard_nonfinite reads it (a fused optimizer skips a step on the "
        "device)",
        checked_by="test_fused_adam_says_it_skips_steps_on_the_device",
    ),
    Private(
        "peft",
        "peft.tuners.lora.bnb",
        "Linear4bit",
        "speed/lora_forward.py subclasses it and swaps the class of the model's 4-bit LoRA layers",
        "on the layers of the model the package builds",
    ),
    Private("trl", "trl.trainer.utils", "use_adapter", "modules/dpo.py imports it"),
    Private(
        "bitsandbytes", "bitsandbytes.optim.AdamW8bit", "init_state", "speed/optim.py calls it"
    ),
    Private(
        "bitsandbytes", "bitsandbytes.optim.AdamW8bit", "update_step", "speed/optim.py calls it"
    ),
    Private(
        "bitsandbytes", "bitsandbytes.optim.AdamW8bit", "check_overrides", "speed/optim.py calls it"
    ),
    Private(
        "bitsandbytes",
        "bitsandbytes.functional.QuantState",
        "__init__",
        "speed/nf4.py reads its fields (absmax, shape, code, blocksize, quant_type, offset, "
        "state2)",
        checked_by="test_quant_state_fields_nf4_py_reads",
    ),
    Private(
        "lightning",
        "lightning.pytorch.cli.LightningCLI",
        "_instantiate_trainer",
        "run/cli.py overrides it",
    ),
    Private(
        "lightning",
        "lightning.pytorch.cli.LightningCLI",
        "_parse_ckpt_path",
        "run/cli.py overrides it",
    ),
    Private(
        "lightning",
        "lightning.pytorch.callbacks.RichProgressBar",
        "_get_train_description",
        "run/progress.py overrides it and swaps the class of the run's progress bar",
        "on the bar of the run's own Trainer",
    ),
    Private(
        "lightning",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "_version",
        "evaluate/tracking.py continue_run sets it (and _kwargs' purge_step) to log a resume to "
        "its run folder",
        "on the run's own logger",
        checked_by="test_lightning_state_that_resume_and_cli_rely_on",
    ),
    Private(
        "lightning",
        "lightning.pytorch.loggers.WandbLogger",
        "_id",
        "evaluate/tracking.py continue_run sets it and _wandb_init['id'] (before the run starts: "
        "_experiment is None) to resume a W&B run",
        "on the run's own logger",
        checked_by="test_logger_state_tracking_py_sets",
    ),
    Private(
        "lightning",
        "lightning.pytorch.loggers.MLFlowLogger",
        "_run_id",
        "evaluate/tracking.py continue_run sets it (before the run starts: _initialized is False) "
        "to resume an MLflow run; run_root reads _mlflow_client and _experiment_name to find the "
        "experiment without starting a run",
        "on the run's own logger",
        checked_by="test_logger_state_tracking_py_sets",
    ),
    Private(
        "lightning",
        "lightning.pytorch.strategies.FSDPStrategy",
        "_state_dict_type",
        "modules/checkpoint_state.py reads it",
        checked_by="test_lightning_state_that_resume_and_cli_rely_on",
    ),
    Private(
        "lightning",
        "lightning.pytorch.loops.fit_loop._FitLoop",
        "state_dict",
        "modules/resume.py rewrites its epoch_progress and the batch loop's state for an exact "
        "resume",
        checked_by="test_lightning_state_that_resume_and_cli_rely_on",
    ),
    Private(
        "transformers",
        "transformers.integrations.gguf.gguf_tokenizer_mapping",
        "GGUF_PRE_TOKENIZER_SPLITS",
        "evaluate/export.py reads it (the pre-tokenizer names GGUF files use)",
    ),
    Private(
        "datasets",
        "datasets.Dataset",
        "_fingerprint",
        "data/preference.py hashes it to cache reference log-probs",
        checked_by="test_dataset_fingerprint_preference_py_reads",
    ),
]
