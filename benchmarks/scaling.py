"""Scaling of QLoRA training over GPUs: one GPU against DDP and FSDP, on Mistral-7B's architecture.

Random weights with the published dims (``make_arch.py``), NF4 + double quant, bf16 compute, LoRA
r=8 on all linear layers, the same per-GPU micro-batch and accumulation everywhere (weak scaling: N
GPUs process N times the tokens of one per step), ``SFTModule`` under a Lightning ``Trainer`` with
``PerfMonitor``:

* ``single``: one GPU, transformers' gradient checkpointing;
* ``ddp``: ``strategy: ddp`` on ``--gpus`` GPUs, each with the whole 4-bit base;
* ``fsdp``: the strategy of ``configs/mistral_fsdp.yaml`` (base, adapter and optimizer state
  sharded, FSDP's activation checkpointing on the decoder layers);
* ``reload``: the adapter the FSDP run saved, loaded on one GPU, gives the logits that the
  sharded model gave on a fixed batch.

Every run is its own process group, started with ``torchrun`` (as a multi-node launch would
start it); the whole run's numbers are PerfMonitor's medians over ``--steps`` optimizer steps after
``--warmup`` warm-up steps, summed over the ranks. Scaling efficiency = tokens/s on N GPUs / (N x
tokens/s on one). ``model GiB`` is what each rank holds once the strategy has placed the model
(the whole 4-bit base under DDP, a shard of it under FSDP). All runs use torch AdamW (the adapter's
optimizer step is negligible here), so
that only the strategy differs. Results: ``<out>/scaling.json`` and ``scaling.md``.

    python benchmarks/scaling.py --out /tmp/scaling              # 2 GPUs; 4 model loads of 7B
    python benchmarks/scaling.py --out /tmp/scaling --runs fsdp reload   # a part; the report merges
    python benchmarks/scaling.py --out /tmp/acc4 --runs single ddp \
        --accumulate 4                                           # all-reduce 1 in 4
    python benchmarks/scaling.py --tiny --out /tmp/dry           # CPU dry run over gloo, tiny dims

Loss values on random weights mean nothing and are not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # make_arch beside this file, also in the worker processes

from make_arch import ARCHS, write_arch  # noqa: E402

RUNS = ("single", "ddp", "fsdp", "reload")
FSDP_CONFIG = REPO / "configs" / "mistral_fsdp.yaml"
# The logits on this (2, 64) batch of token ids must agree within this fraction of their largest
# magnitude.
PROBE_SHAPE, LOGITS_TOLERANCE = (2, 64), 0.01


# ---- worker side: one run, in its own process (group) -------------------------------------


def _base(job: dict):
    from qlora_lightning import BaseModelSpec

    # fit saves a tokenizer with the adapter: the shipped tiny one (the arch folders hold none).
    tokenizer = str(REPO / "qlora_lightning" / "assets" / "tiny-llama")
    return BaseModelSpec(
        name_or_path=job["arch_dir"],
        tokenizer=tokenizer,
        random_init=True,
        compute_dtype="float32" if job["cpu"] else "bfloat16",
    )


def _probe(vocab: int):
    import torch

    return torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(1))


def prepare(job: dict) -> None:
    """Build and cache the random checkpoint once, so that the ranks of each run only load it."""
    from qlora_lightning.model.build import random_checkpoint

    print(random_checkpoint(_base(job)), flush=True)


def _strategy(job: dict):
    from lightning.pytorch.strategies import DDPStrategy

    from qlora_lightning.model.distributed import strategy_from_config

    if job["run"] == "single":
        return "auto"
    if job["run"] == "ddp":
        return DDPStrategy()
    overrides = {}
    # The adapters whole on each rank, outside FSDP's units.
    if job["fsdp_adapters"] == "replicated":
        overrides["auto_wrap_policy"] = {
            "class_path": "qlora_lightning.DecoderLayerPolicy",
            "init_args": {"adapters": False},
        }
    # Lightning allows FSDP on GPUs only; the test suite's subclass runs it over gloo.
    if job["cpu"]:
        sys.path.insert(0, str(REPO))
        from tests.distributed_worker import CPUFSDPStrategy

        return strategy_from_config(
            FSDP_CONFIG, CPUFSDPStrategy, process_group_backend="gloo", **overrides
        )
    return strategy_from_config(FSDP_CONFIG, **overrides)


def train(job: dict) -> None:
    """Fit ``warmup + steps`` optimizer steps on synthetic batches; rank 0 writes ``<run>.json``."""
    import functools

    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader
    from transformers import AutoConfig

    from qlora_lightning import LoraSpec, PerfMonitor, SFTModule

    out, run, devices = Path(job["out"]), job["run"], 1 if job["run"] == "single" else job["gpus"]
    module = SFTModule(
        base=_base(job),
        lora=LoraSpec(r=job["r"], alpha=2 * job["r"], dropout=0.05),
        gradient_checkpointing=True,
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-4),
        warmup_ratio=0.0,
    )
    module.adapter_dir = str(out / f"{run}_adapter")
    monitor = PerfMonitor(warmup_steps=job["warmup"])
    steps = job["warmup"] + job["steps"]
    trainer = Trainer(
        accelerator="cpu" if job["cpu"] else "gpu",
        devices=devices,
        strategy=_strategy(job),
        precision="32-true" if job["cpu"] else "bf16-mixed",
        max_steps=steps,
        accumulate_grad_batches=job["accumulate"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="scaling-"),
        callbacks=[monitor],
    )
    vocab = AutoConfig.from_pretrained(job["arch_dir"]).vocab_size
    # Whole micro-batches of random tokens, every one labelled; the distributed sampler deals each
    # rank its own `steps` of them.
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps * job["accumulate"] * devices):
        ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=generator)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))

    logits = None
    # Every rank takes part: the root FSDP unit gathers its weights in its forward.
    if run == "fsdp":
        model, probe = trainer.strategy.model, _probe(vocab).to(trainer.strategy.root_device)
        model.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            logits = model(probe, torch.ones_like(probe)).float().cpu()
    if trainer.is_global_zero:
        summary = monitor.summary(trainer, module)
        keys = (
            "world_size",
            "tokens_per_sec",
            "padded_tokens_per_sec",
            "samples_per_sec",
            "step_time_s",
            "mfu",
            "measured_steps",
            "peak_alloc_gib",
            "peak_reserved_gib",
            "peak_alloc_gib_per_rank",
            "peak_reserved_gib_per_rank",
            "model_alloc_gib_per_rank",
            "device",
        )
        (out / f"{run}.json").write_text(json.dumps({k: summary[k] for k in keys}, indent=2) + "\n")
        if logits is not None:
            torch.save(logits, out / "fsdp_logits.pt")


def reload(job: dict) -> None:
    """The FSDP run's adapter on one device: its logits on the probe batch against the sharded
    model's."""
    import torch
    from transformers import AutoConfig

    from qlora_lightning.model.build import LoraSpec, build_model

    out = Path(job["out"])
    device = torch.device("cpu" if job["cpu"] else "cuda:0")
    model = build_model(
        _base(job),
        LoraSpec(init_adapter=str(out / "fsdp_adapter")),
        gradient_checkpointing=False,
        device=device,
    ).eval()
    probe = _probe(AutoConfig.from_pretrained(job["arch_dir"]).vocab_size).to(device)
    # The autocast of Lightning's bf16-mixed, which the FSDP run's forward ran under.
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=not job["cpu"]):
        logits = model(input_ids=probe, attention_mask=torch.ones_like(probe)).logits.float().cpu()
    sharded = torch.load(out / "fsdp_logits.pt")
    diff = (logits - sharded).abs()
    scale = sharded.abs().max().item()
    result = {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logits_abs_max": scale,
        "argmax_agreement": (logits.argmax(-1) == sharded.argmax(-1)).float().mean().item(),
        "tolerance": LOGITS_TOLERANCE * scale,
    }
    result["same"] = result["max_abs_diff"] <= result["tolerance"]
    (out / "reload.json").write_text(json.dumps(result, indent=2) + "\n")


