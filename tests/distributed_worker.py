"""One rank of ``tests/test_distributed.py``: fit a tiny 4-bit model under DDP or FSDP on the CPU.

Started by ``torchrun --nproc-per-node 2`` (gloo), as a multi-node job would start it: Lightning
reads the ranks from torchrun's environment. FSDP is set up as ``configs/mistral_fsdp.yaml`` sets
it. Each ``--runs`` entry,
``<ddp|fsdp>_<sft|dpo>[_bf16][_compiled][_chunked][_replicated][_resume|_resumelate]``, fits 4 steps
into ``<out>/<run>/``;
``fit`` saves the adapter (``adapter/``) and the last checkpoint (``last.ckpt``), every rank writes
``rank<r>.pt`` (the adapter as this rank holds it, unsharded under FSDP; the real tokens of each of
its optimizer steps; the logits of a fixed batch; the wrappers around the model) and rank 0 writes
PerfMonitor's steps (``perf.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from typing_extensions import override

import tests.conftest  # noqa: F401  (first: puts the hub libraries offline)
from qlora_lightning import GSM8KDataModule, PerfMonitor, PreferenceDataModule
from qlora_lightning.data.packing import real_tokens_and_examples
from qlora_lightning.model.build import LoraSpec
from qlora_lightning.model.distributed import clean_name, strategy_from_config
from qlora_lightning.modules import DPOModule
from qlora_lightning.modules.reliability import AtomicCheckpointIO
from tests.conftest import EXAMPLES, REPO, TINY_LLAMA, sft_module, tiny_spec, tokenizer_at

FSDP_CONFIG = REPO / "configs" / "mistral_fsdp.yaml"
STEPS = 4
ADAM_LR = 1e-2  # every run's AdamW learning rate, constant (no warm-up)
RESUME_AFTER = {"resume": 1, "resumelate": 3}  # optimizer steps of the first fit
# Small enough that every step clips (FSDP: through the root's clip_grad_norm_, over all shards).
# Not in bf16 runs: the shards' norm, summed in another order, differs in its last bit, and bf16
# rounding in the next forward makes that visible; without clipping FSDP and DDP agree exactly.
CLIP = 0.05
# A fixed batch whose logits each run records: (2, 12) token ids of the tiny Llama's vocabulary.
PROBE = torch.arange(24).reshape(2, 12) * 7 % 500 + 3
CHUNK = 8  # loss_chunk_size of the `chunked` runs: several chunks per batch


class _FSDPOnCPU(FSDP):
    def __init__(self, *args, device_id=None, **kwargs):
        super().__init__(*args, device_id=torch.device("cpu"), **kwargs)  # nested units inherit it


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU accelerator, changed only in how it names the device.

    Lightning refuses the ``fsdp`` strategy without a GPU in its argument checks (for the name
    and the exact class) and passes ``device_id=root_device.index``, None on the CPU, to torch's
    FSDP, which then looks for an accelerator; given the CPU device, FSDP runs over gloo.
    """

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        with mock.patch.object(torch.distributed.fsdp, "FullyShardedDataParallel", _FSDPOnCPU):
            return super()._setup_model(model)

    # Lightning gathers full state dicts with offload_to_cpu=True. On a CPU device torch's FSDP
    # "moves" the gathered tensor to the CPU (a no-op) and then frees it, so the state dict reads
    # freed memory (a segfault): gather without offloading, as full_state_dict does on the CPU.
    @override
    def lightning_module_state_dict(self) -> dict:
        with mock.patch(
            "lightning.pytorch.strategies.fsdp._get_full_state_dict_context",
            _full_state_dict_no_offload,
        ):
            return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer) -> dict:
        with mock.patch(
            "lightning.pytorch.strategies.fsdp._get_full_state_dict_context",
            _full_state_dict_no_offload,
        ):
            return super().optimizer_state(optimizer)


