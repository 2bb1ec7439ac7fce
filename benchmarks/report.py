"""``harness.json``, ``harness.md`` and ``harness.png`` from a run's rows: the tables, the goals'
verdicts, the slow steps, the kernel profiles and the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from goals import GOALS, ORIGINAL
from kernel_profile import PROFILED_STEPS
from levers import BASELINE, ESTIMATED_OPTIMIZER, LEGEND, PEER, VARIANTS
from step_stalls import SLOW, slow_steps, stall_lines


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per configuration: the median round by tokens/s (its own step time, MFU, memory),
    with ``rounds`` and every round's tokens/s; configurations that never ran keep their first
    row."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["arch"], row["batch"], row["seq"], row["variant"], row.get("experiment"))
        groups.setdefault(key, []).append(row)
    merged = []
    for group in groups.values():
        ok = sorted(
            (r for r in group if r.get("tokens_per_sec")), key=lambda r: r["tokens_per_sec"]
        )
        if not ok:
            merged.append(group[0])
            continue
        median = ok[(len(ok) - 1) // 2]  # the lower median: a round that really ran
        merged.append(
            {
                **median,
                "rounds": len(ok),
                "tokens_per_sec_rounds": [r["tokens_per_sec"] for r in ok],
            }
        )
    return merged


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def with_estimates(rows: list[dict]) -> list[dict]:
    """Add the memory estimator's prediction of each row's peak, and its error against the
    measurement."""
    from transformers import AutoConfig

    from qlora_lightning.speed.estimate import estimate_peak_memory

    out = []
    for row in rows:
        row = dict(row)
        if (
            row.get("status") == "ok"
            and row["impl"] != PEER
            and Path(row["arch_dir"], "config.json").is_file()
        ):
            config = AutoConfig.from_pretrained(row["arch_dir"])
            # `effective_options`: what really ran, where a saved row records that it differed from
            # the request.
            opts = row.get("effective_options") or row["options"] or VARIANTS["default"]
            baseline = row["impl"] == BASELINE
            est = estimate_peak_memory(
                config,
                batch=row["batch"],
                seq=row["seq"],
                r=row["r"],
                gradient_checkpointing=opts["gradient_checkpointing"],
                loss_chunk_size=opts["loss_chunk_size"],
                loss_impl="transformers" if baseline else "project",
                upcast_frozen=baseline or opts.get("upcast_frozen", True),
                liger_kernel=opts["liger_kernel"] and not baseline,
                attn_implementation=opts.get("attn_implementation", "sdpa"),
                cpu_embeddings=opts.get("cpu_embeddings", False) and not baseline,
                lora_dropout=0.05 if baseline else opts.get("lora_dropout", 0.05),
                lean_forward=opts.get("lean_forward", False) and not baseline,
                optimizer="PagedAdamW8bit"
                if baseline
                else ESTIMATED_OPTIMIZER[opts.get("optimizer", "paged_adamw_8bit")],
            )
            row["estimated_peak_gib"] = est["total_gib"]
            if row.get("peak_alloc_gib"):
                row["estimate_error"] = est["total_gib"] / row["peak_alloc_gib"] - 1
        out.append(row)
    return out


def baseline_of(row: dict, rows: list[dict]) -> Optional[dict]:
    """The baseline row of ``row``'s arch and shape among ``rows``, where it ran."""
    return next(
        (
            b
            for b in rows
            if b["arch"] == row["arch"]
            and b["batch"] == row["batch"]
            and b["seq"] == row["seq"]
            and b["impl"] == BASELINE
            and b.get("tokens_per_sec")
        ),
        None,
    )


