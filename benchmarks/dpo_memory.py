"""Peak GPU memory and step time of QLoRA SFT, DPO (live or precomputed reference), ORPO, SimPO and
KTO, Mistral-7B.

The Mistral-7B-v0.1 architecture (published dims: vocab 32000, hidden 4096, MLP 14336, 32
layers, 32 heads, 8 KV heads; ``make_arch.py``) with random weights, NF4 + double quant, bf16
compute, LoRA r=16 alpha=32 on all linear layers, gradient checkpointing, paged 8-bit AdamW,
bf16-mixed, batch 1, 512 tokens per sequence:

* ``sft``: ``SFTModule``, one 512-token sequence per step, every token labelled;
* ``dpo``: ``DPOModule``, one pair per step: chosen and rejected (128 prompt + 384 response
  tokens each) in one (2, 512) forward, plus a no-grad reference forward (adapter off);
* ``dpo_precomputed``: the same with ``precompute_ref_logps``: the reference runs once over
  the data before training (its peak is reported apart, as ``setup_peak_alloc_gib``) and each
  step runs the policy only;
* ``orpo`` / ``simpo``: ``DPOModule`` with ``loss_type`` ``orpo`` / ``simpo``: the same pairs, no
  reference at all (none built, none run);
* ``kto``: ``KTOModule`` (live reference, adapter off) on DPO's token budget: a batch of 2 rows of
  128 prompt + 384 response tokens, one desirable and one undesirable, plus their 2 mismatched
  (prompt, completion) KL pairs of the same length, as ``KTODataModule``'s collate builds them
  (each row takes the other's completion; the two rows have different prompts). Per step: one
  (2, 512) forward with gradients (the rows under the policy) and three without (the KL pairs
  under the policy, rows and KL pairs under the reference).

Each variant runs in its own process (peaks cannot leak between them), all from one command
(``--variants`` picks some, in the order given; default all).
``loaded_gib`` is the memory held once the model is built; ``peak_alloc_gib`` /
``peak_reserved_gib`` are the peaks over the training steps (after load and precompute); the
step time is the median after ``--warmup`` steps. Loss values on random weights mean nothing and
are not reported. Results: ``<out>/dpo_memory.json``.

    python benchmarks/dpo_memory.py --out benchmarks/results/dpo_memory  # GPU, ~5-8 minutes
    python benchmarks/dpo_memory.py --tiny --out /tmp/dpo_memory         # CPU dry run, tiny dims
    python benchmarks/dpo_memory.py --out benchmarks/results/kto_memory \
        --variants dpo kto                                               # two of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_arch beside this file, also in the worker processes

from make_arch import write_arch  # noqa: E402

GIB = 2**30
VARIANTS = ("sft", "dpo", "dpo_precomputed", "orpo", "simpo", "kto")


def _rows(args: argparse.Namespace, vocab: int) -> list[dict]:
    """Random-token pairs: ``prompt_len`` prompt tokens, then chosen / rejected responses filling
    ``seq``."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt_len = args.seq // 4
    draw = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(prompt_len) for _ in range(args.warmup + args.steps)]
    return [
        {
            "chosen_prompt_ids": prompt,
            "chosen_ids": draw(args.seq - prompt_len),
            "rejected_prompt_ids": prompt,
            "rejected_ids": draw(args.seq - prompt_len),
        }
        for prompt in prompts
    ]


def _unpaired(rows: list[dict]) -> list[list[dict]]:
    """KTO's rows, two per step: pair i's chosen response (desirable) after its prompt, its rejected
    response (undesirable) after the next pair's prompt, so that the KL pairs are real
    mismatches."""
    nexts = rows[1:] + rows[:1]
    return [
        [
            {
                "prompt_ids": row["chosen_prompt_ids"],
                "completion_ids": row["chosen_ids"],
                "label": True,
            },
            {
                "prompt_ids": nxt["rejected_prompt_ids"],
                "completion_ids": row["rejected_ids"],
                "label": False,
            },
        ]
        for row, nxt in zip(rows, nexts)
    ]


def _prebuilt(batches: list[dict]) -> dict:
    """``trainer.fit`` arguments training on these micro-batches, in order."""
    from torch.utils.data import DataLoader

    return {
        "train_dataloaders": DataLoader(batches, batch_size=None)
    }  # items are whole micro-batches


