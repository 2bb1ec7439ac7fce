"""Greedy generation speed: NF4 base + unmerged LoRA adapter against the merged bf16 model.

The Mistral-7B architecture (published dims from ``make_arch.py``: vocab 32000, hidden 4096, MLP
14336, 32 layers, 32 heads, 8 KV heads), random weights, loaded through the normal quantized path.
A LoRA adapter (r=16, all linear layers, non-zero B) is saved and then served two ways:

* ``nf4+lora``: the adapter on the 4-bit base, as training and ``GSM8KEval`` run it (every matmul
  dequantizes its NF4 weight, plus the two LoRA matmuls);
* ``merged-bf16``: ``merge.merge_adapter`` into the dequantized weights, a plain bf16 model.

Each is timed at batch 1 and 16: ``--prompt-len`` random prompt tokens, exactly ``--new-tokens``
generated (no EOS stop), KV cache on, greedy. One untimed warm-up generation per (model, batch),
then ``--repeats`` timed ones; the GPU is synchronized before every clock read and the median is
reported. Prefill is timed apart (a one-token generation), so decode speed is
``batch * (new_tokens - 1) / (total - prefill)``. Peak allocated memory is reset per model.

    python benchmarks/generation.py --out benchmarks/results/generation  # GPU, about 5-10 minutes
    python benchmarks/generation.py --tiny --out /tmp/generation-tiny    # CPU dry run, tiny dims
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_arch beside this file

from make_arch import write_arch  # noqa: E402

_GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, repeats: int
) -> float:
    """Median wall seconds of ``repeats`` greedy generations of exactly ``new_tokens`` tokens, after
    a warm-up."""
    from transformers import GenerationConfig

    from qlora_lightning.evaluate.generation import inference_mode

    # eos_token_id None: nothing stops a row early, so every run generates the same number of
    # tokens.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    mask = torch.ones_like(input_ids)
    times = []
    with inference_mode(model):
        for run in range(repeats + 1):
            sync(input_ids.device)
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            sync(input_ids.device)
            if run:  # run 0 warms up kernels and the allocator
                times.append(time.perf_counter() - start)
            assert out.shape[1] == input_ids.shape[1] + new_tokens
    return statistics.median(times)


def measure(
    model: torch.nn.Module, name: str, args: argparse.Namespace, vocab: int, device: torch.device
) -> list[dict]:
    """Prefill and full-generation times of ``model`` at each batch size, as result rows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=generator).to(device)
        prefill = time_generate(model, ids, 1, args.repeats)
        total = time_generate(model, ids, args.new_tokens, args.repeats)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "prefill_s": prefill,
                "total_s": total,
                "tokens_per_s": batch * args.new_tokens / total,
                "decode_tokens_per_s": batch * (args.new_tokens - 1) / max(total - prefill, 1e-9),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    peak = torch.cuda.max_memory_allocated(device) / _GIB if device.type == "cuda" else None
    for row in rows:
        row["peak_alloc_gib"] = peak
    return rows


def make_adapter(spec, path: Path, device: torch.device) -> None:
    """Save a LoRA adapter (r=16, all linear layers) with a non-zero B, so merging really changes
    weights."""
    from qlora_lightning.model.build import LoraSpec, build_model

    torch.manual_seed(0)
    model = build_model(
        spec, LoraSpec(r=16, alpha=32, dropout=0.0), gradient_checkpointing=False, device=device
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    model.save_pretrained(path)
    del model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for generation.json")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny dims on the CPU (a dry run that the code works)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompt_len, args.new_tokens, args.repeats = (
            min(args.prompt_len, 16),
            min(args.new_tokens, 8),
            1,
        )

    from qlora_lightning.evaluate.merge import adapter_on_base, merge_adapter
    from qlora_lightning.model.build import BaseModelSpec

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="generation-bench-"))
    arch = write_arch("mistral-7b", work / "arch", tiny=args.tiny)
    spec = BaseModelSpec(
        name_or_path=str(arch),
        random_init=True,
        quantization="nf4",
        double_quant=True,
        compute_dtype="bfloat16",
    )
    make_adapter(spec, work / "adapter", device)
    gc.collect()
    vocab = json.loads((arch / "config.json").read_text())["vocab_size"]
    # The random checkpoint the adapter records: both servings load exactly these weights.
    spec = BaseModelSpec(
        name_or_path=json.loads((work / "adapter" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ],
        quantization="nf4",
        double_quant=True,
        compute_dtype="bfloat16",
    )

    results = []
    model = adapter_on_base(work / "adapter", spec, device)
    results += measure(model, "nf4+lora", args, vocab, device)
    del model
    # PEFT wrappers hold reference cycles: without this the 4-bit model would count in the next peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = merge_adapter(work / "adapter", spec, "dequantized", torch.bfloat16, device)
    results += measure(model, "merged-bf16", args, vocab, device)

    report = {
        "arch": "mistral-7b" + (" (tiny dims)" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "results": results,
    }
    (out / "generation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'generation.json'}")
    return report


if __name__ == "__main__":
    main()
