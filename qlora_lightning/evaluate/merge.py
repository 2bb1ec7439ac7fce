"""``python -m qlora_lightning merge``: adapter + base -> a standalone 16-bit Hugging Face model.

Two choices of the weights the adapter is merged into:

- ``dequantized`` (default): the NF4 weights the adapter was trained against, dequantized
  (transformers' ``dequantize``, i.e. ``bitsandbytes.functional.dequantize_4bit`` per layer).
  The merged model then computes what adapter-on-4-bit computes, up to rounding to ``--dtype``.
- ``original``: the checkpoint's own 16-bit weights. The adapter then meets weights it never
  saw (the 4-bit quantization error is gone), so outputs move by that error; sometimes better,
  never what was validated, so the check below fails it unless ``--allow-divergence``.

The merge runs in fp32 and rounds once to ``--dtype``. The check then runs three models on a
fixed set of real rows (shipped GSM8K, Guanaco and CodeAlpaca examples, rendered as training
renders them), one model in memory at a time:

- the reference: adapter-on-4-bit in its training compute dtype, as trained and validated;
- the rounding floor: the same unmerged model with ``--dtype`` as its compute dtype (adapter
  and unquantized weights cast too), i.e. what rounding to ``--dtype`` alone costs;
- the merged model.

Measures against the reference, each for the merged model and for the floor: mean KL divergence
of the next-token distributions per position, the share of positions whose greedy next token
differs, and the mean gap of the response tokens' log-likelihoods (the responses' perplexities
before and after are reported beside them). A measure fails when the merge's error
exceeds ``MARGIN`` times the floor's plus a small absolute slack (``SLACK``), since a correct
merge rounds differently from the floor but by as much. A failed check exits non-zero with one
line naming the measure and a setting that passes (tried in memory), and writes no model unless
``--allow-divergence``; ``merge_report.json`` holds every number and threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qlora_lightning.data.base import pad_batch
from qlora_lightning.data.codealpaca import CodeAlpacaDataModule
from qlora_lightning.data.formats import (
    DEFAULT_ROLES,
    alpaca_messages,
    gsm8k_messages,
    guanaco_messages,
)
from qlora_lightning.data.gsm8k import GSM8KDataModule
from qlora_lightning.data.guanaco import GuanacoDataModule
from qlora_lightning.data.tokenize import ChatFormat, tokenize_messages
from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.generation import inference_mode
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.model.adapters import read_base_spec
from qlora_lightning.model.build import (
    BaseModelSpec,
    ComputeDtype,
    load_base_model,
    load_tokenizer,
)
from qlora_lightning.paths import shipped

log = logging.getLogger(__name__)

Into = Literal["dequantized", "original"]

# The check's rows: held-out GSM8K rows and the shipped Guanaco and CodeAlpaca examples, each
# rendered with its DataModule's template, so the check sees text like the training data.
CHECK_ROWS_PER_SET = 4
_CHECK_SETS = (
    ("gsm8k_test.jsonl", gsm8k_messages, GSM8KDataModule),
    ("guanaco.jsonl", guanaco_messages, GuanacoDataModule),
    ("codealpaca.json", alpaca_messages, CodeAlpacaDataModule),
)
# a correct merge's error in units of the floor's (measured 0.9-1.1 in bf16 and fp16, tiny Llama)
MARGIN = 3.0
# What a float32 merge may differ by where the floor is zero: summation order (and one near-tie
# flipping one greedy token, added per check as 1 / positions).
SLACK = {"kl": 1e-5, "disagreement": 0.0, "response_nll_gap": 1e-4}


def base_spec_for(
    adapter_dir: Union[str, Path], base: Optional[str] = None, **overrides
) -> BaseModelSpec:
    """How to load the base of a saved adapter: the checkpoint PEFT recorded (or ``base``),
    quantized as in training (from the spec ``fit`` saved beside the adapter), then
    ``overrides``."""
    try:
        recorded = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    except (OSError, ValueError) as err:
        raise UserError(f"adapter '{adapter_dir}': {err}") from None
    name_or_path = base or recorded
    if not name_or_path:
        raise UserError(f"adapter '{adapter_dir}' records no base model; pass --base")
    saved = read_base_spec(adapter_dir) or {}
    spec = BaseModelSpec(
        name_or_path=name_or_path,
        # A random-init base was saved to, and recorded as, a real checkpoint.
        config_overrides={} if saved.get("random_init") else saved.get("config_overrides", {}),
        **{k: saved[k] for k in ("quantization", "double_quant", "compute_dtype") if k in saved},
    )
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def merge_adapter(
    adapter_dir: Union[str, Path],
    spec: BaseModelSpec,
    into: Into = "dequantized",
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
) -> PreTrainedModel:
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
            raise UserError(
                "the adapter was trained on a 16-bit base (quantization none): use --into original"
            )
        # fp32, so that base + update is rounded to `dtype` once, not twice.
        model = load_base_model(spec, device).dequantize(dtype=torch.float32)
    else:
        model = load_base_model(replace(spec, quantization="none", compute_dtype="float32"), device)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype)


def adapter_on_base(
    adapter_dir: Union[str, Path],
    spec: BaseModelSpec,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> PeftModel:
    """The adapter on its quantized base, as training and ``GSM8KEval`` run it; with ``dtype``,
    everything that is not 4-bit (adapter, embeddings, norms, the 4-bit matmuls' compute) in that
    dtype instead."""
    if dtype is None:
        return PeftModel.from_pretrained(load_base_model(spec, device), str(adapter_dir))
    name = cast(ComputeDtype, str(dtype).removeprefix("torch."))  # torch.float32 -> "float32"
    model = PeftModel.from_pretrained(
        load_base_model(replace(spec, compute_dtype=name), device), str(adapter_dir)
    )
    for param in model.parameters():
        if param.is_floating_point():  # the packed 4-bit weights are uint8: untouched
            param.data = param.data.to(dtype)
    return model


def check_batch(
    tokenizer: PreTrainedTokenizerBase, max_seq_length: int = 256
) -> dict[str, torch.Tensor]:
    """The check's (B, T) batch: ``input_ids``, ``attention_mask``, ``labels`` on the responses."""
    rows = []
    for name, to_messages, module in _CHECK_SETS:
        path = Path(shipped(f"qlora_lightning/assets/examples/{name}"))
        raw = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        )
        fmt = ChatFormat(module.default_user_template)
        rows += [
            tokenize_messages(to_messages(row, DEFAULT_ROLES), tokenizer, fmt, max_seq_length)
            for row in raw[:CHECK_ROWS_PER_SET]
        ]
    return pad_batch(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


@dataclass
class Outputs:
    """A model's outputs on the check batch, at its real positions only (N of them)."""

    log_probs: torch.Tensor  # (N, V) fp32 next-token log-probabilities
    targets: torch.Tensor  # (N,) the next token where it is a response token, else -100


def outputs_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Outputs:
    device = next(model.parameters()).device
    with inference_mode(model):
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits
    real = batch["attention_mask"].bool()
    targets = torch.cat(
        [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], dim=1
    )
    return Outputs(F.log_softmax(logits.float().cpu()[real], dim=-1), targets[real])


def _response_nll(out: Outputs) -> torch.Tensor:
    """(R,) negative log-likelihood of each response token."""
    scored = out.targets != IGNORE_INDEX
    return -out.log_probs[scored].gather(1, out.targets[scored, None]).squeeze(1)


def _perplexity(out: Outputs) -> float:
    return math.exp(_response_nll(out).mean().item())


def divergence(candidate: Outputs, reference: Outputs) -> dict[str, float]:
    """How far ``candidate`` is from ``reference``: mean KL(reference || candidate) per position,
    the share of positions whose greedy token differs, and the mean |difference| of each response
    token's NLL (per token, so that errors of both signs cannot cancel as they do in a
    perplexity)."""
    kl = F.kl_div(candidate.log_probs, reference.log_probs, log_target=True, reduction="none").sum(
        -1
    )
    flips = candidate.log_probs.argmax(-1) != reference.log_probs.argmax(-1)
    return {
        "kl": kl.mean().item(),
        "disagreement": flips.float().mean().item(),
        "response_nll_gap": (_response_nll(candidate) - _response_nll(reference))
        .abs()
        .mean()
        .item(),
    }


def verdict(merged: dict[str, float], floor: dict[str, float], positions: int) -> dict[str, dict]:
    """Per measure: the merge's error, the floor's, the limit (``MARGIN`` x floor + slack), pass or
    not."""
    slack = {**SLACK, "disagreement": 1 / positions}
    out = {}
    for measure, value in merged.items():
        limit = MARGIN * floor[measure] + slack[measure]
        out[measure] = {
            "merge": value,
            "floor": floor[measure],
            "limit": limit,
            "pass": value <= limit,
        }
    return out


def check_merge(
    merged: Outputs,
    adapter_dir: Union[str, Path],
    spec: BaseModelSpec,
    dtype: torch.dtype,
    batch: dict[str, torch.Tensor],
    device: Union[str, torch.device] = "cpu",
    reference: Optional[Outputs] = None,
) -> tuple[dict, Outputs]:
    """The check's report for merged outputs (and the reference's outputs, to reuse for another
    merge)."""
    if reference is None:
        reference = outputs_on(adapter_on_base(adapter_dir, spec, device), batch)
    floor = outputs_on(adapter_on_base(adapter_dir, spec, device, dtype=dtype), batch)
    measures = verdict(
        divergence(merged, reference), divergence(floor, reference), merged.targets.numel()
    )
    report = {
        "measures": measures,
        "response_perplexity": {
            "reference": _perplexity(reference),
            "floor": _perplexity(floor),
            "merged": _perplexity(merged),
        },
        "positions": int(merged.targets.numel()),
        "passed": all(m["pass"] for m in measures.values()),
    }
    return report, reference


def merge_and_check(
    adapter_dir: Union[str, Path],
    output: Union[str, Path],
    spec: BaseModelSpec,
    into: Into = "dequantized",
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    allow_divergence: bool = False,
) -> dict:
    """Merge, check against adapter-on-4-bit, and save the model, tokenizer and
    ``merge_report.json`` to ``output``.

    The merged model is saved to ``<output>.partial`` and freed before the reference is loaded
    (never two models in memory); it becomes ``output`` when the check passes or divergence is
    allowed, and is deleted otherwise.

    Raises:
        UserError: the check failed (and divergence is not allowed): which measure, and what passes.
    """
    output = Path(output)
    tokenizer_source = (
        adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else spec.name_or_path
    )
    tokenizer = load_tokenizer(str(tokenizer_source))
    batch = check_batch(tokenizer)
    partial = output.with_name(output.name + ".partial")
    merged = merge_adapter(adapter_dir, spec, into, dtype, device)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    merged_outputs = outputs_on(merged, batch)
    del merged
    report: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "base": spec.name_or_path,
        "into": into,
        "dtype": str(dtype),
        "quantization": spec.quantization,
        "output": str(output),
        "margin": MARGIN,
        "slack": SLACK,
    }
    # A 16-bit base: the merge is exact up to rounding, nothing to compare.
    if spec.quantization == "none":
        report["passed"] = None
    else:
        check, reference = check_merge(merged_outputs, adapter_dir, spec, dtype, batch, device)
        report.update(check)
        if not report["passed"]:
            report["passes_instead"] = _what_passes(
                adapter_dir, spec, into, dtype, batch, device, reference
            )
    failed = [name for name, m in report.get("measures", {}).items() if not m["pass"]]
    if failed and not allow_divergence:
        shutil.rmtree(partial)
        print(json.dumps(report, indent=2))
        raise UserError(_failure_line(report, failed))
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
    (output / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        log.warning(
            "merge check failed (%s), written anyway (--allow-divergence)", ", ".join(failed)
        )
    return report


def _what_passes(
    adapter_dir,
    spec: BaseModelSpec,
    into: Into,
    dtype: torch.dtype,
    batch,
    device,
    reference: Outputs,
) -> Optional[str]:
    """The first of the likelier fixes whose merge passes the check (tried in memory), as CLI
    options."""
    tries: list[tuple[Into, torch.dtype]] = (
        [("dequantized", dtype), ("dequantized", torch.float32)]
        if into == "original"
        else [("dequantized", torch.float32)]
        if dtype != torch.float32
        else []
    )
    for other_into, other_dtype in tries:
        merged = outputs_on(
            merge_adapter(adapter_dir, spec, other_into, other_dtype, device), batch
        )
        if check_merge(merged, adapter_dir, spec, other_dtype, batch, device, reference)[0][
            "passed"
        ]:
            return f"--into {other_into} --dtype {str(other_dtype).removeprefix('torch.')}"
    return None


def _failure_line(report: dict, failed: list[str]) -> str:
    worst = ", ".join(
        f"{name} {report['measures'][name]['merge']:.3g} > limit "
        f"{report['measures'][name]['limit']:.3g}"
        for name in failed
    )
    fix = report.get("passes_instead")
    hint = (
        f"{fix} passes"
        if fix
        else "no other dtype or --into passes: the adapter does not fit this base"
    )
    dtype = report["dtype"].removeprefix("torch.")
    return (
        f"merge check failed against adapter-on-4-bit ({worst}; limits: {MARGIN:g}x the floor of "
        f"{dtype} rounding): {hint}; nothing written (--allow-divergence writes it anyway)"
    )


def parse_args(args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_lightning merge", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--adapter", required=True, help="directory of the saved PEFT adapter")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument(
        "--into",
        choices=["dequantized", "original"],
        default="dequantized",
        help="merge into the dequantized 4-bit weights (what the adapter was trained against) "
        "or into the original 16-bit weights (default: dequantized)",
    )
    parser.add_argument(
        "--base", help="base model id or directory (default: the one the adapter records)"
    )
    parser.add_argument(
        "--quantization",
        choices=["nf4", "fp4", "int8", "none"],
        help="how the base was quantized in training (default: as saved by fit, else nf4)",
    )
    parser.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether training used double quantization (default: as saved by fit, else yes)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype of training (default: as saved by fit, else bfloat16)",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the merged model (default: bfloat16)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to load and merge (default: cuda when available)",
    )
    parser.add_argument(
        "--allow-divergence",
        action="store_true",
        help="write the merged model even when the check against adapter-on-4-bit fails",
    )
    parser.add_argument(
        "--push_to_hub",
        "--push-to-hub",
        dest="push_to_hub",
        metavar="ORG/NAME",
        help="upload the merged folder (with its README.md model card) to this Hugging Face model "
        "repository (created if absent)",
    )
    return parser.parse_args(args)


def main(args: Optional[Sequence[str]] = None) -> dict:
    """Run the merge CLI; print the report; return it (a failed check raises ``UserError``: exit
    1)."""
    from qlora_lightning.evaluate import card as model_card

    opts = parse_args(args)
    if opts.push_to_hub:
        model_card.check_repo_id(opts.push_to_hub)
    spec = base_spec_for(
        opts.adapter,
        opts.base,
        quantization=opts.quantization,
        double_quant=opts.double_quant,
        compute_dtype=opts.compute_dtype,
    )
    report = merge_and_check(
        opts.adapter,
        opts.output,
        spec,
        opts.into,
        getattr(torch, opts.dtype),
        opts.device,
        opts.allow_divergence,
    )
    model_card.write_merged_card(opts.output, opts.adapter, report, opts.push_to_hub)
    print(json.dumps(report, indent=2))
    if opts.push_to_hub:
        model_card.push_folder(
            opts.output, opts.push_to_hub, f"merged adapter {Path(opts.adapter).name}"
        )
    return report
