"""Packed against padded SFT batches: padded-token fraction and non-pad tokens/s.

GSM8K train rows (``../shared/datasets/gsm8k/train.jsonl``) with the Mistral tokenizer, at
``max_seq_length`` 1024, on the Mistral-7B architecture (published dims from ``make_arch.py``,
random weights, NF4 through the normal loading path), trained through the project's real path:
``GSM8KDataModule`` -> ``SFTModule`` -> Lightning ``Trainer`` (bf16-mixed on a GPU) ->
``PerfMonitor``.

Every layout trains one epoch over the *same* examples (``num_samples`` drawn with one seed):

* ``off``: one example per row, ``--batch-size`` rows padded to the longest;
* ``padded``: best-fit packs of up to 1024 tokens, ``--pack-batch-size`` packs per micro-batch,
  padded to the longest pack (sdpa keeps examples apart through a block-diagonal mask);
* ``padding_free``: the same packs flattened into one row (varlen flash attention's layout; with
  sdpa it is exact but its mask spans the whole row).

The padded-token fraction is counted over every batch of the epoch; tokens/s is real (non-pad)
tokens over the wall time of the optimizer steps after ``--warmup`` steps (GPU synchronized
before each clock read, by PerfMonitor). The base model is loaded once and shared by the
layouts (its weights do not change speed). Loss on random weights means nothing: not reported.

    python benchmarks/packing.py --out benchmarks/results/packing          # GPU, about 5-10 minutes
    python benchmarks/packing.py --tiny --out /tmp/packing-tiny            # CPU dry run, tiny dims
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_arch beside this file

from make_arch import write_arch  # noqa: E402
from report import fmt  # noqa: E402

SHARED = HERE.parents[1] / "shared"
LAYOUTS = ("off", "padded", "padding_free")


def datamodule(args: argparse.Namespace, layout: str):
    """GSM8K rows tokenized with the Mistral tokenizer, in ``layout``; the same examples for every
    layout."""
    from qlora_lightning import GSM8KDataModule

    dm = GSM8KDataModule(
        path=args.data,
        tokenizer=args.tokenizer,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size if layout == "off" else args.pack_batch_size,
        num_samples=args.num_examples,
        num_val_samples=1,
        seed=0,
        packing=layout,
    )
    dm.setup()
    return dm


def padding_of(dm) -> dict:
    """Real and padded tokens over every batch of one epoch, and how many examples it holds."""
    from qlora_lightning.data.packing import real_tokens_and_examples

    real = total = examples = 0
    for batch in dm.train_dataloader():
        n_real, n_examples = real_tokens_and_examples(batch)
        real, total, examples = (
            real + int(n_real),
            total + batch["input_ids"].numel(),
            examples + n_examples,
        )
    return {
        "examples": examples,
        "real_tokens": real,
        "padded_tokens": total,
        "padded_token_fraction": 1.0 - real / total,
    }


def train(args: argparse.Namespace, dm, model: torch.nn.Module | None, root: Path):
    """One epoch of SFT over ``dm`` through the Trainer; the module (holding the model) and the
    monitor."""
    from lightning.pytorch import Trainer

    from qlora_lightning import BaseModelSpec, LoraSpec, PerfMonitor, SFTModule

    on_gpu = torch.cuda.is_available()
    # The tokenizer's vocab.
    base = BaseModelSpec(
        name_or_path=args.arch_dir,
        tokenizer=args.tokenizer,
        random_init=True,
        compute_dtype="bfloat16" if on_gpu else "float32",
        attn_implementation=args.attn,
        config_overrides={"vocab_size": 32000} if args.tiny else {},
    )
    # Paged Adam needs CUDA.
    kwargs = {} if on_gpu else {"optimizer": functools.partial(torch.optim.AdamW, lr=2e-4)}
    module = SFTModule(
        base=base,
        lora=LoraSpec(r=16, alpha=32, dropout=0.05),
        gradient_checkpointing=True,
        warmup_ratio=0.0,
        adapter_dir=str(root / "adapter"),
        **kwargs,
    )
    # None: configure_model builds it; else the base loaded by an earlier layout.
    module.model = model
    monitor = PerfMonitor(warmup_steps=args.warmup)
    trainer = Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if on_gpu else "32-true",
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=dm)
    return module, monitor.summary(trainer, module), monitor.steps


def throughput(steps: list[dict]) -> dict:
    """Real tokens / s and examples / s over all measured steps (totals, not a median of ratios)."""
    seconds = sum(s["perf/step_time_s"] for s in steps)
    if not seconds:
        return {"tokens_per_sec": None, "samples_per_sec": None, "measured_steps": 0}
    real = sum(s["perf/tokens_per_sec"] * s["perf/step_time_s"] for s in steps)
    samples = sum(s["perf/samples_per_sec"] * s["perf/step_time_s"] for s in steps)
    return {
        "tokens_per_sec": real / seconds,
        "samples_per_sec": samples / seconds,
        "measured_steps": len(steps),
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    """One table: a row per layout, the speed-up against ``off``."""
    ref = next((r for r in rows if r["layout"] == "off" and r["tokens_per_sec"]), None)
    lines = [
        f"# Packing benchmark, {meta['device']}",
        "",
        f"{meta['arch']} (random weights, NF4, LoRA r=16 on all linear layers, gradient "
        f"checkpointing, attention `{meta['attn']}`), GSM8K train, {meta['num_examples']} "
        f"examples, max_seq_length {meta['max_seq_length']}, one epoch per layout; tokens/s = "
        f"non-pad tokens over the optimizer steps after {meta['warmup']} warm-up steps. Command: "
        f"`{meta['command']}`. Loss: n/a (random weights).",
        "",
        "| layout | rows x micro-batch | steps | padded-token fraction | non-pad tokens/s | x off "
        "| examples/s | epoch s | peak alloc GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_sec"] / ref["tokens_per_sec"] if ref and r["tokens_per_sec"] else None
        peak = r["peak_alloc_gib"] if isinstance(r["peak_alloc_gib"], float) else None
        lines.append(
            f"| {r['layout']} | {r['micro_batch']} | {r['optimizer_steps']} | "
            f"{r['padded_token_fraction']:.3f} | {fmt(r['tokens_per_sec'], '.0f')} | "
            f"{fmt(ratio, '.2f')} | {fmt(r['samples_per_sec'], '.2f')} | "
            f"{fmt(r['train_time_s'], '.1f')} | {fmt(peak, '.2f')} |"
        )
    lines += [
        "",
        "rows x micro-batch: examples (off) or packs of up to max_seq_length tokens (padded, "
        "padding_free; padding_free lays them out as one row) per micro-batch. Every layout sees "
        "the same examples.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Packed against padded SFT batches (see the module docstring)"
    )
    parser.add_argument(
        "--out", default="benchmarks/results/packing", help="folder for packing.{json,md}"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny Mistral dims and few examples (CPU dry run)"
    )
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument(
        "--num-examples", type=int, help="GSM8K rows per layout (default 1024; 64 with --tiny)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="examples per micro-batch without packing"
    )
    parser.add_argument(
        "--pack-batch-size", type=int, default=4, help="packs per micro-batch with packing"
    )
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument(
        "--warmup", type=int, help="optimizer steps left out of tokens/s (default 3; 1 with --tiny)"
    )
    parser.add_argument(
        "--attn", default="sdpa", help="attention backend (sdpa, eager, flash_attention_2, ...)"
    )
    parser.add_argument("--data", default=str(SHARED / "datasets" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "mistral-7b-v0.1"))
    parser.add_argument(
        "--arch-root", help="folder for the arch config (reuse one to reuse its random weights)"
    )
    args = parser.parse_args()
    args.num_examples = args.num_examples or (64 if args.tiny else 1024)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    for path in (args.data, args.tokenizer):
        if not Path(path).exists():
            parser.error(
                f"{path} does not exist (the real data lives in ../shared beside the checkout)"
            )
    if args.attn.startswith("flash") and "padded" in args.layouts:
        parser.error(
            "--attn flash_*: the 'padded' layout would let examples see each other; drop it"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch_root = Path(args.arch_root) if args.arch_root else Path(tempfile.mkdtemp(prefix="archs-"))
    args.arch_dir = str(write_arch("mistral-7b", arch_root, tiny=args.tiny))
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "arch": "Mistral-7B dims" if not args.tiny else "Mistral, tiny dims",
        "attn": args.attn,
        "num_examples": args.num_examples,
        "max_seq_length": args.max_seq_length,
        "warmup": args.warmup,
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows, model = [], None
    for layout in args.layouts:
        dm = datamodule(args, layout)
        padding = padding_of(dm)
        print(
            f"{layout}: {padding['examples']} examples, padded-token fraction "
            f"{padding['padded_token_fraction']:.3f}; training ...",
            flush=True,
        )
        module, summary, steps = train(
            args, dm, model, Path(tempfile.mkdtemp(prefix=f"packing-{layout}-"))
        )
        model = module.model
        rows.append(
            {
                "layout": layout,
                **padding,
                **throughput(steps),
                "micro_batch": args.batch_size if layout == "off" else args.pack_batch_size,
                "optimizer_steps": summary["optimizer_steps"],
                "train_time_s": summary["train_time_s"],
                "median_step_tokens_per_sec": summary["tokens_per_sec"],
                "mfu": summary["mfu"],
                "peak_alloc_gib": summary["peak_alloc_gib"],
                "peak_reserved_gib": summary["peak_reserved_gib"],
            }
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (out / "packing.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n"
        )
        (out / "packing.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
