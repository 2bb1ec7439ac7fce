"""Speed and memory of QLoRA training: the project's Lightning path against plain transformers +
PEFT.

For each architecture (published dims, random weights, NF4-quantized through the normal
loading path) and each batch shape, in one command:

* ``project/<variant>``: ``SFTModule`` under a Lightning ``Trainer`` (bf16-mixed) with
  ``PerfMonitor``, on fixed-length synthetic token batches; the variants switch the
  speed/memory levers (gradient checkpointing, chunked loss, Liger kernels, compiled layers);
* ``hf_peft``: the usual recipe in a plain PyTorch loop: NF4 + double quant, bf16 compute,
  LoRA r=16 alpha=32 on all linear layers, gradient checkpointing, bf16 autocast,
  bitsandbytes PagedAdamW8bit, loss from ``labels`` inside the model;
* ``unsloth``: Unsloth's ``FastLanguageModel`` in the same loop, when it is installed
  (``--no-peer`` skips it).

Every configuration runs in its own process (memory peaks cannot leak between them); the
step time is the median of ``--steps`` optimizer steps after ``--warmup`` warm-up steps, with
the GPU synchronized before each clock read. Each step's time is kept with what else happened in
it (``step_stalls.py``); the report lists the slow steps. Results go to ``<out>/harness.json``,
``harness.md`` and ``harness.png`` (when matplotlib is there), rewritten after each run.

    python benchmarks/harness.py --quick --out /tmp/bench            # one ~10-minute GPU command
    python benchmarks/harness.py --goals --archs mistral-7b --no-peer \
        --out /tmp/goals                                             # its goals, met or not
    python benchmarks/harness.py --archs gemma-7b --shapes 8x1024 --variants default chunked_ce
    python benchmarks/harness.py --archs llama-2-7b --shapes 1x512 --variants default eager \
        --repeat 3
    python benchmarks/harness.py --original --out /tmp/orig          # the original T4 experiments
    python benchmarks/harness.py --tiny --quick --out /tmp/dry       # CPU dry run, tiny dims
    python benchmarks/harness.py --report benchmarks/results/X.json  # re-render a saved run

Loss values on random weights mean nothing and are never reported. Beside this file: ``levers.py``
(the variants), ``goals.py`` (the issue's targets, the original experiments), ``make_arch.py`` (the
random-weight models), ``kernel_profile.py`` (``--profile``), ``step_stalls.py`` and ``report.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_arch beside this file, also in the worker processes

from goals import GOALS, ORIGINAL  # noqa: E402
from kernel_profile import PROFILED_STEPS, StepProfiler  # noqa: E402
from levers import BASELINE, LEVERS, PEER, VARIANTS  # noqa: E402
from make_arch import ARCHS, write_arch  # noqa: E402
from report import fmt, write_reports  # noqa: E402
from step_stalls import StepStalls  # noqa: E402

GIB = 2**30

QUICK = {"archs": ["mistral-7b", "llama-2-7b"], "shapes": ["1x512", "8x1024"]}
# Levers measured in --quick mode, at one shape of the first arch (a whole grid does not fit 10
# minutes): the README's path for batches of thousands of tokens (nine jobs of 45-75 s each on an
# H200; Unsloth adds four).
QUICK_LEVERS = {
    "arch": "mistral-7b",
    "shape": "8x1024",
    "variants": ["offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw"],
}
QUICK_BUDGET_S = 540.0  # the jobs that would not fit are listed as skipped
FULL_SHAPES = ["1x512", "8x1024", "4x2048"]
LONG_SHAPES = ["1x8192", "1x16384", "1x32768"]  # Mistral only: 32k positions, sliding window 4096


@dataclass
class Job:
    """One measured configuration, run in its own process."""

    arch: str
    batch: int
    seq: int
    impl: str  # "project", BASELINE or PEER
    variant: str  # a VARIANTS key, or BASELINE
    arch_dir: str
    r: int = 16
    alpha: int = 32
    accumulate: int = 1
    steps: int = 8
    warmup: int = 4
    experiment: Optional[str] = None
    options: dict = field(default_factory=dict)
    round: int = 0  # of --repeat
    profile: bool = False  # trace the GPU kernels of the last PROFILED_STEPS measured steps
    profile_host: bool = False  # and the host's work (a diagnostic: it slows the steps it traces)
    # Where the profiled steps' Chrome trace goes, gzipped (implies profile)
    trace_dir: Optional[str] = None

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq}"


# ---- worker side: one configuration, in a fresh process -----------------------------------


def synthetic_batches(job: Job, vocab: int) -> list[dict]:
    """Fixed-length random-token micro-batches, every token labelled (no padding, no prompt)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = (job.warmup + job.steps) * job.accumulate
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (job.batch, job.seq), generator=g)
        # With the host-side counts that the DataModules' batches carry.
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                "num_real_tokens": ids.numel(),
                "num_examples": job.batch,
            }
        )
    return out