def goal_verdicts(rows: list[dict]) -> list[dict]:
    """Each goal whose configuration ran, measured against its target (``met``: None where the
    baseline it needs did not run); then whether any configuration ran slower or heavier than its
    baseline."""
    verdicts = []
    for goal in GOALS:
        row = next((r for r in rows if goal.judges(r) and r.get("tokens_per_sec")), None)
        if row is None:
            planned = next((r for r in rows if goal.judges(r)), None)
            if planned is not None:  # skipped for time, or failed
                verdicts.append(
                    {
                        "goal": f"{goal.arch} {goal.shape}, {goal.variant}",
                        "target": goal.target(),
                        "measured": planned.get("status", "did not run"),
                        "met": None,
                    }
                )
            continue
        base = baseline_of(row, rows)
        measured = f"{row['tokens_per_sec']:.0f} tok/s, {fmt(row.get('peak_alloc_gib'))} GiB"
        if base:
            measured += (
                f" ({row['tokens_per_sec'] / base['tokens_per_sec']:.2f}x the baseline's speed"
            )
            if None not in (row.get("peak_alloc_gib"), base.get("peak_alloc_gib")):
                measured += f", {row['peak_alloc_gib'] / base['peak_alloc_gib']:.0%} of its memory"
            measured += ")"
        slow = slow_steps(row.get("step_times_s") or [])
        if slow:  # a median its steps do not agree on
            measured += (
                f"; {len(slow)} of its {len(row['step_times_s'])} steps over {SLOW}x their median"
            )
        verdicts.append(
            {
                "goal": f"{goal.arch} {goal.shape}, {goal.variant}",
                "target": goal.target(),
                "measured": measured,
                "met": goal.met(row, base),
            }
        )
    project = [r for r in rows if r["impl"] == "project"]
    paired = [(r, baseline_of(r, rows)) for r in project if r.get("tokens_per_sec")]
    paired = [(r, base) for r, base in paired if base]
    if paired:
        behind = [
            _name(r)
            for r, base in paired
            if r["tokens_per_sec"] < base["tokens_per_sec"] or _heavier(r, base)
        ]
        # A configuration that failed or was skipped is no evidence either way: named, and the
        # verdict left open unless another one already fails it.
        unmeasured = [
            f"{_name(r)} ({r.get('status', 'did not run')})"
            for r in project
            if not r.get("tokens_per_sec")
        ]
        measured = "; ".join(behind) or "none is"
        if unmeasured:
            measured += "; not measured: " + "; ".join(unmeasured)
        verdicts.append(
            {
                "goal": "no configuration slower or heavier than its baseline",
                "target": "",
                "measured": measured,
                "met": False if behind else None if unmeasured else True,
            }
        )
    return verdicts


def _name(row: dict) -> str:
    return f"{row['arch']} {row['batch']}x{row['seq']} {row['variant']}"


def _heavier(row: dict, base: dict) -> bool:
    """Whether ``row`` peaked above its baseline (never on a CPU, where no peak is measured)."""
    return None not in (row.get("peak_alloc_gib"), base.get("peak_alloc_gib")) and (
        row["peak_alloc_gib"] > base["peak_alloc_gib"]
    )


def goal_lines(rows: list[dict]) -> list[str]:
    """The goals table of a report, where any goal's configuration ran."""
    verdicts = goal_verdicts(rows)
    if not verdicts:
        return []
    lines = [
        "Goals of the speed and memory issue (baseline in the same command):",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {v['goal']} | {v['target']} | {v['measured']} "
        f"| {'n/a' if v['met'] is None else 'yes' if v['met'] else 'NO'} |"
        for v in verdicts
    ]
    return lines + [""]


def _tokens_cell(row: dict) -> str:
    """Tokens/s, and over several rounds their range: ``1290 (3 rounds, 1201-1310)``."""
    runs = row.get("tokens_per_sec_rounds") or []
    spread = f" ({len(runs)} rounds, {min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else ""
    return fmt(row.get("tokens_per_sec"), ".0f") + spread


