"""Packed and padding-free batches: no example sees another, and the loss does not depend on the
layout."""

from __future__ import annotations

import functools

import datasets
import pytest
import torch
from lightning.pytorch import seed_everything

from qlora_lightning import GSM8KDataModule, LoraSpec, PerfMonitor, build_model
from qlora_lightning.data.base import pad_batch
from qlora_lightning.data.packing import (
    check_packing_backend,
    collate_packs,
    model_inputs,
    pack_examples,
)
from qlora_lightning.data.sampling import EpochSeededSampler, LengthGroupedSampler
from qlora_lightning.errors import UserError
from qlora_lightning.losses import lm_loss_sum
from tests.conftest import EXAMPLES, TINY_LLAMA, cpu_trainer, sft_module, tiny_spec, tokenizer_at

MAX_LEN = 256  # the shipped GSM8K examples are 70-180 tokens with the tiny tokenizer: 2-3 per pack


def gsm8k(packing: str = "off", batch_size: int = 2, **kwargs) -> GSM8KDataModule:
    """The 20 shipped GSM8K examples (16 train, 4 val), tokenized with the tiny Llama's
    tokenizer."""
    dm = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        max_seq_length=MAX_LEN,
        batch_size=batch_size,
        val_fraction=0.2,
        packing=packing,
        **kwargs,
    )
    dm.setup()
    return dm


# ---- packing and collation (no model) ------------------------------------------------------


def test_best_fit_decreasing_keeps_every_example_whole_and_fits_capacity():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 9, 2]
    rows = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    packs = pack_examples(ds, 10)
    assert all(sum(p["seq_lengths"]) == len(p["input_ids"]) <= 10 for p in packs)
    # Each example appears once, contiguous and unchanged.
    found = []
    for p in packs:
        start = 0
        for n in p["seq_lengths"]:
            found.append(p["input_ids"][start : start + n])
            start += n
    assert sorted(found) == sorted(rows)
    assert len(packs) == 5  # 47 tokens: 5 packs of 10 is the best possible, and BFD finds it here


@pytest.mark.parametrize("padding_free", [False, True])
def test_collated_packs_restart_positions_and_mask_labels_at_boundaries(padding_free):
    packs = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7, 8], "labels": [6, 7, 8], "seq_lengths": [3]},
    ]
    batch = collate_packs(packs, pad_id=0, padding_free=padding_free)
    assert "attention_mask" not in batch  # a mask would switch transformers off the packed path
    if padding_free:
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
        assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8]]
        assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and batch["max_length_q"] == 3
    else:
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, -100, -100]]
        assert batch["input_ids"][1, 3:].tolist() == [0, 0]
    assert (batch["num_real_tokens"], batch["num_examples"]) == (8, 3)
    assert set(model_inputs(batch)) <= {
        "input_ids",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }


