"""``python -m qlora_lightning merge``: adapter + base -> a standalone 16-bit Hugging Face model.

Two choices of the weights the adapter is merged into:

- ``dequantized`` (default): the NF4 weights the adapter was trained against, dequantized
  (transformers' ``dequantize``, i.e. ``bitsandbytes.functional.dequantize_4bit`` per layer).
  The merged model then computes what adapter-on-4-bit computes, up to 16-bit rounding.
- ``original``: the checkpoint's own 16-bit weights. The adapter then meets weights it never
  saw (the 4-bit quantization error is gone), so outputs move by that error; sometimes better,
  never what was validated.

The merge runs in fp32 and rounds once to ``--dtype``. Afterwards the merged model and
adapter-on-4-bit are run on a fixed batch; the max and mean absolute logit differences go to
``merge_report.json`` in the output directory, with a warning when the max exceeds
``--tolerance`` times the spread (std) of the reference logits: a relative bound, because
logit scales differ by orders of magnitude between a random tiny model and a trained 7B one.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qlora_lightning.adapters import read_base_spec
from qlora_lightning.errors import UserError
from qlora_lightning.generation import inference_mode
from qlora_lightning.model import BaseModelSpec, load_base_model, load_tokenizer

log = logging.getLogger(__name__)

Into = Literal["dequantized", "original"]

# A fixed batch for the logit check: prompts in the formats the shipped datasets use.
CHECK_TEXTS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "### Human: Write a short poem about the sea.### Assistant: The sea is wide and deep,",
    "### Instruction:\nWrite a Python function that reverses a string.\n\n### Response:\ndef reverse(s):",
)


def base_spec_for(adapter_dir: Union[str, Path], base: Optional[str] = None, **overrides) -> BaseModelSpec:
    """How to load the base of a saved adapter: the checkpoint PEFT recorded (or ``base``),
    quantized as in training (from the spec ``fit`` saved beside the adapter), then ``overrides``."""
    try:
        recorded = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    except (OSError, ValueError) as err:
        raise UserError(f"adapter '{adapter_dir}': {err}") from None
    name_or_path = base or recorded
    if not name_or_path:
        raise UserError(f"adapter '{adapter_dir}' records no base model; pass --base")
    saved = read_base_spec(adapter_dir) or {}
    spec = BaseModelSpec(name_or_path=name_or_path,
                         # A random-init base was saved to, and recorded as, a real checkpoint.
                         config_overrides={} if saved.get("random_init") else saved.get("config_overrides", {}),
                         **{k: saved[k] for k in ("quantization", "double_quant", "compute_dtype") if k in saved})
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def merge_adapter(adapter_dir: Union[str, Path], spec: BaseModelSpec, into: Into = "dequantized",
                  dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu") -> PreTrainedModel:
    """The base with the adapter merged in, as a plain transformers model in ``dtype``.

    Args:
        adapter_dir: A saved PEFT LoRA adapter.
        spec: How the base was loaded and quantized in training.
        into: ``dequantized`` NF4 weights (what the adapter was trained against) or the ``original``
            16-bit weights.
        dtype: Dtype of the merged model.
        device: Where to load and merge (a 7B model needs ~28 GB there: it merges in fp32).
    """
    if into == "dequantized":
        if spec.quantization == "none":
            raise UserError("the adapter was trained on a 16-bit base (quantization none): use --into original")
        # fp32, so that base + update is rounded to `dtype` once, not twice.
        model = load_base_model(spec, device).dequantize(dtype=torch.float32)
    else:
        model = load_base_model(replace(spec, quantization="none", compute_dtype="float32"), device)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype)


def adapter_on_base(adapter_dir: Union[str, Path], spec: BaseModelSpec,
                    device: Union[str, torch.device] = "cpu") -> PeftModel:
    """The adapter on its quantized base, as training and ``GSM8KEval`` run it."""
    return PeftModel.from_pretrained(load_base_model(spec, device), str(adapter_dir))


def check_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] = CHECK_TEXTS) -> dict[str, torch.Tensor]:
    """The fixed (B, T) batch of the logit check, right-padded."""
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def logits_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, V) fp32 logits at the batch's real (non-pad) positions."""
    device = next(model.parameters()).device
    with inference_mode(model):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
    return logits.float()[batch["attention_mask"].to(device).bool()].cpu()


def logit_gap(merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference of two (N, V) logit sets, with the reference's spread for scale."""
    diff = (merged - reference).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "reference_logit_std": reference.std().item()}


def merge_and_check(adapter_dir: Union[str, Path], output: Union[str, Path], spec: BaseModelSpec,
                    into: Into = "dequantized", dtype: torch.dtype = torch.bfloat16,
                    device: Union[str, torch.device] = "cpu", tolerance: float = 0.1) -> dict:
    """Merge, save the model and tokenizer to ``output``, compare logits with adapter-on-4-bit; return the report.

    The two models are never in memory together: the merged one's logits are taken, it is
    freed, and then the 4-bit reference is loaded.
    """
    output = Path(output)
    tokenizer_source = adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else spec.name_or_path
    tokenizer = load_tokenizer(str(tokenizer_source))
    merged = merge_adapter(adapter_dir, spec, into, dtype, device)
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    batch = check_batch(tokenizer)
    merged_logits = logits_on(merged, batch)
    del merged
    reference = adapter_on_base(adapter_dir, spec, device) if spec.quantization != "none" else None
    report = {"adapter": str(adapter_dir), "base": spec.name_or_path, "into": into, "dtype": str(dtype),
              "quantization": spec.quantization, "output": str(output), "tolerance": tolerance}
    if reference is not None:
        report.update(logit_gap(merged_logits, logits_on(reference, batch)))
        report["within_tolerance"] = report["max_abs_logit_diff"] <= tolerance * report["reference_logit_std"]
    (output / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qlora_lightning merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="directory of the saved PEFT adapter")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument("--into", choices=["dequantized", "original"], default="dequantized",
                        help="merge into the dequantized 4-bit weights (what the adapter was trained against) "
                             "or into the original 16-bit weights (default: dequantized)")
    parser.add_argument("--base", help="base model id or directory (default: the one the adapter records)")
    parser.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"],
                        help="how the base was quantized in training (default: as saved by fit, else nf4)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                        help="whether training used double quantization (default: as saved by fit, else yes)")
    parser.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"],
                        help="compute dtype of training (default: as saved by fit, else bfloat16)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of the merged model (default: bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to load and merge (default: cuda when available)")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="warn when the max absolute logit difference to adapter-on-4-bit exceeds this "
                             "many standard deviations of its logits (default: 0.1)")
    return parser.parse_args(args)


def main(args: Optional[Sequence[str]] = None) -> dict:
    """Run the merge CLI; print the report; return it."""
    opts = parse_args(args)
    spec = base_spec_for(opts.adapter, opts.base, quantization=opts.quantization, double_quant=opts.double_quant,
                         compute_dtype=opts.compute_dtype)
    report = merge_and_check(opts.adapter, opts.output, spec, opts.into, getattr(torch, opts.dtype), opts.device,
                             opts.tolerance)
    print(json.dumps(report, indent=2))
    if report.get("within_tolerance") is False:
        log.warning("merged logits differ from adapter-on-4-bit by up to %.4g (> %.4g x logit std %.4g)%s",
                    report["max_abs_logit_diff"], opts.tolerance, report["reference_logit_std"],
                    ": expected with --into original (the 4-bit quantization error)" if opts.into == "original"
                    else "")
    return report