def markdown(meta: dict, rows: list[dict]) -> str:
    """Tables of a run: throughput and memory per configuration, or the original experiments."""
    lines = [
        f"# QLoRA benchmark, {meta['device']}",
        "",
        "Random weights with the published dims, NF4 + double quant, bf16 compute, LoRA on all "
        f"linear layers, median of {meta['steps']} optimizer steps after {meta['warmup']} warm-up "
        f"steps, each configuration in its own process; command: `{meta['command']}`. Loss: n/a "
        "(random weights).",
        "",
    ]
    if meta.get("note"):
        lines += [f"**Note.** {meta['note']}", ""]
    if any(r.get("experiment") for r in rows):
        lines += [
            "| experiment | peak alloc GiB | peak reserved GiB | est. GiB | step s (8 x 512 tok) "
            "| est. training min (extrapolated) | T4 GB (original) | T4 min (original) | loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            exp = next(e for e in ORIGINAL if e.name == r["experiment"])
            minutes = (
                r["step_time_s"] * exp.samples / r["accumulate"] / 60
                if r.get("step_time_s")
                else None
            )
            lines.append(
                f"| {exp.name} | {fmt(r.get('peak_alloc_gib'))} | "
                f"{fmt(r.get('peak_reserved_gib'))} | {fmt(r.get('estimated_peak_gib'))} | "
                f"{fmt(r.get('step_time_s'), '.3f')} | {fmt(minutes, '.1f')} | {exp.t4_peak_gb} | "
                f"{exp.t4_minutes} | n/a |"
            )
        lines += [
            "",
            "Training time = measured step time x samples / 8 (one epoch), extrapolated, not run "
            "to the end; every sample is a full 512 tokens here (the originals had shorter ones). "
            "Not comparable 1:1 with the T4 (another GPU, another software stack).",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "| arch | shape | impl | tokens/s | x baseline | wall tokens/s | peak alloc GiB | peak "
        "reserved GiB | est. GiB | est. error | MFU | step s | status |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        base = baseline_of(r, rows)
        ratio = (
            r["tokens_per_sec"] / base["tokens_per_sec"]
            if base and r.get("tokens_per_sec")
            else None
        )
        err = r.get("estimate_error")
        lines.append(
            f"| {r['arch']} | {r['batch']}x{r['seq']} | {r['variant']} | {_tokens_cell(r)} "
            f"| {fmt(ratio)} | {fmt(r.get('wall_tokens_per_sec'), '.0f')} "
            f"| {fmt(r.get('peak_alloc_gib'))} | {fmt(r.get('peak_reserved_gib'))} "
            f"| {fmt(r.get('estimated_peak_gib'))} | {'n/a' if err is None else f'{err:+.0%}'} "
            f"| {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('step_time_s'), '.3f')} "
            f"| {r['status']}{' (' + r['note'] + ')' if r.get('note') else ''} |"
        )
    lines += [
        "",
        LEGEND
        + " Peaks are torch allocator peaks after model load (PagedAdamW8bit's paged state lives "
        "in CUDA managed memory, which they do not count). wall tokens/s: the project's measured "
        "steps over host wall time with the GPU synchronized at both ends (its tokens/s is the "
        "median step timed by GPU events).",
        "",
    ]
    return "\n".join(lines + goal_lines(rows) + stall_lines(rows) + profile_lines(rows))


def profile_lines(rows: list[dict]) -> list[str]:
    """``--profile``: GPU milliseconds per optimizer step by kind of kernel, one line per
    configuration."""
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return []
    lines = [
        f"GPU time per step by kind of kernel (`--profile`, the last {PROFILED_STEPS} measured "
        "steps traced; busy = kernel time / span of the steps):",
        "",
    ]
    for r in profiled:
        p = r["profile"]
        kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in p["ms_per_step"].items())
        lines.append(
            f"- {r['arch']} {r['batch']}x{r['seq']} {r['variant']}: busy "
            f"{fmt(p['gpu_busy'], '.0%')}, {p['kernels_per_step']:.0f} kernels; ms: {kinds}"
        )
    return lines + [""]


def chart(rows: list[dict], path: Path) -> Optional[str]:
    """Tokens/s and peak memory per configuration as a PNG; returns why not when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    ok = [r for r in rows if r.get("tokens_per_sec")]
    if not ok:
        return "no successful runs: no chart"
    labels = [f"{r['arch']}\n{r['batch']}x{r['seq']}\n{r['variant']}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(ok)), 8), sharex=True)
    colors = [{BASELINE: "tab:gray", PEER: "tab:orange"}.get(r["impl"], "tab:blue") for r in ok]
    ax1.bar(range(len(ok)), [r["tokens_per_sec"] for r in ok], color=colors)
    ax1.set_ylabel("tokens/s")
    ax2.bar(range(len(ok)), [r.get("peak_alloc_gib") or 0 for r in ok], color=colors)
    ax2.set_ylabel("peak allocated GiB")
    ax2.set_xticks(range(len(ok)), labels, fontsize=7)
    ax1.set_title("grey: transformers+PEFT baseline; orange: Unsloth; blue: this project")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(out: Path, meta: dict, rows: list[dict]) -> None:
    """harness.json (raw rows of every round), harness.md (tables) and harness.png (chart) under
    ``out``."""
    (out / "harness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    rows = with_estimates(merge_rounds(rows))
    why = chart(rows, out / "harness.png")
    text = markdown(meta, rows) + (f"\n{why}\n" if why else "")
    (out / "harness.md").write_text(text)
