"""SFTModule under a real Lightning Trainer with real bitsandbytes 4-bit layers: the loss falls,
gradient accumulation is exact, and a real pretrained model improves. On the CPU always; the
``cuda`` variants run where a GPU is (``pytest -m gpu``)."""

from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from qlora_lightning import GSM8KDataModule
from qlora_lightning.model.build import BaseModelSpec
from qlora_lightning.modules import paged_adamw_8bit
from tests.conftest import (
    EXAMPLES,
    TINY_LLAMA,
    cpu_trainer,
    needs_shared,
    sft_module,
    shared_path,
    tiny_spec,
    tokenizer_at,
)


def _fit_logging_losses(module, data, root, **trainer_kwargs) -> list[float]:
    """Fit under a CSV logger and return ``train/loss`` of every optimizer step, as the module
    logged it."""
    logger = CSVLogger(root, name="csv")
    cpu_trainer(
        root, logger=logger, log_every_n_steps=1, limit_val_batches=0, **trainer_kwargs
    ).fit(module, datamodule=data)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu"}


def _gsm8k_examples(num_samples: int, batch_size: int) -> GSM8KDataModule:
    return GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=num_samples,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_thirty_steps_on_a_fixed_batch_halve_the_loss(device, tmp_path):
    seed_everything(0)
    # The shipped initializer_range (0.02) caps the frozen random head's logits near +-1.3, which
    # no adapter can overcome; at 0.3 the logits can become confident, so the loss can fall.
    base = tiny_spec(initializer_range=0.3)
    if device == "cuda":  # the QLoRA recipe: bf16 compute under bf16-mixed, paged 8-bit AdamW
        base = dataclasses.replace(base, compute_dtype="bfloat16")
        module = sft_module(base=base, r=16, optimizer=functools.partial(paged_adamw_8bit, lr=3e-2))
        precision = "bf16-mixed"
    else:
        module, precision = sft_module(base=base, r=16, lr=3e-2), "32-true"
    # Four examples in one batch of four: every step sees the same batch.
    losses = _fit_logging_losses(
        module,
        _gsm8k_examples(num_samples=4, batch_size=4),
        tmp_path,
        max_steps=30,
        accelerator=ACCELERATOR[device],
        precision=precision,
    )
    assert len(losses) == 30
    assert losses[-1] < losses[0] / 2, losses


def _module_with_nonzero_lora_b(**kwargs):
    """A tiny SFTModule, built now (the Trainer will not rebuild it), with seeded non-zero
    ``lora_B``.

    PEFT starts B at zero, which would leave A without a gradient on the first step.
    """
    seed_everything(0)
    module = sft_module(r=4, **kwargs)
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    for name, p in module.model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.05, generator=generator)
    return module


def _adapter(module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().clone() for n, p in module.model.named_parameters() if p.requires_grad
    }


def _one_sgd_step(
    tmp_path, batch_size: int, accumulate: int, device: str
) -> tuple[dict[str, torch.Tensor], float]:
    """The adapter after one SGD(lr=1) step over the same four examples, and the logged loss."""
    module = _module_with_nonzero_lora_b(optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    data = _gsm8k_examples(num_samples=4, batch_size=batch_size)
    losses = _fit_logging_losses(
        module,
        data,
        tmp_path,
        max_steps=1,
        accumulate_grad_batches=accumulate,
        accelerator=ACCELERATOR[device],
    )
    lengths = sorted(len(ids) for ids in data.splits["train"]["input_ids"])
    # Different lengths: padding and token weighting both matter.
    assert len(set(lengths)) == 4, lengths
    return _adapter(module), losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_gives_the_same_step_as_one_big_batch(device, tmp_path):
    before = _adapter(_module_with_nonzero_lora_b())
    accumulated, loss_accumulated = _one_sgd_step(
        tmp_path / "acc", batch_size=1, accumulate=4, device=device
    )
    batched, loss_batched = _one_sgd_step(
        tmp_path / "batch", batch_size=4, accumulate=1, device=device
    )

    assert loss_accumulated == pytest.approx(loss_batched, abs=1e-5)
    assert accumulated.keys() == batched.keys() == before.keys()
    for name in batched:
        torch.testing.assert_close(accumulated[name], batched[name], rtol=0, atol=1e-5, msg=name)
    # The step moved every factor, A and B alike (the comparison is not between two no-ops).
    moved = {name: (batched[name] - before[name]).abs().max().item() for name in batched}
    assert min(moved.values()) > 1e-4, moved


@needs_shared
def test_real_pretrained_llama_lowers_its_validation_loss(tmp_path):
    """stories260K (a real 260K-parameter Llama trained on TinyStories) learns GSM8K's format.

    Its MLP is 172 wide, not a multiple of 64: bitsandbytes' CPU inference kernel (which repacks
    4-bit weights in blocks of 32 output rows) would reject it, but ``load_base_model`` keeps the
    plain dequantize + matmul path, which takes any width, so the base really is NF4 here.
    """
    stories = str(shared_path("models", "stories260K"))
    seed_everything(0)
    module = sft_module(
        base=BaseModelSpec(name_or_path=stories, quantization="nf4", compute_dtype="float32"),
        r=8,
        lr=1e-2,
    )
    data = GSM8KDataModule(
        path=str(shared_path("datasets", "gsm8k", "train.jsonl")),
        tokenizer=tokenizer_at(stories),
        num_samples=32,
        num_val_samples=16,
        val_fraction=0.1,
        batch_size=8,
        max_seq_length=128,
    )
    before = cpu_trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    # Validating inside fit after a validate call: its metric states must not be the inference
    # tensors the validate call left.
    fitting = cpu_trainer(tmp_path, max_steps=8)
    fitting.fit(module, datamodule=data)
    after = cpu_trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < before - 0.5, (before, after)
    # fit's last validation saw the same adapter and rows: only the order of float sums differs.
    during = fitting.callback_metrics["val/loss"].item()
    assert abs(during - after) <= 1e-5 * after, (
        f"fit's validation loss {during} != validate's {after}"
    )
