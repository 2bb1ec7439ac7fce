"""The shared LightningModule: a 4-bit (or 8/16-bit) base with a trainable LoRA adapter.

``QLoRAModule`` holds the settings and the state; each of its parts has one job:

* ``building.py``: the training plan, the model it says, the out-of-memory message, the optimizer;
* ``inputs.py``: batches to the device with what the host knows of them, the forwards;
* ``stepping.py``: the step's gradients, the non-finite guard, clipping, progress-bar values;
* ``checkpoint_state.py``: adapter-only checkpoints, RNG states for resuming, the final adapter;
* ``predicting.py``: metric states per evaluation loop, and ``predict``'s generations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.cli import OptimizerCallable

from qlora_lightning.bounds import Fraction
from qlora_lightning.errors import UserError
from qlora_lightning.model.adapters import AdapterSet
from qlora_lightning.model.build import (
    BaseModelSpec,
    LoraSpec,
    load_tokenizer,
    spec_dict,
    tokenizer_source,
)
from qlora_lightning.model.plan import TrainingPlan
from qlora_lightning.modules.building import Building, paged_adamw_8bit
from qlora_lightning.modules.checkpoint_state import CheckpointState
from qlora_lightning.modules.inputs import LOSS_POSITIONS, Inputs
from qlora_lightning.modules.predicting import Predicting
from qlora_lightning.modules.stepping import Stepping
from qlora_lightning.speed.checkpointing import Checkpointing
from qlora_lightning.speed.lagged import HostReadings

__all__ = ["QLoRAModule", "paged_adamw_8bit", "LOSS_POSITIONS"]


class QLoRAModule(Building, Inputs, Stepping, CheckpointState, Predicting):
    """A 4-bit (or 8/16-bit) base with a trainable LoRA adapter.

    Args:
        base: The base model and how it is quantized.
        lora: The adapter.
        gradient_checkpointing: ``true``: recompute each decoder layer in the backward (less
            memory, a second forward); ``offload``: also keep each layer's input (B x T x hidden)
            in pinned CPU memory instead of on the GPU; ``offload_halves``: the same per attention
            and MLP of Llama-style layers (never recomputing ``o_proj``'s base matmul; twice the
            copies); ``offload_all``: recompute nothing and keep everything the layers save in CPU
            memory (for small batches, where the host sets the pace); ``false``: keep everything.
            ``auto``: the fastest of these whose estimated peak fits ``memory_budget_gib``. The
            plan (``model/plan.py``) names the modes by what they do and logs what it chose.
        memory_budget_gib: The GPU memory ``gradient_checkpointing: auto`` plans for; default 80% of
            the device's (room for the CUDA context, the allocator's cached blocks and the
            estimator's error). On a CPU without a budget, ``auto`` checkpoints nothing.
        loss_chunk_size: Compute the loss from the final hidden states this many tokens at a
            time, so the full (B, T, V) logits never exist (same loss; saves about
            10 * B * T * V bytes: bf16 logits, their fp32 copy and log-softmax). None: plain loss.
        optimizer: Optimizer over the trainable (adapter) parameters only.
        lr_scheduler: Learning-rate shape after warm-up.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly from zero.
        adapter_dir: Where ``fit`` saves the final adapter and tokenizer; default
            ``<log_dir>/adapter``.
        nonfinite: On a non-finite loss or gradient: ``skip`` the optimizer step (and count it in
            ``train/skipped_steps``) or ``stop`` the run, leaving the last checkpoint from before
            it.
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
        self.gradient_checkpointing, self.memory_budget_gib = (
            gradient_checkpointing,
            memory_budget_gib,
        )
        self.plan: Optional[TrainingPlan] = None  # every lever, resolved in ``configure_model``
        if loss_chunk_size is not None and loss_chunk_size <= 0:
            raise UserError(
                f"model.loss_chunk_size must be a positive number of tokens, got {loss_chunk_size}"
            )
        self.loss_chunk_size = loss_chunk_size
        self.optimizer_factory, self.lr_scheduler, self.warmup_ratio = (
            optimizer,
            lr_scheduler,
            warmup_ratio,
        )
        self.adapter_dir = adapter_dir
        self.nonfinite = nonfinite
        self.adapters, self.max_new_tokens = adapters, max_new_tokens
        # On the GPU once training runs: counted without waiting for it.
        self._skipped_steps = torch.zeros(())
        self._skip_flags = HostReadings()  # (step, skipped?) on their way to the host
        self._bar_values = HostReadings()  # progress-bar values on their way to the host
        self._skips_warned = 0
        self._pending_rng_states: Optional[dict] = None
        # The config that runs this module (``resume.run_record``), set by the CLI and written into
        # every checkpoint, so that a resume can be checked against it.
        self.run_record: Optional[dict] = None
        # Set by the CLI's --push_to_hub: the hub repository the adapter goes to (for its model
        # card).
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
        return {
            "base": spec_dict(self.base),
            "lora": spec_dict(self.lora),
            "gradient_checkpointing": self.gradient_checkpointing,
            "plan": self.plan.as_dict() if self.plan else None,
            "loss_chunk_size": self.loss_chunk_size,
        }