def _full_state_dict_no_offload(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


# The auto-wrap policy of the `replicated` runs: the adapters stay whole on each rank, outside FSDP.
REPLICATED = {
    "auto_wrap_policy": {
        "class_path": "qlora_lightning.DecoderLayerPolicy",
        "init_args": {"adapters": False},
    }
}


def strategy_for(name: str, options: set[str]):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    overrides = REPLICATED if "replicated" in options else {}
    return strategy_from_config(
        FSDP_CONFIG, CPUFSDPStrategy, process_group_backend="gloo", **overrides
    )


class TokenTally(Callback):
    """This rank's real tokens per optimizer step, to check PerfMonitor's sums over ranks."""

    def __init__(self):
        self.steps: list[int] = []
        self._tokens, self._stepped = 0, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Also at an epoch's end, after fewer than accumulate_grad_batches batches.
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += int(real_tokens_and_examples(batch)[0])
        if self._stepped:
            self.steps.append(self._tokens)
            self._tokens, self._stepped = 0, False


def module_and_data(
    task: str,
    sft_adapter: Optional[str] = None,
    bf16: bool = False,
    compiled: bool = False,
    chunked: bool = False,
):
    # A larger initializer range than shipped, so that 4 steps move the loss (see tiny_spec).
    base = tiny_spec(initializer_range=0.2)
    if bf16:  # the GPU recipe's dtypes: bf16 4-bit storage and frozen weights, fp32 adapters
        base = dataclasses.replace(base, compute_dtype="bfloat16")
    if compiled:  # what compile_layers: auto does on a GPU
        base = dataclasses.replace(base, compile_layers=True)
    if task == "sft":
        data = GSM8KDataModule(
            path=str(EXAMPLES / "gsm8k_train.jsonl"),
            tokenizer=tokenizer_at(TINY_LLAMA),
            num_samples=16,
            batch_size=2,
            val_fraction=0.25,
        )
        # Gradient checkpointing asked for: under FSDP the strategy's policy replaces it.
        return sft_module(
            base=base,
            r=8,
            lr=ADAM_LR,
            gradient_checkpointing=True,
            loss_chunk_size=CHUNK if chunked else None,
        ), data
    data = PreferenceDataModule(
        path=str(EXAMPLES / "preference.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        max_seq_length=128,
        batch_size=2,
        val_fraction=0.2,
    )
    # The reference is the SFT adapter, frozen beside the policy on the one (sharded) base.
    module = DPOModule(
        base=base,
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=False,
        optimizer=functools.partial(torch.optim.AdamW, lr=ADAM_LR),
        warmup_ratio=0.0,
        sft_adapter=sft_adapter,
        loss_chunk_size=CHUNK if chunked else None,
    )
    return module, data


def unsharded_adapter(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trainable parameters as this rank sees them, whole, keyed as in the saved adapter's
    model."""
    module = trainer.lightning_module
    if isinstance(trainer.strategy, FSDPStrategy):
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            return {
                clean_name(n): p.detach().clone()
                for n, p in module.model.named_parameters()
                if p.requires_grad
            }
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def fit(
    strategy: str,
    task: str,
    out: Path,
    max_steps: int,
    options: set[str],
    sft_adapter: Optional[str] = None,
    ckpt_path: Optional[str] = None,
) -> tuple[Trainer, TokenTally, PerfMonitor]:
    """One ``fit`` of ``max_steps`` optimizer steps, checkpointing its last step to
    ``out/last.ckpt``."""
    seed_everything(0)
    module, data = module_and_data(
        task,
        sft_adapter,
        bf16="bf16" in options,
        compiled="compiled" in options,
        chunked="chunked" in options,
    )
    tally, perf = TokenTally(), PerfMonitor(warmup_steps=1)
    checkpoint = ModelCheckpoint(
        dirpath=out, save_last=True, save_top_k=0, every_n_train_steps=max_steps
    )
    # Both strategies without autocast, so that bf16 runs compare exactly: FSDP's bf16-mixed (what
    # the GPU config uses) autocasts on CUDA only, and FSDP's 32-true would cast the model to fp32.
    precision = "bf16-mixed" if "bf16" in options and strategy == "fsdp" else "32-true"
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy_for(strategy, options),
        precision=precision,
        max_steps=max_steps,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        callbacks=[tally, perf, checkpoint],
        gradient_clip_val=None if "bf16" in options else CLIP,
        plugins=[AtomicCheckpointIO()],  # as the CLI sets up
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    module.adapter_dir = str(out / "adapter")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, tally, perf


def run(name: str, out: Path, sft_adapter: str) -> None:
    """``<ddp|fsdp>_<sft|dpo>[_bf16][_compiled][_chunked][_replicated][_resume]``: ``compiled`` sets
    ``base.compile_layers``, ``chunked`` ``loss_chunk_size``, ``replicated`` (FSDP) keeps the
    adapters out of FSDP; ``resume`` (``resumelate``) stops after step 1 (3) and resumes from its
    checkpoint."""
    strategy, task, *options = name.split("_")
    options = set(options)
    ckpt_path = None
    # 2 optimizer steps per epoch: ``resume`` stops inside the first epoch, ``resumelate`` inside
    # the second.
    stop = next((RESUME_AFTER[option] for option in options if option in RESUME_AFTER), None)
    if stop is not None:
        fit(strategy, task, out / "first", stop, options, sft_adapter)
        ckpt_path = str(out / "first" / "last.ckpt")
    trainer, tally, perf = fit(strategy, task, out, STEPS, options, sft_adapter, ckpt_path)

    adapter = unsharded_adapter(trainer)
    # Through the strategy's wrapper (the FSDP root unshards its own parameters in its forward).
    model = trainer.strategy.model
    model.eval()
    with torch.no_grad():
        logits = model(PROBE, torch.ones_like(PROBE))
    rank = trainer.global_rank
    wrappers = {
        kind.__name__: sum(isinstance(m, kind) for m in model.modules())
        for kind in (FSDP, CheckpointWrapper)
    }
    hf_checkpointing = trainer.lightning_module.model.base_model.model.is_activation_checkpointing
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    torch.save(
        {
            "adapter": adapter,
            "tokens": tally.steps,
            "logits": logits,
            "wrappers": wrappers,
            "hf_checkpointing": hf_checkpointing,
            "compiled_modules": compiled,
        },
        out / f"rank{rank}.pt",
    )
    if rank == 0:
        (out / "perf.json").write_text(json.dumps(perf.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["ddp_sft", "fsdp_sft", "ddp_dpo", "fsdp_dpo"],
        help="<ddp|fsdp>_<sft|dpo>[_bf16][_compiled][_chunked][_replicated][_resume]",
    )
    parser.add_argument(
        "--sft-adapter", help="the DPO runs' reference (default: the ddp_sft run's adapter)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores
    out = Path(args.out)
    for name in args.runs:
        run(name, out / name, sft_adapter=args.sft_adapter or str(out / "ddp_sft" / "adapter"))


if __name__ == "__main__":
    main()
