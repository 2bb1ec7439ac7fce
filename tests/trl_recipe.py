"""The standard recipe the project is checked against: transformers' 4-bit load, PEFT's k-bit
preparation and TRL's trainers. Shared by the parity tests (``test_parity.py``) and the learning
benchmark on the real model (``benchmarks/real_model.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_lightning.model.build import BaseModelSpec, _keep_cpu_4bit_layout


def trl_peft_model(base: BaseModelSpec, adapter: str):
    """The standard recipe's model: transformers' 4-bit load, PEFT's k-bit preparation, the
    adapter."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base.checkpoint,
        quantization_config=quantization,
        dtype=torch.float32,
        **base.config_overrides,
    )
    # A bitsandbytes bug, not a recipe choice: on CPUs with AVX512-BF16 an eval-mode forward repacks
    # the weights for a kernel without autograd (see model._keep_cpu_4bit_layout); both sides avoid
    # it.
    _keep_cpu_4bit_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def trl_fp32_adapter(trainer, adapter: str) -> None:
    """Undo TRL's cast of the adapter to bf16 (``SFTTrainer``/``DPOTrainer.__init__`` do it for any
    quantized base, even with ``bf16=False``): both sides then train the same fp32 adapter, as the
    project does, starting from ``adapter``'s exact values."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    loaded = set_peft_model_state_dict(
        trainer.model, load_file(Path(adapter) / "adapter_model.safetensors")
    )
    assert not loaded.unexpected_keys, loaded.unexpected_keys


def trl_args(
    config_class,
    output_dir: Path,
    *,
    batch: int,
    accumulate: int,
    steps: int,
    lr: float,
    warmup: int,
    clip: float | None,
    **kwargs,
):
    """TRL's arguments for the project's AdamW (no weight decay) and warm-up + cosine schedule, in
    fp32 on the CPU, reading its rows in order. ``clip`` None: no gradient clipping, as in
    Lightning."""
    return config_class(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=clip or 0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        train_sampling_strategy="sequential",
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        **kwargs,
    )


class TrlLog:
    """A transformers TrainerCallback collecting each optimizer step's logged values."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Collect(TrainerCallback):
            def __init__(self):
                self.steps: list[dict] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.steps.append(dict(logs))

        return Collect()
