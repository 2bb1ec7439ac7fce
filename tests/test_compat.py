"""Every private symbol of another library that the package reads, overrides or patches
(``qlora_lightning/compat.py``) still exists, and the installed releases are those it was written
for.

After an upgrade, a renamed or removed internal fails here, in one test that names the code
depending on it, instead of deep inside training or, for the ones read with a ``getattr`` default,
not at all.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import inspect
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from qlora_lightning.compat import PRIVATE, RANGES
from tests.conftest import REPO

ON_CLASSES = [p for p in PRIVATE if not p.checked_by]


def _resolve(path: str):
    """``a.b.C`` -> the module ``a.b``'s ``C`` (or the module ``a.b.C`` itself)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("private", ON_CLASSES, ids=[f"{p.owner}.{p.name}" for p in ON_CLASSES])
def test_private_symbol_exists(private):
    owner = _resolve(private.owner)
    assert private.name is None or hasattr(owner, private.name), (
        f"{private.owner}.{private.name} is gone: {private.use}"
    )


def test_symbols_on_instances_have_their_test():
    for private in PRIVATE:
        assert private.library in RANGES, f"{private.library}: no version range in compat.RANGES"
        if private.checked_by:
            assert callable(getattr(sys.modules[__name__], private.checked_by, None)), private


@pytest.mark.parametrize("library", sorted(RANGES))
def test_the_installed_release_is_one_the_private_code_was_written_for(library):
    installed = importlib.metadata.version(library)
    users = "; ".join(p.use for p in PRIVATE if p.library == library)
    assert SpecifierSet(RANGES[library]).contains(installed, prereleases=True), (
        f"{library} {installed} is outside {RANGES[library]}, the releases this code was checked "
        f"with: {users}. Run this file against it, then widen the range in compat.py and setup.cfg"
    )


def test_setup_cfg_bounds_are_the_checked_ranges():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    requirements = [
        Requirement(line)
        for line in config["options"]["install_requires"].split("\n")
        if line.strip()
    ]
    bounds = {r.name: str(r.specifier) for r in requirements}
    for library, versions in RANGES.items():
        assert SpecifierSet(bounds.get(library, "")) == SpecifierSet(versions), (
            library,
            bounds.get(library),
            versions,
        )


def test_gradient_checkpointing_layer_calls_the_function_checkpointing_py_replaces():
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert "self._gradient_checkpointing_func(" in inspect.getsource(GradientCheckpointingLayer), (
        "transformers' GradientCheckpointingLayer no longer calls _gradient_checkpointing_func, "
        "which qlora_lightning/speed/checkpointing.py sets to offload layer inputs"
    )


def test_quant_state_fields_nf4_py_reads():
    from bitsandbytes.functional import QuantState

    fields = inspect.signature(QuantState.__init__).parameters
    for field in ("absmax", "shape", "code", "blocksize", "quant_type", "offset", "state2"):
        assert field in fields, (
            f"bitsandbytes QuantState has no {field}: qlora_lightning/speed/nf4.py reads it"
        )


def test_lightning_state_that_resume_and_cli_rely_on(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.strategies import FSDPStrategy

    from qlora_lightning.modules.resume import StepCheckpoint

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    state = trainer.fit_loop.state_dict()
    for key in ("epoch_progress", "epoch_loop.batch_progress", "epoch_loop.state_dict"):
        assert key in state, (
            f"Lightning's fit loop state has no {key}: resume.as_saved_after_last_batch rewrites it"
        )
    assert "_batches_that_stepped" in trainer.fit_loop.epoch_loop.on_save_checkpoint(), (
        "resume.as_saved_after_last_batch rewrites _batches_that_stepped"
    )
    assert hasattr(StepCheckpoint(), "_last_global_step_saved"), "resume.StepCheckpoint sets it"
    for logger in (TensorBoardLogger(tmp_path), CSVLogger(tmp_path)):
        assert hasattr(logger, "_version"), (
            f"{type(logger).__name__}._version: tracking.continue_run sets it"
        )
    assert isinstance(TensorBoardLogger(tmp_path)._kwargs, dict), (
        "tracking.continue_run sets purge_step in it"
    )
    fsdp = FSDPStrategy()
    for name in ("_state_dict_type", "_activation_checkpointing_kwargs"):
        assert hasattr(fsdp, name), (
            f"FSDPStrategy.{name}: modules/checkpoint_state.py and distributed.py read it"
        )


def test_dataset_fingerprint_preference_py_reads():
    import datasets

    assert isinstance(datasets.Dataset.from_dict({"a": [1]})._fingerprint, str), (
        "datasets.Dataset._fingerprint: qlora_lightning/data/preference.py hashes it to cache "
        "reference log-probs"
    )


def test_fused_adam_says_it_skips_steps_on_the_device():
    import torch

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    assert optimizer._step_supports_amp_scaling, (
        "torch's fused AdamW no longer sets _step_supports_amp_scaling: modules/stepping.py "
        "guard_nonfinite reads it (with a default of False, so it would silently wait for the GPU "
        "at every step)"
    )


def test_logger_state_tracking_py_sets(tmp_path, monkeypatch):
    """W&B's and MLflow's loggers (the loggers extra), built without starting a run."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert wandb._experiment is None and wandb._id is None and wandb._wandb_init["id"] is None, (
        "tracking.continue_run sets WandbLogger._id and _wandb_init['id'] while _experiment is None"
    )
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = MLFlowLogger(save_dir=str(tmp_path / "mlruns"))
    assert mlflow._initialized is False and mlflow._run_id is None, (
        "tracking.continue_run sets _run_id"
    )
    assert mlflow._mlflow_client.get_experiment_by_name(mlflow._experiment_name) is None, (
        "tracking.run_root reads them"
    )
