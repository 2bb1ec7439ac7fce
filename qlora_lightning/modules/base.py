"""The shared LightningModule: builds the 4-bit PEFT model, its optimizer and schedule,
keeps checkpoints to the adapter, and saves the adapter in the PEFT format after ``fit``."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Optional, Union

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric
from transformers import AutoConfig
from typing_extensions import override

from qlora_lightning.model.adapters import AdapterSet, attach_adapters, save_base_spec
from qlora_lightning.model.distributed import (average_gradients, cast_frozen_for_fsdp, check_fsdp_precision,
                                               clean_name, fsdp_checkpoints_activations, full_state_dict, is_fsdp,
                                               replicates_adapters, save_adapter)
from qlora_lightning.errors import UserError
from qlora_lightning.speed.estimate import choose_checkpointing, estimate_peak_memory
from qlora_lightning.evaluate.generation import greedy_generate, stop_token_ids
from qlora_lightning.speed.lagged import HostReadings
from qlora_lightning.losses import labelled_positions
from qlora_lightning.evaluate.card import fit_summary, write_adapter_card
from qlora_lightning.speed.masks import known_to_the_host
from qlora_lightning.modules.reliability import NonFiniteLossError
from qlora_lightning.modules.resume import as_saved_after_last_batch, collect_rng_states, set_rng_states
from qlora_lightning.model.build import (BaseModelSpec, Checkpointing, CpuEmbedding, Fraction, LoraSpec, build_model,
                                         load_tokenizer, spec_dict, tokenizer_source)

log = logging.getLogger(__name__)

# The batch key of the chunked loss's labelled positions (``losses.labelled_positions``), found on the host.
LOSS_POSITIONS = "loss_positions"


def paged_adamw_8bit(params, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The QLoRA paper's optimizer: 8-bit AdamW whose state pages to CPU memory under pressure."""
    import bitsandbytes as bnb  # deferred: importing it costs a second and logs about CUDA

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)