def run_project(job: Job) -> dict:
    """The project's training path: SFTModule + Lightning Trainer + PerfMonitor."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader
    from transformers import AutoConfig

    import qlora_lightning
    from qlora_lightning import BaseModelSpec, FreezeHeap, LoraSpec, PerfMonitor, SFTModule

    class LoadedMemory(Callback):
        """GPU memory held once the model is built, before the optimizer state and activations."""

        def on_train_start(self, trainer, pl_module):
            self.gib = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None

    class WallClock(Callback):
        """Host wall time over the measured steps, the GPU synchronized at both ends: a check on
        PerfMonitor's median, which is timed by GPU events without synchronizing."""

        seconds = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == job.warmup and (batch_idx + 1) % job.accumulate == 0:
                self.start = self._now()

        def on_train_end(self, trainer, pl_module):
            self.seconds = self._now() - self.start

        @staticmethod
        def _now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

    class StepEnd(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % job.accumulate == 0:
                profiler.step()
                stalls.mark()

    profiler = StepProfiler(job)

    from qlora_lightning.modules.base import paged_adamw_8bit
    from qlora_lightning.speed.optim import AdamW8bit

    OPTIMIZERS = {
        "paged_adamw_8bit": paged_adamw_8bit,
        "adamw_8bit": lambda params: AdamW8bit(params, lr=2e-4),
        "fused_adamw": lambda params: torch.optim.AdamW(params, lr=2e-4, fused=True),
    }
    opts = {**LEVERS, **job.options}  # rows saved before a lever existed did not set it
    # The adapter is saved with a tokenizer at the end of fit; the shipped tiny one does, as the
    # random-weight architecture folders hold none (tokens are synthetic anyway).
    tokenizer = str(Path(qlora_lightning.__file__).parent / "assets" / "tiny-llama")
    base = BaseModelSpec(
        name_or_path=job.arch_dir,
        tokenizer=tokenizer,
        random_init=True,
        liger_kernel=opts["liger_kernel"],
        upcast_frozen=opts["upcast_frozen"],
        attn_implementation=opts["attn_implementation"],
        compile_layers=opts["compile_layers"],
        compile_scope=opts["compile_scope"],
        cpu_embeddings=opts["cpu_embeddings"],
    )
    module = SFTModule(
        base=base,
        lora=LoraSpec(
            r=job.r,
            alpha=job.alpha,
            dropout=opts["lora_dropout"],
            lean_forward=opts["lean_forward"],
            skip_last_recompute=opts["skip_last_recompute"],
            compiled_dequant_tokens=opts["compiled_dequant_tokens"],
        ),
        gradient_checkpointing=opts["gradient_checkpointing"],
        loss_chunk_size=opts["loss_chunk_size"],
        warmup_ratio=0.0,
        optimizer=OPTIMIZERS[opts["optimizer"]],
    )
    monitor, loaded, wall = PerfMonitor(warmup_steps=job.warmup), LoadedMemory(), WallClock()
    root = tempfile.mkdtemp(prefix="bench-")
    module.adapter_dir = str(Path(root) / "adapter")
    callbacks = [monitor, loaded, wall, StepEnd()] + ([FreezeHeap()] if opts["freeze_heap"] else [])
    trainer = Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed",
        max_steps=job.warmup + job.steps,
        accumulate_grad_batches=job.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    vocab = AutoConfig.from_pretrained(job.arch_dir).vocab_size
    # Items are whole micro-batches, pinned as the DataModules' loaders pin them on a GPU.
    loader = DataLoader(
        synthetic_batches(job, vocab), batch_size=None, pin_memory=torch.cuda.is_available()
    )
    stalls = StepStalls(torch.cuda.is_available())
    trainer.fit(module, train_dataloaders=loader)
    s = monitor.summary(trainer, module)
    peak = s["peak_alloc_gib"]
    return {
        "step_time_s": s["step_time_s"],
        "tokens_per_sec": s["tokens_per_sec"],
        "mfu": s["mfu"],
        "peak_alloc_gib": peak if isinstance(peak, float) else None,
        "peak_reserved_gib": s["peak_reserved_gib"] if isinstance(peak, float) else None,
        "loaded_gib": loaded.gib,
        "measured_steps": s["measured_steps"],
        "profile": profiler.result(),
        "wall_tokens_per_sec": job.steps * job.accumulate * job.batch * job.seq / wall.seconds,
        "step_times_s": [round(m["perf/step_time_s"], 4) for m in monitor.steps],
        # With the GPU's waits for offloaded activations (PerfMonitor's perf/offload_wait_s).
        "step_stalls": [
            {**record, "offload_wait_s": m.get("perf/offload_wait_s", 0.0)}
            for record, m in zip(stalls.finish(len(monitor.steps)), monitor.steps)
        ],
    }


def run_baseline(job: Job) -> dict:
    """Plain transformers + PEFT + bitsandbytes in a hand-written loop, on the same random
    weights."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        _checkpoint(job),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": str(device)},
        attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=job.r,
            lora_alpha=job.alpha,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    return plain_loop(model, job, device)


def run_peer(job: Job) -> dict:
    """Unsloth's own path (``FastLanguageModel``: its kernels, offloaded checkpointing), same loop
    and data.

    Unsloth patches transformers when imported, so this runs only in a worker process of its own.
    LoRA dropout is 0, the setting its fused LoRA kernels need (with dropout it falls back to
    slower code); the other settings are the baseline's.
    """
    import shutil

    import torch
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    import qlora_lightning

    checkpoint = Path(_checkpoint(job))
    if not (
        checkpoint / "tokenizer_config.json"
    ).is_file():  # it loads a tokenizer from the model folder
        for file in (Path(qlora_lightning.__file__).parent / "assets" / "tiny-llama").iterdir():
            if file.name != "config.json":
                shutil.copy(file, checkpoint / file.name)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(checkpoint), max_seq_length=job.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name
        }
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=job.r,
        lora_alpha=job.alpha,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing="unsloth",
    )
    return plain_loop(model, job, torch.device("cuda"))


def _checkpoint(job: Job) -> str:
    from qlora_lightning.model.build import BaseModelSpec, random_checkpoint

    return random_checkpoint(BaseModelSpec(name_or_path=job.arch_dir, random_init=True))


def plain_loop(model, job: Job, device) -> dict:
    """Train ``model`` (a PEFT model) in a plain PyTorch loop: bf16 autocast, PagedAdamW8bit, the
    model's own loss."""
    import bitsandbytes as bnb
    import torch

    from qlora_lightning.run.callbacks import (
        attended_positions,
        count_params,
        peak_bf16_flops,
        train_flops_per_token,
    )

    optimizer = bnb.optim.PagedAdamW8bit(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4
    )
    model.train()
    on_cuda = device.type == "cuda"
    loaded = torch.cuda.memory_allocated() / GIB if on_cuda else None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    batches = iter(synthetic_batches(job, model.config.vocab_size))
    times, profiler, stalls = [], StepProfiler(job), StepStalls(on_cuda)
    for _ in range(job.warmup + job.steps):
        sync()
        start = time.perf_counter()
        for _ in range(job.accumulate):
            batch = {
                k: v.to(device) for k, v in next(batches).items() if isinstance(v, torch.Tensor)
            }
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss / job.accumulate
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        profiler.step()
        stalls.mark()
    step = statistics.median(times[job.warmup :])
    tokens = job.batch * job.seq * job.accumulate
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    flops = train_flops_per_token(
        count_params(model)[0],
        config.num_hidden_layers,
        heads * head_dim,
        attended_positions(config, job.seq),
    )
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if on_cuda else None
    return {
        "step_time_s": step,
        "tokens_per_sec": tokens / step,
        "mfu": flops * tokens / step / peak_flops if peak_flops else None,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if on_cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if on_cuda else None,
        "loaded_gib": loaded,
        "measured_steps": len(times) - job.warmup,
        "profile": profiler.result(),
        "step_times_s": [round(t, 4) for t in times[job.warmup :]],
        "step_stalls": stalls.finish(job.steps),
    }


RUNNERS = {"project": run_project, BASELINE: run_baseline, PEER: run_peer}


def worker(job_json: str) -> None:
    """Run one job and print its result as the last line, ``RESULT {json}``."""
    job = Job(**json.loads(job_json))
    try:
        result = RUNNERS[job.impl](job)
        result["status"] = "ok"
    except Exception as err:  # an OOM or a kernel failure is a result of this configuration
        import torch

        oom = isinstance(err, torch.OutOfMemoryError)
        result = {
            "status": "out of memory" if oom else f"error: {type(err).__name__}: {str(err)[:300]}"
        }
        import traceback

        traceback.print_exc()
    print("RESULT " + json.dumps(result), flush=True)


# ---- orchestrator side --------------------------------------------------------------------


def parse_shape(shape: str) -> tuple[int, int]:
    batch, seq = shape.lower().split("x")
    return int(batch), int(seq)


def plan(args: argparse.Namespace, arch_root: Path) -> list[Job]:
    """The jobs of this command, most important first (a time budget may cut the tail)."""

    def arch_dir(arch: str) -> str:
        return str(write_arch(arch, arch_root, tiny=args.tiny))

    common = {
        "steps": args.steps,
        "warmup": args.warmup,
        "profile": args.profile,
        "profile_host": args.profile_host,
        "trace_dir": args.trace,
    }
    if args.original:
        return [
            Job(
                e.arch,
                1,
                512,
                "project",
                "default",
                arch_dir(e.arch),
                r=e.r,
                alpha=2 * e.r,
                accumulate=8,
                experiment=e.name,
                options=VARIANTS["default"],
                **common,
            )
            for e in ORIGINAL
        ]
    if args.goals:
        goal_jobs = []
        for goal in GOALS:
            if args.archs and goal.arch not in args.archs:
                continue
            batch, seq = parse_shape(goal.shape)
            if goal.needs_baseline:
                goal_jobs.append(
                    Job(goal.arch, batch, seq, BASELINE, BASELINE, arch_dir(goal.arch), **common)
                )
            goal_jobs.append(
                Job(
                    goal.arch,
                    batch,
                    seq,
                    "project",
                    goal.variant,
                    arch_dir(goal.arch),
                    options=VARIANTS[goal.variant],
                    **common,
                )
            )
        return [replace(job, round=i) for i in range(args.repeat) for job in goal_jobs]
    archs = args.archs or (QUICK["archs"] if args.quick else list(ARCHS))
    shapes = args.shapes or (QUICK["shapes"] if args.quick else FULL_SHAPES)
    variants = args.variants or ["default"]
    jobs = []
    for arch in archs:
        arch_shapes = shapes + (LONG_SHAPES if args.long and arch == "mistral-7b" else [])
        for shape in arch_shapes:
            batch, seq = parse_shape(shape)
            names = list(variants)
            if args.quick and arch == QUICK_LEVERS["arch"] and shape == QUICK_LEVERS["shape"]:
                names += [v for v in QUICK_LEVERS["variants"] if v not in names]
            shape_jobs = []
            if not args.no_baseline:
                shape_jobs.append(
                    Job(arch, batch, seq, BASELINE, BASELINE, arch_dir(arch), **common)
                )
            if args.peer:
                shape_jobs.append(Job(arch, batch, seq, PEER, PEER, arch_dir(arch), **common))
            shape_jobs += [
                Job(arch, batch, seq, "project", v, arch_dir(arch), options=VARIANTS[v], **common)
                for v in names
            ]
            # Interleaved rounds: a drift of the machine falls on every configuration alike.
            jobs += [replace(job, round=i) for i in range(args.repeat) for job in shape_jobs]
    return jobs


def unfit(job: Job) -> Optional[str]:
    """Why ``job`` cannot run on its arch, known without starting it (the project would refuse it
    after loading the model)."""
    if job.options.get("cpu_embeddings") and ARCHS[job.arch].get("tie_word_embeddings"):
        return (
            f"not run: cpu_embed needs an untied embedding table ({job.arch} ties it to the head)"
        )
    return None


def run_job(job: Job, timeout: float, log) -> dict:
    """Run ``job`` in a fresh Python process; its output goes to ``log``."""
    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output, result = proc.stdout + proc.stderr, None
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
                break
        if result is None:
            result = {"status": f"crashed (exit {proc.returncode})"}
    except subprocess.TimeoutExpired as err:
        output = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
        result = {"status": f"timed out after {timeout:.0f} s"}
    # A profile's tables come before the stderr.
    keep = 60000 if job.profile or job.profile_host or job.trace_dir else 6000
    log.write(f"\n===== {job.arch} {job.shape} {job.variant} =====\n{output[-keep:]}\n")
    log.flush()
    return {**asdict(job), **result, "wall_s": time.perf_counter() - start}


def device_name() -> str:
    """The GPU's name from nvidia-smi (the orchestrator itself never touches CUDA)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else "cpu"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QLoRA speed/memory benchmark (see the module docstring)"
    )
    parser.add_argument(
        "--out", default="benchmarks/results/latest", help="folder for harness.{json,md,png,log}"
    )
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS))
    parser.add_argument("--shapes", nargs="+", help="BATCHxSEQ, e.g. 1x512 8x1024")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="project-path variants (levers)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="mistral + llama at 1x512 and 8x1024, levers once"
    )
    parser.add_argument(
        "--long", action="store_true", help="add Mistral at 1x8192, 1x16384, 1x32768"
    )
    parser.add_argument(
        "--original", action="store_true", help="the original T4 experiments' table"
    )
    parser.add_argument(
        "--goals",
        action="store_true",
        help="the speed and memory goals, each on its path with its baseline, and a verdict for "
        f"each (--archs: those archs' goals only; {QUICK_BUDGET_S:.0f} s unless --budget-s: "
        "Mistral's, then Llama-2's and Gemma's, fit one 10-minute GPU command each)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the transformers+PEFT baseline"
    )
    parser.add_argument(
        "--no-peer",
        dest="peer",
        action="store_false",
        help="skip Unsloth (measured by default when it is installed)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every configuration, interleaved; the report takes the median round",
    )
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up optimizer steps left out")
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"trace the GPU kernels of the last {PROFILED_STEPS} measured steps: GPU ms per step "
        "by kind of kernel in harness.md (the trace costs some speed)",
    )
    parser.add_argument(
        "--profile-host",
        action="store_true",
        help="--profile, and the host's time by operator in the log (slows the traced steps)",
    )
    parser.add_argument(
        "--trace",
        metavar="DIR",
        help="--profile, and each job's Chrome trace of the profiled steps, gzipped, in DIR "
        "with the host's operators (with --profile-host: its Python frames too)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"skip the jobs that would overrun this (--quick: {QUICK_BUDGET_S:.0f} unless given)",
    )
    parser.add_argument(
        "--arch-root", help="folder for the arch configs (reuse one to reuse its random weights)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny dims of the same model types (CPU dry runs)"
    )
    parser.add_argument("--report", help="re-render harness.md/png from a saved harness.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Only located, never imported here: importing it would patch transformers in this process.
    args.peer = args.peer and not args.tiny and importlib.util.find_spec("unsloth") is not None
    if (
        args.quick or args.goals
    ) and args.budget_s is None:  # one 10-minute GPU command, whatever is installed
        args.budget_s = QUICK_BUDGET_S
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args.worker)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        return write_reports(Path(args.report).parent, saved["meta"], saved["rows"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Random checkpoints are cached per config *path* too: pass the folder another run used to share
    # them.
    arch_root = Path(args.arch_root) if args.arch_root else Path(tempfile.mkdtemp(prefix="archs-"))
    jobs = plan(args, arch_root)
    meta = {
        "device": device_name(),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    start, rows, walls = time.perf_counter(), [], []
    with open(out / "harness.log", "w") as log:
        for i, job in enumerate(jobs):
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
            # The last job (the first of an arch also builds its weights)
            guess = walls[-1] if walls else 0.0
            if left is not None and left < max(guess, 30.0):
                rows.append({**asdict(job), "status": "skipped (time budget)"})
                continue
            if reason := unfit(job):
                rows.append({**asdict(job), "status": reason})
                continue
            print(f"[{i + 1}/{len(jobs)}] {job.arch} {job.shape} {job.variant} ...", flush=True)
            row = run_job(job, timeout=left if left else 3600, log=log)
            walls.append(row["wall_s"])
            print(
                f"    {row['status']}  tokens/s={fmt(row.get('tokens_per_sec'), '.0f')} "
                f"peak={fmt(row.get('peak_alloc_gib'))} GiB  ({row['wall_s']:.0f} s)",
                flush=True,
            )
            rows.append(row)
            write_reports(out, meta, rows)
    write_reports(out, meta, rows)
    print((out / "harness.md").read_text())


if __name__ == "__main__":
    main()
