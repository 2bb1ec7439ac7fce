"""What the model's forward is given: batches moved to the device with what the host already knows
of them (the chunked loss's labelled positions, whether the mask pads, the token ids for embeddings
kept in CPU memory), the forward to logits or to final hidden states, and the logits head."""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.losses import labelled_positions
from qlora_lightning.model.build import CpuEmbedding
from qlora_lightning.speed.masks import known_to_the_host

# The batch key of the chunked loss's labelled positions (``losses.labelled_positions``), found on
# the host.
LOSS_POSITIONS = "loss_positions"


class Inputs(LightningModule):
    """``forward``, ``final_hidden`` and ``transfer_batch_to_device`` of ``QLoRAModule``."""

    model: Optional[torch.nn.Module]
    loss_chunk_size: Optional[int]
    # The last batch's attention mask on the device, and whether its host copy pads anything.
    _mask_twin: Optional[tuple[torch.Tensor, bool]]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits."""
        inputs, known = self._as_known(
            {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        )
        assert self.model is not None  # built in configure_model
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
        (``qlora_lightning.speed.masks``): whether it builds the positions, and whether the mask
        pads.

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
        # Cohere, Granite: rescale logits in forward.
        for scale in (
            "logit_scale",
            "logits_scaling",
        ):
            if getattr(config, scale, None) not in (None, 1, 1.0):
                raise UserError(
                    f"model.loss_chunk_size does not support {config.model_type} ({scale}); unset "
                    "it"
                )
        head = causal_lm.get_output_embeddings()
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        if not cap:
            return head
        return lambda hidden: torch.tanh(head(hidden) / cap) * cap

    @override
    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if (
            self.loss_chunk_size is not None
            and isinstance(labels, torch.Tensor)
            and labels.device.type == "cpu"
        ):
            # Found on the host copy, the chunked loss's labelled positions cost the GPU no wait.
            positions = labelled_positions(labels)
            batch = {
                **batch,
                LOSS_POSITIONS: positions.pin_memory() if labels.is_pinned() else positions,
            }
        moved = super().transfer_batch_to_device(batch, device, dataloader_idx)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
            # Read on the host copy, whether the batch pads costs the GPU no wait (``_as_known``).
            self._mask_twin = (moved["attention_mask"], not bool(mask.all()))
        embedding = self.model.get_input_embeddings() if self.model is not None else None
        if isinstance(embedding, CpuEmbedding) and isinstance(batch, dict) and "input_ids" in batch:
            embedding.remember_host_copy(moved["input_ids"], batch["input_ids"])
        return moved