def test_datamodule_packs_the_same_examples_as_it_pads():
    off, padded, free = gsm8k("off"), gsm8k("padded"), gsm8k("padding_free")
    examples = sorted(map(tuple, off.splits["train"]["input_ids"]))
    assert len(padded.splits["train"]) < len(examples)  # several examples per pack
    for dm in (padded, free):
        unpacked = []
        for p in dm.splits["train"]:
            starts = [0, *torch.tensor(p["seq_lengths"]).cumsum(0).tolist()]
            unpacked += [tuple(p["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
        assert sorted(unpacked) == examples
        assert max(len(p["input_ids"]) for p in dm.splits["train"]) <= MAX_LEN
    batch = next(iter(free.train_dataloader()))
    assert (
        batch["input_ids"].shape[0] == 1 and batch["num_real_tokens"] == batch["input_ids"].numel()
    )


def test_length_grouping_cuts_padding_and_still_visits_every_example():
    lengths = torch.randint(20, 500, (800,), generator=torch.Generator().manual_seed(0)).tolist()

    def padded_tokens(order):
        return sum(8 * max(lengths[i] for i in order[k : k + 8]) for k in range(0, len(order), 8))

    grouped = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    order = list(grouped)
    assert sorted(order) == list(range(len(lengths)))
    assert padded_tokens(order) < 0.7 * padded_tokens(list(EpochSeededSampler(lengths, seed=1)))
    grouped.set_epoch(1)
    assert list(grouped) != order  # a new order every epoch, a fixed one per (seed, epoch)
    grouped.set_epoch(0)
    assert list(grouped) == order
    assert isinstance(
        gsm8k("off", group_by_length=True).train_dataloader().sampler, LengthGroupedSampler
    )


def test_incompatible_options_are_refused():
    with pytest.raises(UserError, match="group_by_length"):
        GSM8KDataModule(packing="padded", group_by_length=True)
    with pytest.raises(UserError, match="padding_free"):
        check_packing_backend("padded", "flash_attention_2")
    check_packing_backend("padding_free", "flash_attention_2")
    check_packing_backend("padded", "sdpa")


# ---- exactness: a packed batch is the examples run one by one -----------------------------


@functools.lru_cache(maxsize=None)
def _lora_model(attn: str = "sdpa"):
    """The tiny NF4 Llama with an adapter whose B matrices are non-zero (so A gets gradients
    too)."""
    torch.manual_seed(0)
    spec = tiny_spec()
    spec.attn_implementation = attn
    model = build_model(spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _nll_and_grads(model, batches) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Summed NLL, labelled tokens and summed LoRA gradients over ``batches`` (fp32)."""
    model.zero_grad()
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(**model_inputs(batch), use_cache=False).logits
        nll, n = lm_loss_sum(logits, batch["labels"])
        nll.backward()
        total, tokens = total + nll.item(), tokens + int(n)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return total, tokens, grads


def _examples(labelled: str) -> datasets.Dataset:
    """The training examples with loss on the response only, or on every token
    (pretraining-style)."""
    ds = gsm8k("off").splits["train"]
    return ds if labelled == "response" else ds.map(lambda r: {"labels": r["input_ids"]})


@pytest.mark.parametrize("labelled", ["response", "all"])
def test_packed_loss_and_lora_gradients_equal_the_examples_run_one_by_one(labelled):
    model = _lora_model()
    examples = _examples(labelled)
    ref_nll, ref_tokens, ref_grads = _nll_and_grads(
        model, [pad_batch([r], pad_id=0) for r in examples]
    )
    packs = list(pack_examples(examples, MAX_LEN))
    assert len(packs) < len(examples)
    for padding_free in (False, True):
        batches = [
            collate_packs(packs[i : i + 2], pad_id=0, padding_free=padding_free)
            for i in range(0, len(packs), 2)
        ]
        nll, tokens, grads = _nll_and_grads(model, batches)

        # "all": each example's first token would be a target, predicted from the previous example.
        assert tokens == ref_tokens
        assert abs(nll / tokens - ref_nll / ref_tokens) < 1e-4, padding_free
        assert grads.keys() == ref_grads.keys() and any("lora_A" in k for k in grads)
        for k in grads:
            scale = ref_grads[k].abs().max().clamp(min=1e-6)
            assert (grads[k] - ref_grads[k]).abs().max() / scale < 1e-4, (padding_free, k)


def test_the_exactness_check_catches_attention_across_examples():
    """The same packed rows with one running position (no restarts) let examples see each other."""
    model = _lora_model()
    dm = gsm8k("padding_free", batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    leaky = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        leaky.pop(key)
    exact, n, _ = _nll_and_grads(model, [batch])
    leaked, _, _ = _nll_and_grads(model, [leaky])
    assert abs(leaked - exact) / n > 1e-3


# ---- through the Trainer: the layout of a step does not change the step -------------------


def _fit_one_step(tmp_path, dm, accumulate: int):
    """One SGD step over the whole training split; the step's loss, the adapter after it, and the
    perf record."""
    seed_everything(0)  # the same LoRA init in every run
    module = sft_module(optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    monitor = PerfMonitor(warmup_steps=0)
    trainer = cpu_trainer(
        tmp_path,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=dm)
    # Lightning steps at the epoch's last batch, however many were accumulated.
    assert trainer.global_step == 1
    lora = {k: p.detach().clone() for k, p in module.model.named_parameters() if p.requires_grad}
    return float(trainer.callback_metrics["train/loss"]), lora, monitor.steps[0]


def test_loss_and_update_do_not_depend_on_micro_batches_or_packs(tmp_path):
    layouts = {
        "off x1": (gsm8k("off", batch_size=1), 64),
        "off x4": (gsm8k("off", batch_size=4), 64),
        "padded x2": (gsm8k("padded", batch_size=2), 64),
        "padding_free, one micro-batch": (gsm8k("padding_free", batch_size=64), 1),
    }
    results = {
        name: _fit_one_step(tmp_path / name.replace(" ", "_"), dm, acc)
        for name, (dm, acc) in layouts.items()
    }

    ref_loss, ref_lora, ref_perf = results["off x1"]
    n_examples = len(layouts["off x1"][0].splits["train"])
    for name, (loss, lora, perf) in results.items():
        assert abs(loss - ref_loss) < 1e-4, name
        for k in lora:
            assert torch.allclose(lora[k], ref_lora[k], atol=1e-5, rtol=1e-4), (name, k)
        assert perf["perf/samples_per_sec"] * perf["perf/step_time_s"] == pytest.approx(n_examples)
        real = perf["perf/tokens_per_sec"] * perf["perf/step_time_s"]
        assert real == pytest.approx(ref_perf["perf/tokens_per_sec"] * ref_perf["perf/step_time_s"])
    # The real-token fraction sees through the layouts: padding-free has no padding at all.
    assert results["off x1"][2]["perf/real_token_fraction"] == 1.0
    assert results["off x4"][2]["perf/real_token_fraction"] < 1.0
    assert results["padding_free, one micro-batch"][2]["perf/real_token_fraction"] == 1.0
    assert (
        results["padded x2"][2]["perf/real_token_fraction"]
        > results["off x4"][2]["perf/real_token_fraction"]
    )


# ---- GPU: the same exactness with the GPU kernels --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_padding_free_is_exact_with_gpu_attention(attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    spec = tiny_spec()
    spec.attn_implementation, spec.compute_dtype = (
        attn,
        "bfloat16" if "flash" in attn else "float32",
    )
    torch.manual_seed(0)
    model = build_model(
        spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False, device="cuda"
    )
    to_cuda = lambda b: {  # noqa: E731
        k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()
    }
    off, free = gsm8k("off"), gsm8k("padding_free", batch_size=8)
    ref_nll, ref_tokens, _ = _nll_and_grads(
        model, [to_cuda(off.collate([r])) for r in off.splits["train"]]
    )
    nll, tokens, _ = _nll_and_grads(model, [to_cuda(b) for b in free.train_dataloader()])
    assert tokens == ref_tokens
    # Bf16 flash attention rounds differently per layout.
    tolerance = 2e-2 if "flash" in attn else 1e-4
    assert abs(nll / tokens - ref_nll / ref_tokens) < tolerance
