"""What the module saves and restores: checkpoints that hold the adapter only (with the RNG states
and skipped-step count an exact resume needs, and the run's config), and the adapter in the PEFT
format, with its tokenizer and base spec, at the end of ``fit``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.card import fit_summary, write_adapter_card
from qlora_lightning.model.adapters import save_base_spec
from qlora_lightning.model.distributed import clean_name, full_state_dict, is_fsdp, save_adapter
from qlora_lightning.modules.resume import (
    as_saved_after_last_batch,
    collect_rng_states,
    set_rng_states,
)

log = logging.getLogger(__name__)


class CheckpointState(LightningModule):
    """The checkpoint hooks and the final adapter of ``QLoRAModule``."""

    model: Optional[torch.nn.Module]
    adapter_dir: Optional[str]
    run_record: Optional[dict]
    saved_adapter_dir: Optional[Path]
    _pending_rng_states: Optional[dict]
    _skipped_steps: torch.Tensor

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Megabytes, not gigabytes: the frozen 4-bit base is rebuilt from the config on load. The
        # adapter is picked from the state dict the strategy gathered (under FSDP: unsharded, on
        # rank 0 only, empty elsewhere), not from the parameters, which FSDP shards and renames.
        if (
            is_fsdp(self.trainer.strategy)
            and getattr(self.trainer.strategy, "_state_dict_type", "full") != "full"
        ):
            raise UserError(
                "checkpoints hold the adapter only: use FSDPStrategy state_dict_type: full"
            )
        trainable = {
            "model." + clean_name(name)
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
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
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not on load: starting the data loader between load and the first
        # batch draws from the global generator, which the uninterrupted run did not do.
        if self._pending_rng_states is not None:
            set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None

    @override
    def on_fit_end(self) -> None:
        # Under FSDP the adapter is sharded: every rank takes part in gathering it, rank 0 writes
        # it.
        gathered = full_state_dict(self.trainer.strategy)
        # trainer.log_dir is a broadcast from rank 0 under DDP/FSDP: every rank must ask.
        path = Path(
            self.adapter_dir
            or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        )
        log_dir = self.trainer.log_dir  # the run folder, with data_report.json
        if self.trainer.is_global_zero:
            state_dict = (
                None
                if gathered is None
                else {  # keyed as in self.model
                    key.removeprefix("model."): value
                    for key, value in gathered.items()
                    if key.startswith("model.")
                }
            )
            # The trained adapter only: a frozen one beside it (e.g. DPO's reference) is an input,
            # not a result.
            save_adapter(self.model, path, state_dict)
            self.tokenizer.save_pretrained(path)
            save_base_spec(self.base, path)
            write_adapter_card(path, fit_summary(self, self.trainer, log_dir), self.push_to_hub)
            log.info("saved the adapter, tokenizer and model card to %s", path)
        self.saved_adapter_dir = path
