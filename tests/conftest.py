"""Shared fixtures: a tiny random 4-bit Llama, the shipped tokenizer, paths to ``../shared``.

Tests never reach a model hub: the hub libraries are put offline before they are imported,
so anything that would download fails loudly instead of silently reaching the network.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before any Hugging Face import: huggingface_hub and datasets read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tokenized-split caches of the files tests write go to a throwaway directory, not ~/.cache.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="qlora_tests_datasets_")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers would warn

import functools  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The real data beside the checkout (CI has the same copy); a user's clone has none.
SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_LLAMA = str(REPO / "qlora_lightning" / "assets" / "tiny-llama")
EXAMPLES = REPO / "qlora_lightning" / "assets" / "examples"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the real data in {SHARED}")


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the calling test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def pytest_collection_modifyitems(config, items) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def qlora_cache(tmp_path_factory) -> Path:
    """Random-weight checkpoints (``random_init``) go to a fresh directory per test session."""
    path = tmp_path_factory.mktemp("qlora_cache")
    old = os.environ.get("QLORA_CACHE")
    os.environ["QLORA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("QLORA_CACHE", None)
    else:
        os.environ["QLORA_CACHE"] = old


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(name_or_path: str):
    from qlora_lightning.model.build import load_tokenizer

    return load_tokenizer(name_or_path)


def tokenizer_at(name_or_path: str):
    """A tokenizer loaded once per session (loading a sentencepiece model takes a second or two)."""
    return _cached_tokenizer(name_or_path)


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped 512-token BPE tokenizer of ``assets/tiny-llama``."""
    return tokenizer_at(TINY_LLAMA)


def tiny_spec(quantization: str = "nf4", **config_overrides):
    """The shipped tiny Llama (hidden 64, MLP 128, 2 layers, k/v 32 wide) with random weights, fp32
    compute.

    ``config_overrides`` change the architecture (each distinct config is saved once per session).
    At the shipped ``initializer_range`` of 0.02 the frozen random ``lm_head`` bounds every logit
    to about +-1.3, so no adapter can push the loss far below ln(512); pass a larger
    ``initializer_range`` where a test needs the loss to fall.
    """
    from qlora_lightning.model.build import BaseModelSpec

    return BaseModelSpec(
        name_or_path=TINY_LLAMA,
        quantization=quantization,
        compute_dtype="float32",
        random_init=True,
        config_overrides=config_overrides,
    )


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module: tiny models gain nothing from two, and on a busy
    machine OpenMP's spinning threads make them up to ten times slower. Module-scoped, so that
    module-scoped fixtures that train or generate can ask for it too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sft_module(
    base=None,
    r: int = 8,
    alpha: Optional[int] = None,
    lr: float = 1e-2,
    optimizer=None,
    target_modules="all-linear",
    gradient_checkpointing: bool = False,
    **kwargs,
):
    """An SFTModule over ``base`` (the tiny Llama by default) with dropout off, so runs are
    deterministic."""
    from qlora_lightning.model.build import LoraSpec
    from qlora_lightning.modules import SFTModule

    return SFTModule(
        base=base or tiny_spec(),
        lora=LoraSpec(r=r, alpha=alpha or 2 * r, dropout=0.0, target_modules=target_modules),
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=lr),
        warmup_ratio=0.0,
        **kwargs,
    )


def cpu_trainer(root: Path, **kwargs):
    """A quiet fp32 CPU Trainer: no logger, no checkpoints, no progress bar unless asked."""
    from lightning.pytorch import Trainer

    defaults = dict(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kwargs})