class QLoRAModule(LightningModule):
    """A 4-bit (or 8/16-bit) base with a trainable LoRA adapter.

    Args:
        base: The base model and how it is quantized.
        lora: The adapter.
        gradient_checkpointing: Recompute each decoder layer in the backward pass (less memory, ~30%
            slower); ``offload`` also keeps each layer's input in pinned CPU memory instead of on the
            GPU (B x T x hidden per layer: 2 GiB for Mistral-7B at 8 x 1024, 8 GiB at 1 x 32768);
            ``offload_halves`` does so per attention and MLP of Llama-style layers (never recomputing
            ``o_proj``'s base matmul; twice the copies);
            ``offload_all`` recomputes nothing and keeps everything the layers save in CPU memory
            (for small batches, where the host sets the pace; see ``checkpointing.py``); ``auto``
            picks the fastest of these whose estimated peak fits ``memory_budget_gib``
            (``estimate.choose_checkpointing``).
        memory_budget_gib: The GPU memory ``gradient_checkpointing: auto`` plans for; default 80% of
            the device's (room for the CUDA context, the allocator's cached blocks and the
            estimator's error). On a CPU without a budget, ``auto`` checkpoints nothing.
        loss_chunk_size: Compute the loss from the final hidden states this many tokens at a
            time, so the full (B, T, V) logits never exist (same loss; saves about
            10 * B * T * V bytes: bf16 logits, their fp32 copy and log-softmax). None: plain loss.
        optimizer: Optimizer over the trainable (adapter) parameters only.
        lr_scheduler: Learning-rate shape after warm-up.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly from zero.
        adapter_dir: Where ``fit`` saves the final adapter and tokenizer; default ``<log_dir>/adapter``.
        nonfinite: On a non-finite loss or gradient: ``skip`` the optimizer step (and count it in
            ``train/skipped_steps``) or ``stop`` the run, leaving the last checkpoint from before it.
        adapters: Named adapters loaded (frozen) beside the module's own ``default`` one, combined
            and switched per evaluation or per prompt (see ``adapters.py``).
        max_new_tokens: Longest greedy generation of ``predict``, in tokens.
    """

    def __init__(
        self,
        base: BaseModelSpec = BaseModelSpec(),
        lora: LoraSpec = LoraSpec(),
        gradient_checkpointing: Union[Checkpointing, Literal["auto"]] = True,
        memory_budget_gib: Optional[PositiveFloat] = None,
        loss_chunk_size: Optional[int] = None,
        optimizer: OptimizerCallable = paged_adamw_8bit,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "constant",
        warmup_ratio: Fraction = 0.03,
        adapter_dir: Optional[str] = None,
        nonfinite: Literal["skip", "stop"] = "skip",
        adapters: Optional[AdapterSet] = None,
        max_new_tokens: PositiveInt = 256,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.base, self.lora = base, lora
        self.gradient_checkpointing, self.memory_budget_gib = gradient_checkpointing, memory_budget_gib
        self.checkpointing: Optional[Checkpointing] = None  # what the model was built with (``auto`` resolved)
        if loss_chunk_size is not None and loss_chunk_size <= 0:
            raise UserError(f"model.loss_chunk_size must be a positive number of tokens, got {loss_chunk_size}")
        self.loss_chunk_size = loss_chunk_size
        self.optimizer_factory, self.lr_scheduler, self.warmup_ratio = optimizer, lr_scheduler, warmup_ratio
        self.adapter_dir = adapter_dir
        self.nonfinite = nonfinite
        self.adapters, self.max_new_tokens = adapters, max_new_tokens
        self._skipped_steps = torch.zeros(())  # on the GPU once training runs: counted without waiting for it
        self._skip_flags = HostReadings()  # (step, skipped?) on their way to the host
        self._bar_values = HostReadings()  # progress-bar values on their way to the host
        self._skips_warned = 0
        self._pending_rng_states: Optional[dict] = None
        # The config that runs this module (``resume.run_record``), set by the CLI and written into
        # every checkpoint, so that a resume can be checked against it.
        self.run_record: Optional[dict] = None
        # Set by the CLI's --push_to_hub: the hub repository the adapter goes to (for its model card).
        self.push_to_hub: Optional[str] = None
        self.saved_adapter_dir: Optional[Path] = None  # where on_fit_end saved the adapter
        # The last batch's attention mask on the device, and whether its host copy pads anything.
        self._mask_twin: Optional[tuple[torch.Tensor, bool]] = None
        self.model: Optional[torch.nn.Module] = None
        self._tokenizer = None
        # Checkpoints hold the adapter only; the frozen base is rebuilt from `base`.
        self.strict_loading = False

    @property
    def tokenizer(self):
        """Loaded on first use, so building the module never downloads anything."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(tokenizer_source(self.base))
        return self._tokenizer

    def describe(self) -> dict:
        """What is being trained, for run summaries."""
        return {"base": spec_dict(self.base), "lora": spec_dict(self.lora),
                "gradient_checkpointing": self.gradient_checkpointing, "checkpointing_used": self.checkpointing,
                "loss_chunk_size": self.loss_chunk_size}

    @override
    def configure_model(self) -> None:
        if self.model is None:
            strategy = self._trainer.strategy if self._trainer else None
            # Each rank loads the 4-bit base onto its own device (DDP keeps that copy; FSDP shards it).
            device = strategy.root_device if strategy else torch.device("cpu")
            # FSDP's activation_checkpointing_policy recomputes each decoder layer: transformers'
            # own checkpointing inside it would recompute everything a second time.
            checkpointing = False if fsdp_checkpoints_activations(strategy) else self.gradient_checkpointing
            if checkpointing == "auto":
                checkpointing = self._choose_checkpointing(device)
            self.checkpointing = checkpointing
            compute_dtype = getattr(torch, self.base.compute_dtype)
            if is_fsdp(strategy) and self.base.quantization in ("nf4", "fp4"):  # before the minutes-long load
                check_fsdp_precision(strategy, str(self.trainer.precision), compute_dtype)
            base = self.base
            if is_fsdp(strategy) and base.cpu_embeddings:
                raise UserError("model.base.cpu_embeddings does not work under FSDP (it would shard a table that "
                                "is not on the device): set it to false, or use ddp")
            if is_fsdp(strategy) and base.compile_layers:
                # Untested: FSDP swaps the layers' weights for views of its flat parameters, and
                # compiling FSDP (1) models needs use_orig_params, which these configs leave off.
                if base.compile_layers is True:
                    raise UserError("model.base.compile_layers does not work under FSDP: set it to false, or use ddp")
                base = replace(base, compile_layers=False)
            try:
                self.model = build_model(base, self.lora, checkpointing, device=device)
            except torch.cuda.OutOfMemoryError:
                raise UserError(self._out_of_memory_message(device)) from None
            if self.adapters:
                attach_adapters(self.model, self.adapters)
            if is_fsdp(strategy):
                cast_frozen_for_fsdp(self.model, compute_dtype)
            if replicates_adapters(strategy):  # FSDP leaves them alone; reduce_replicated_gradients averages them
                strategy.kwargs["ignored_states"] = self._trainable()

    # Sequences in the model's forward per example of a micro-batch (DPO: a chosen and a rejected one).
    sequences_per_example = 1

    def _micro_batch_shape(self) -> tuple[int, int]:
        """(sequences, tokens per sequence) of the largest micro-batch the DataModule makes."""
        datamodule = getattr(self._trainer, "datamodule", None)
        batch, seq = getattr(datamodule, "batch_size", 1), getattr(datamodule, "max_seq_length", 512)
        return batch * self.sequences_per_example, seq

    def _estimated_peak_gib(self, checkpointing: Checkpointing) -> float:
        """The estimator's peak for this module's settings and micro-batch, in GiB."""
        batch, seq = self._micro_batch_shape()
        config = AutoConfig.from_pretrained(self.base.checkpoint, **self.base.config_overrides)
        try:  # built on a stand-in parameter, only to learn which optimizer (and so how much state) it is
            optimizer = type(self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])).__name__
        except Exception:  # e.g. one that wants CUDA parameters: plan for fp32 moments, the most Adam keeps
            optimizer = "AdamW"
        return estimate_peak_memory(
            config, batch, seq, self.lora.r, checkpointing, loss_chunk_size=self.loss_chunk_size,
            quantization=self.base.quantization, double_quant=self.base.double_quant, lora_dropout=self.lora.dropout,
            optimizer=optimizer, upcast_frozen=self.base.upcast_frozen, liger_kernel=self.base.liger_kernel,
            attn_implementation=self.base.attn_implementation, cpu_embeddings=self.base.cpu_embeddings,
            lean_forward=self.lora.lean_forward)["total_gib"]

    def _choose_checkpointing(self, device: torch.device) -> Checkpointing:
        """``gradient_checkpointing: auto``: the fastest mode whose estimated peak fits the memory budget."""
        budget = self.memory_budget_gib
        if budget is None and device.type != "cuda":
            return False  # the estimator plans GPU memory, not the host's
        if budget is None:
            budget = 0.8 * torch.cuda.get_device_properties(device).total_memory / 2**30
        batch, seq = self._micro_batch_shape()
        try:
            mode, gib = choose_checkpointing(budget, batch * seq, self._estimated_peak_gib)
        except (OSError, ValueError, AttributeError) as err:  # an architecture the estimator cannot read
            log.warning("gradient_checkpointing auto: no memory estimate for '%s' (%s); checkpointing with "
                        "offloaded layer inputs", self.base.name_or_path, err)
            return "offload"
        if gib <= budget:
            rank_zero_info(f"gradient_checkpointing auto: {mode} for {batch} x {seq} tokens (estimated peak "
                           f"{gib:.2f} GiB, budget {budget:.2f} GiB)")
        else:
            log.warning("gradient_checkpointing auto: no mode fits %.2f GiB at %d x %d tokens; %s, the leanest, is "
                        "estimated at %.2f GiB (lower data.batch_size or data.max_seq_length)",
                        budget, batch, seq, mode, gib)
        return mode

    def _out_of_memory_message(self, device: torch.device) -> str:
        """What did not fit, what the estimator expected, what the GPU had, and what to lower."""
        free, total = torch.cuda.mem_get_info(device)
        batch, seq = self._micro_batch_shape()
        try:
            expected = self._estimated_peak_gib(self.checkpointing)
            estimate = f"about {expected:.1f} GiB estimated for batch {batch} x {seq} tokens"
        except Exception:  # the message must not fail on an architecture the estimator does not know
            estimate = "no estimate for this architecture"
        return (f"out of GPU memory loading '{self.base.name_or_path}' ({estimate}; {free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GiB free on {device}): use base.quantization nf4, lower data.batch_size "
                "or data.max_seq_length, keep gradient_checkpointing on, or free the GPU")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits."""
        inputs, known = self._as_known({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        with known:
            return self.model(**inputs, use_cache=False).logits

    def final_hidden(self, **inputs) -> torch.Tensor:
        """(B, T, H) final hidden states (after the last norm): the forward of a chunked loss."""
        causal_lm = self.model.get_base_model()  # the transformers model inside the PEFT wrapper
        inputs, known = self._as_known(inputs)
        with known:
            return causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state

    def _as_known(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], ContextManager[None]]:
        """``inputs`` for the model, and what the host knows of them for its mask building
        (``qlora_lightning.speed.masks``): whether it builds the positions, and whether the mask pads.

        A mask is known where it is the last batch's as moved to the device: one that pads nothing
        is dropped (the causal mask over the model's own positions says the same), one that pads is
        kept without the model reading it. Beside explicit positions a mask stays: without it,
        transformers would read positions that restart inside a row as packed sequences.
        """
        mask, twin = inputs.get("attention_mask"), self._mask_twin
        padded = twin[1] if mask is not None and twin is not None and twin[0] is mask else None
        model_positions = "position_ids" not in inputs
        if padded is False and model_positions:
            inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
        return inputs, known_to_the_host(model_positions=model_positions, padded=bool(padded))

    def logits_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """(N, H) final hidden states -> (N, V) logits, as the model's own forward computes them."""
        causal_lm = self.model.get_base_model()
        config = causal_lm.config
        for scale in ("logit_scale", "logits_scaling"):  # Cohere, Granite: rescale logits in forward
            if getattr(config, scale, None) not in (None, 1, 1.0):
                raise UserError(f"model.loss_chunk_size does not support {config.model_type} ({scale}); unset it")
        head = causal_lm.get_output_embeddings()
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        if not cap:
            return head
        return lambda hidden: torch.tanh(head(hidden) / cap) * cap

    @override
    def configure_optimizers(self) -> Any:
        from transformers import get_scheduler  # its module imports peft: seconds of a config's parse (model/build.py)

        params = self._trainable()
        optimizer = self.optimizer_factory(params)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(self.lr_scheduler if self.lr_scheduler != "constant" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and is_fsdp(self.trainer.strategy):
            # Lightning's FSDP precision plugin refuses norm clipping (it holds no handle on the FSDP
            # root); the root's clip_grad_norm_ takes the norm over every rank's shard.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @staticmethod
    def step_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The gradients ``optimizer`` is about to apply.

        Found through its parameter groups, not the model: walking a 4-bit PEFT 7B model's
        thousands of modules takes milliseconds of host time, which the GPU waits for at every step.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def reduce_replicated_gradients(self) -> None:
        """Before an optimizer step: average the adapter's gradients over the ranks where FSDP
        leaves them to the module (``replicates_adapters``); a no-op elsewhere."""
        if replicates_adapters(self.trainer.strategy):
            average_gradients(self._trainable(), self.trainer.world_size)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient (reading it waits for the GPU)."""
        return int(self._skipped_steps)

    def guard_nonfinite(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Before an optimizer step: True when the step may proceed.

        A non-finite loss or gradient skips the step (weights and moments untouched) or stops the
        run, per ``nonfinite``. An optimizer that can skip on the GPU (torch's fused Adam family,
        as under a ``GradScaler``) is told there, so the step never waits for the GPU; the warning
        comes a step or so late. Others are asked on the host: the step's gradients are dropped,
        and optimizers skip parameters without one.
        """
        grads = self.step_gradients(optimizer)
        # One multi-tensor kernel for all the adapter's gradients, not one launch per tensor.
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        # A bad gradient on any rank spoils the averaged one: every rank skips.
        bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        self._skipped_steps = self._skipped_steps.to(bad.device) + bad
        optimizer = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer
        if self.nonfinite == "skip" and getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad.float()
            self._skip_flags.push(self.global_step, bad)
            self._report_skips()
            return True
        if not bool(bad):
            return True
        if self.nonfinite == "stop":
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise NonFiniteLossError(f"non-finite loss or gradient at step {self.global_step}; "
                                     f"stopped before applying it (last checkpoint: {last})")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._warn_skipped(self.global_step)
        return False

    def _report_skips(self, wait: bool = False) -> None:
        """Warn of the steps the GPU skipped, as their flags reach the host."""
        for step, bad in self._skip_flags.arrived(wait):
            if bool(bad):
                self._warn_skipped(step)

    def _warn_skipped(self, step: int) -> None:
        self._skips_warned += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d so far)", step, self._skips_warned)

    def show_in_progress_bar(self, name: str, value: torch.Tensor) -> None:
        """Show ``value`` in the progress bar once it has reached the host (a step or so late).

        A metric logged with ``prog_bar=True`` is read with ``.item()`` after every batch, which
        makes the host wait for the GPU; this one is logged as a CPU copy when it has arrived.
        """
        self._bar_values.push(name, value.detach())
        for name, arrived in self._bar_values.arrived():
            self.log(name, arrived, prog_bar=True, logger=False)

    @override
    def on_train_end(self) -> None:
        self._report_skips(wait=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Megabytes, not gigabytes: the frozen 4-bit base is rebuilt from the config on load. The
        # adapter is picked from the state dict the strategy gathered (under FSDP: unsharded, on
        # rank 0 only, empty elsewhere), not from the parameters, which FSDP shards and renames.
        if is_fsdp(self.trainer.strategy) and getattr(self.trainer.strategy, "_state_dict_type", "full") != "full":
            raise UserError("checkpoints hold the adapter only: use FSDPStrategy state_dict_type: full")
        trainable = {"model." + clean_name(name) for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Dropout masks come from these generators: restoring them makes a resumed run exact.
        checkpoint["rng_states"] = collect_rng_states()
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.run_record is not None:
            checkpoint["run_record"] = self.run_record

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning restores its loops from the same dict.
        as_saved_after_last_batch(checkpoint)
        self._pending_rng_states = checkpoint.get("rng_states")
        self._skipped_steps = torch.tensor(float(checkpoint.get("skipped_steps", 0)))

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if self.loss_chunk_size is not None and isinstance(labels, torch.Tensor) and labels.device.type == "cpu":
            # Found on the host copy, the chunked loss's labelled positions cost the GPU no wait.
            positions = labelled_positions(labels)
            batch = {**batch, LOSS_POSITIONS: positions.pin_memory() if labels.is_pinned() else positions}
        moved = super().transfer_batch_to_device(batch, device, dataloader_idx)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
            # Read on the host copy, whether the batch pads costs the GPU no wait (``_as_known``).
            self._mask_twin = (moved["attention_mask"], not bool(mask.all()))
        embedding = self.model.get_input_embeddings() if self.model is not None else None
        if isinstance(embedding, CpuEmbedding) and isinstance(batch, dict) and "input_ids" in batch:
            embedding.remember_host_copy(moved["input_ids"], batch["input_ids"])
        return moved

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not on load: starting the data loader between load and the first
        # batch draws from the global generator, which the uninterrupted run did not do.
        if self._pending_rng_states is not None:
            set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None

    @override
    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    @override
    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        """Fresh metric states, made under this loop's grad mode. ``validate`` and ``test`` run under
        inference mode, so the states they leave are inference tensors, which the validation inside
        a later ``fit`` of the same module (no-grad only) could not update in place."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    @override
    def on_fit_end(self) -> None:
        # Under FSDP the adapter is sharded: every rank takes part in gathering it, rank 0 writes it.
        gathered = full_state_dict(self.trainer.strategy)
        # trainer.log_dir is a broadcast from rank 0 under DDP/FSDP: every rank must ask.
        path = Path(self.adapter_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter")
        log_dir = self.trainer.log_dir  # the run folder, with data_report.json
        if self.trainer.is_global_zero:
            state_dict = None if gathered is None else {  # keyed as in self.model
                key.removeprefix("model."): value for key, value in gathered.items() if key.startswith("model.")}
            # The trained adapter only: a frozen one beside it (e.g. DPO's reference) is an input, not a result.
            save_adapter(self.model, path, state_dict)
            self.tokenizer.save_pretrained(path)
            save_base_spec(self.base, path)
            write_adapter_card(path, fit_summary(self, self.trainer, log_dir), self.push_to_hub)
            log.info("saved the adapter, tokenizer and model card to %s", path)
        self.saved_adapter_dir = path

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy generations for a ``PromptsDataModule`` batch: each input row plus ``generation``."""
        if "prompt_ids" not in batch:
            raise UserError("predict generates from prompts: use data: qlora_lightning.PromptsDataModule")
        names = batch.get("adapter_names")
        if names is not None:  # rows that name no adapter use the active one
            names = [name or self.model.active_adapter for name in names]
        tokens = greedy_generate(self.model, batch["prompt_ids"], self.tokenizer.pad_token_id,
                                 stop_token_ids(self.model, self.tokenizer), self.max_new_tokens,
                                 batch_size=len(batch["prompt_ids"]), adapter_names=names)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [{**record, "generation": text} for record, text in zip(batch["records"], texts)]