WORKERS = {"prepare": prepare, "train": train, "reload": reload}


# ---- orchestrator side --------------------------------------------------------------------


def command(job: dict, worker: str, processes: int = 1) -> list[str]:
    """The command line of one worker; several processes are started by torchrun, one per GPU."""
    script = [str(Path(__file__).resolve()), "--worker", worker, "--job", json.dumps(job)]
    if processes == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        *script,
    ]


def plan(args: argparse.Namespace, arch_dir: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each step this invocation runs, in order."""
    common = {
        "arch_dir": arch_dir,
        "out": str(Path(args.out).resolve()),
        "gpus": args.gpus,
        "batch": args.batch,
        "seq": args.seq,
        "accumulate": args.accumulate,
        "steps": args.steps,
        "warmup": args.warmup,
        "r": args.r,
        "cpu": args.tiny,
        "fsdp_adapters": args.fsdp_adapters,
    }
    # Tiny weights build in a blink in each process (random_checkpoint tolerates the race); 7B ones
    # once.
    steps = [] if args.tiny else [("prepare", command({**common, "run": "prepare"}, "prepare"))]
    for run in args.runs:
        if run == "reload":
            steps.append((run, command({**common, "run": run}, "reload")))
        else:
            steps.append(
                (run, command({**common, "run": run}, "train", 1 if run == "single" else args.gpus))
            )
    return steps


def scaling_rows(results: dict[str, dict]) -> list[dict]:
    """Per training run: tokens/s, per-GPU tokens/s and scaling efficiency against ``single``."""
    single = results.get("single", {}).get("tokens_per_sec")
    rows = []
    for run in ("single", "ddp", "fsdp"):
        r = results.get(run)
        if not r or r.get("tokens_per_sec") is None:
            continue
        gpus = r["world_size"]
        per_gpu = r["tokens_per_sec"] / gpus
        rows.append(
            {
                "run": run,
                "gpus": gpus,
                "tokens_per_sec": r["tokens_per_sec"],
                "tokens_per_sec_per_gpu": per_gpu,
                "scaling_efficiency": per_gpu / single if single else None,
                "step_time_s": r["step_time_s"],
                "mfu": r.get("mfu"),
                "peak_alloc_gib_per_rank": r["peak_alloc_gib_per_rank"],
                "peak_reserved_gib_per_rank": r["peak_reserved_gib_per_rank"],
                "model_alloc_gib_per_rank": r.get("model_alloc_gib_per_rank"),
            }
        )
    return rows


def _fmt(value, spec: str = ".2f") -> str:
    if isinstance(value, list):
        return " / ".join(_fmt(v, spec) for v in value)
    return "n/a" if not isinstance(value, (int, float)) else format(value, spec)


def markdown(meta: dict, rows: list[dict], reload_result: Optional[dict]) -> str:
    lines = [
        f"# QLoRA scaling, {meta['device']}",
        "",
        f"{meta['arch']} dims, random weights, NF4 + double quant, {meta['compute']} compute, LoRA "
        f"r={meta['r']} on all linear layers, {meta['batch']}x{meta['seq']} tokens per GPU per "
        f"micro-batch, {meta.get('accumulate', 1)} micro-batch(es) per optimizer step, median of "
        f"{meta['steps']} steps after {meta['warmup']} warm-up steps; command: "
        f"`{meta['command']}`.",
        "",
        "| run | GPUs | tokens/s | tokens/s per GPU | scaling efficiency | step s | MFU "
        "| model GiB per rank | peak alloc GiB per rank | peak reserved GiB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['gpus']} | {_fmt(r['tokens_per_sec'], '.0f')} | "
            f"{_fmt(r['tokens_per_sec_per_gpu'], '.0f')} | {_fmt(r['scaling_efficiency'], '.1%')} "
            f"| {_fmt(r['step_time_s'], '.3f')} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r.get('model_alloc_gib_per_rank'))} | {_fmt(r['peak_alloc_gib_per_rank'])} | "
            f"{_fmt(r['peak_reserved_gib_per_rank'])} |"
        )
    if reload_result:
        verdict = "same" if reload_result["same"] else "DIFFERENT"
        lines += [
            "",
            f"FSDP adapter reloaded on one device: logits {verdict} (max |diff| "
            f"{reload_result['max_abs_diff']:.3g}, tolerance {reload_result['tolerance']:.3g} = "
            f"{LOGITS_TOLERANCE:.0%} of max |logit| {reload_result['logits_abs_max']:.3g}; argmax "
            f"agreement {reload_result['argmax_agreement']:.1%}).",
        ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict) -> str:
    """Merge the runs' JSON files under ``out`` into scaling.json and scaling.md; return the
    markdown."""
    results = {
        run: json.loads((out / f"{run}.json").read_text())
        for run in RUNS
        if (out / f"{run}.json").is_file()
    }
    rows = scaling_rows(results)
    meta = {
        **meta,
        "device": next(
            (r["device"] for r in results.values() if "device" in r), meta.get("device")
        ),
    }
    (out / "scaling.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "reload": results.get("reload")}, indent=2) + "\n"
    )
    text = markdown(meta, rows, results.get("reload"))
    (out / "scaling.md").write_text(text)
    return text


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="benchmarks/results/scaling", help="folder for the results and the log"
    )
    parser.add_argument(
        "--gpus", type=int, default=2, help="GPUs (CPU processes with --tiny) for ddp and fsdp"
    )
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--arch", choices=list(ARCHS), default="mistral-7b")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up optimizer steps left out")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument(
        "--fsdp-adapters",
        choices=("units", "replicated"),
        default="units",
        help="fsdp: each LoRA matrix an FSDP unit (configs/mistral_fsdp.yaml), or the adapters "
        "whole on each rank outside FSDP (DecoderLayerPolicy(adapters=False))",
    )
    parser.add_argument(
        "--arch-root", help="folder for the arch config (reuse one to reuse its random weights)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny dims on the CPU, gloo (a dry run)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpus < 2 and not args.worker:
        parser.error("--gpus must be at least 2 (DDP and FSDP against one GPU)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return WORKERS[args.worker](json.loads(args.job))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch_root = Path(args.arch_root) if args.arch_root else out / "arch"
    arch_dir = str(write_arch(args.arch, arch_root, tiny=args.tiny))
    steps = plan(args, arch_dir)
    if args.dry_run:
        for name, cmd in steps:
            print(f"{name}: {' '.join(cmd)}")
        return
    # Tiny ranks share a few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.tiny else None
    meta = {
        "arch": args.arch + (" (tiny)" if args.tiny else ""),
        "compute": "fp32" if args.tiny else "bf16",
        "batch": args.batch,
        "seq": args.seq,
        "accumulate": args.accumulate,
        "steps": args.steps,
        "warmup": args.warmup,
        "r": args.r,
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": "cpu" if args.tiny else "gpu",
    }
    with open(out / "scaling.log", "a") as log:
        for name, cmd in steps:
            start = time.perf_counter()
            print(f"{name} ...", flush=True)
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"    exit {proc.returncode} ({time.perf_counter() - start:.0f} s)", flush=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed: see {out / 'scaling.log'}")
    print(write_report(out, meta))


if __name__ == "__main__":
    main()