def run_variant(args: argparse.Namespace) -> dict:
    """Train ``args.variant`` for ``warmup + steps`` optimizer steps; its memory and speed."""
    import datasets
    import torch
    from lightning.pytorch import Callback, Trainer
    from transformers import AutoConfig

    import qlora_lightning
    from qlora_lightning import (
        BaseModelSpec,
        DPOModule,
        KTODataModule,
        KTOModule,
        LoraSpec,
        PerfMonitor,
        PreferenceDataModule,
        SFTModule,
    )

    on_cuda = torch.cuda.is_available()

    class SetupMemory(Callback):
        """Memory held once the model is built, and the peak of loading (+ precomputing), before
        training."""

        def on_train_start(self, trainer, pl_module):  # runs before PerfMonitor resets the peak
            self.loaded = torch.cuda.memory_allocated() / GIB if on_cuda else None
            self.peak = torch.cuda.max_memory_allocated() / GIB if on_cuda else None

    # The random-weight architecture folder has no tokenizer; the shipped tiny one provides the pad
    # id and is saved with the adapter (tokens are synthetic anyway).
    tokenizer = str(Path(qlora_lightning.__file__).parent / "assets" / "tiny-llama")
    base = BaseModelSpec(
        name_or_path=args.arch_dir,
        tokenizer=tokenizer,
        random_init=True,
        compute_dtype="bfloat16" if on_cuda else "float32",
    )
    common = dict(
        base=base,
        lora=LoraSpec(r=16, alpha=32, dropout=0.05),
        gradient_checkpointing=True,
        warmup_ratio=0.0,
    )
    if not on_cuda:  # paged optimizers need CUDA
        common["optimizer"] = lambda params: torch.optim.AdamW(params, lr=1e-4)
    vocab = AutoConfig.from_pretrained(args.arch_dir).vocab_size
    rows = _rows(args, vocab)
    data_args = dict(
        path="synthetic",
        tokenizer=qlora_lightning.load_tokenizer(tokenizer),
        max_seq_length=args.seq,
    )
    if args.variant == "sft":
        module = SFTModule(**common)
        fit_data = _prebuilt(
            [
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                for ids in (torch.tensor([r["chosen_prompt_ids"] + r["chosen_ids"]]) for r in rows)
            ]
        )
    elif args.variant == "kto":
        # Batches built by the data module's own collate, in order: the training loader would
        # shuffle the rows, and a batch could then hold two desirable rows.
        module = KTOModule(**common)
        collate = KTODataModule(**data_args, batch_size=2).collate
        fit_data = _prebuilt([collate(pair) for pair in _unpaired(rows)])
    else:
        loss = {"orpo": {"loss_type": "orpo"}, "simpo": {"loss_type": "simpo", "beta": 2.0}}.get(
            args.variant, {}
        )
        module = DPOModule(**common, precompute_ref_logps=args.variant == "dpo_precomputed", **loss)
        data = PreferenceDataModule(**data_args, batch_size=1)
        data.splits = {
            "train": datasets.Dataset.from_list(rows),
            "val": datasets.Dataset.from_list(rows[:1]),
        }
        fit_data = {"datamodule": data}  # setup() keeps splits that are already there
    setup_memory, monitor = SetupMemory(), PerfMonitor(warmup_steps=args.warmup)
    root = tempfile.mkdtemp(prefix="dpo-memory-")
    module.adapter_dir = str(Path(root) / "adapter")
    trainer = Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if on_cuda else "32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[setup_memory, monitor],
    )
    start = time.perf_counter()
    trainer.fit(module, **fit_data)
    summary = monitor.summary(trainer, module)
    peak = summary["peak_alloc_gib"]
    return {
        "variant": args.variant,
        "sequences_per_step": 1 if args.variant == "sft" else 2,
        "kl_sequences_per_step": 2
        if args.variant == "kto"
        else 0,  # KTO's mismatched pairs, no gradient
        "tokens_per_sequence": args.seq,
        "loaded_gib": setup_memory.loaded,
        "setup_peak_alloc_gib": setup_memory.peak,
        "peak_alloc_gib": peak if isinstance(peak, float) else None,
        "peak_reserved_gib": summary["peak_reserved_gib"] if isinstance(peak, float) else None,
        "step_time_s": summary["step_time_s"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "measured_steps": summary["measured_steps"],
        "fit_wall_s": time.perf_counter() - start,
        "device": summary["device"],
    }


def run_in_subprocess(args: argparse.Namespace, variant: str, arch_dir: Path) -> dict:
    """One variant in a fresh Python process; its result is the last ``RESULT {json}`` line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--arch-dir",
        str(arch_dir),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"variant": variant, "status": f"failed (exit {proc.returncode})", "output_tail": tail}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", help="folder for dpo_memory.json")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny dims and 64-token sequences (CPU dry run)"
    )
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (default 512; 64 with --tiny)"
    )
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=2, help="optimizer steps left out of the timing"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="variants to run, in this order (default: all)",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--arch-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    if not args.out:
        parser.error("--out is required")
    args.seq = args.seq or (64 if args.tiny else 512)
    arch_dir = write_arch(
        "mistral-7b", Path(tempfile.mkdtemp(prefix="dpo-memory-arch-")), tiny=args.tiny
    )
    results = []
    for variant in dict.fromkeys(args.variants):  # each once, in the order given
        print(f"running {variant} ...", flush=True)
        results.append(run_in_subprocess(args, variant, arch_dir))
        if "status" in results[-1]:
            print(results[-1]["output_tail"], file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "arch": "mistral-7b" + (" (tiny dims)" if args.tiny else ""),
        "batch": 1,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    (out / "dpo_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['arch']}, {args.seq} tokens per sequence, {args.steps} measured steps")
    print(
        f"{'variant':<16} {'seqs':>5} {'loaded GiB':>10} {'setup peak':>10} {'train peak':>10} "
        f"{'reserved':>9} {'step s':>7}"
    )
    for r in results:
        seqs = str(r.get("sequences_per_step", "-"))
        if r.get("kl_sequences_per_step"):  # kto: its rows + their KL pairs
            seqs += f"+{r['kl_sequences_per_step']}"
        print(
            f"{r['variant']:<16} {seqs:>5} {_fmt(r.get('loaded_gib')):>10} "
            f"{_fmt(r.get('setup_peak_alloc_gib')):>10} {_fmt(r.get('peak_alloc_gib')):>10} "
            f"{_fmt(r.get('peak_reserved_gib')):>9} {_fmt(r.get('step_time_s'), '.3f'):>7}  "
            f"{r.get('status', '')}"
        )
    print(f"wrote {out / 'dpo_memory.json'}")
    if any("status" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
