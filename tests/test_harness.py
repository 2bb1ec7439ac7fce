"""benchmarks/harness.py: which jobs one command runs, and who runs each of them."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402
import kernel_profile  # noqa: E402
import report  # noqa: E402

ARGS = [
    "--archs",
    "mistral-7b",
    "llama-2-7b",
    "--shapes",
    "1x512",
    "8x1024",
    "--variants",
    "default",
    "eager",
]


def _plan(tmp_path, *extra: str):
    return harness.plan(harness.parse_args([*ARGS, *extra]), tmp_path)


def test_each_shape_runs_the_baseline_first_then_the_project_variants(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)  # no Unsloth here
    jobs = _plan(tmp_path)
    assert [(j.arch, j.shape, j.variant) for j in jobs[:3]] == [
        ("mistral-7b", "1x512", "hf_peft"),
        ("mistral-7b", "1x512", "default"),
        ("mistral-7b", "1x512", "eager"),
    ]
    assert len(jobs) == 2 * 2 * 3
    assert {j.impl for j in jobs} <= harness.RUNNERS.keys()


def test_a_job_the_project_would_refuse_on_its_arch_is_not_started(tmp_path):
    args = [
        "--archs",
        "gemma-7b",
        "mistral-7b",
        "--shapes",
        "1x512",
        "--tiny",
        "--no-baseline",
        "--no-peer",
        "--variants",
        "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit",
        "offload+chunked_ce+nodrop+fused_adamw",
    ]
    jobs = harness.plan(harness.parse_args(args), tmp_path)
    refused = {(j.arch, j.variant): harness.unfit(j) for j in jobs}
    assert refused.pop(
        ("gemma-7b", "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit")
    ).startswith("not run: cpu_embed needs an untied embedding table (gemma-7b ties it")
    assert set(refused.values()) == {None}


def test_unsloth_runs_beside_the_baseline_when_installed_unless_told_not_to(tmp_path, monkeypatch):
    located = []
    monkeypatch.setattr(
        harness.importlib.util, "find_spec", lambda name: located.append(name) or object()
    )
    jobs = _plan(tmp_path)
    # Found, not imported: it would patch transformers in this process.
    assert located == ["unsloth"]
    assert [j.variant for j in jobs[:4]] == ["hf_peft", "unsloth", "default", "eager"]
    assert sum(j.impl == harness.PEER for j in jobs) == 4  # once per arch and shape
    assert harness.PEER in harness.RUNNERS
    assert not any(j.impl == harness.PEER for j in _plan(tmp_path, "--no-peer"))
    assert not any(j.impl == harness.PEER for j in _plan(tmp_path, "--tiny"))  # Unsloth needs a GPU


def test_rounds_interleave_and_the_report_takes_the_median_round(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    jobs = harness.plan(
        harness.parse_args(
            ["--archs", "mistral-7b", "--shapes", "1x512", "--variants", "default", "--repeat", "3"]
        ),
        tmp_path,
    )
    assert [(j.variant, j.round) for j in jobs] == [
        ("hf_peft", 0),
        ("default", 0),
        ("hf_peft", 1),
        ("default", 1),
        ("hf_peft", 2),
        ("default", 2),
    ]
    rows = [
        {
            **harness.asdict(j),
            "status": "ok",
            "tokens_per_sec": tps,
            "peak_alloc_gib": 1.0 + j.round,
        }
        for j, tps in zip(jobs, [900, 1300, 1000, 1100, 800, 1200])
    ]
    merged = {r["variant"]: r for r in report.merge_rounds(rows)}
    assert (
        merged["hf_peft"]["tokens_per_sec"] == 900 and merged["default"]["tokens_per_sec"] == 1200
    )
    # The median round's own.
    assert merged["default"]["rounds"] == 3 and merged["default"]["peak_alloc_gib"] == 3.0
    assert report._tokens_cell(merged["default"]) == "1200 (3 rounds, 1100-1300)"


def test_quick_mode_keeps_to_one_ten_minute_command_unless_told_otherwise(tmp_path, monkeypatch):
    assert harness.parse_args(["--quick"]).budget_s == harness.QUICK_BUDGET_S < 600
    assert harness.parse_args(["--quick", "--budget-s", "900"]).budget_s == 900
    assert harness.parse_args([]).budget_s is None
    # Its jobs fit the budget at the 45-75 s a 7B job took on an H200 (2026-11-29_session12),
    # without Unsloth.
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    assert (
        len(harness.plan(harness.parse_args(["--quick", "--tiny"]), tmp_path)) * 60
        <= harness.QUICK_BUDGET_S
    )


def test_profile_breakdown_sorts_kernels_by_kind_and_measures_how_busy_the_gpu_is():
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.0, 600.0),
        ("kDequantizeBlockwise<bf16, NF4>", 600.0, 100.0),
        ("triton_poi_fused_add_mul_0", 900.0, 50.0),
        ("Memcpy DtoH (Device -> Pinned)", 950.0, 50.0),
        ("void at::native::vectorized_elementwise_kernel<4>", 1000.0, 200.0),
    ]
    result = kernel_profile.kernel_breakdown(kernels, steps=2)
    assert result["ms_per_step"] == {
        "matmul": 0.3,
        "other (eager kernels)": 0.1,
        "4-bit dequantize": 0.05,
        "compiled (Triton)": 0.025,
        "copy to/from host": 0.025,
    }
    assert result["kernels_per_step"] == 2.5
    # A 200 us gap between the dequantize and the fused kernel.
    assert result["gpu_busy"] == 1000.0 / 1200.0
    row = {"arch": "mistral-7b", "batch": 8, "seq": 1024, "variant": "default", "profile": result}
    assert report.profile_lines([row])[2].startswith(
        "- mistral-7b 8x1024 default: busy 83%, 2 kernels"
    )


def test_the_profiler_traces_exactly_the_last_measured_steps(monkeypatch):
    monkeypatch.setattr(kernel_profile, "PROFILED_STEPS", 2)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    job = harness.Job(
        "mistral-7b", 1, 512, "project", "default", "/nowhere", steps=8, warmup=4, profile=True
    )
    profiler = kernel_profile.StepProfiler(job)
    calls = []
    profiler.prof = type(
        "Recorder",
        (),
        {
            "start": lambda self: calls.append(("start", profiler.done)),
            "stop": lambda self: calls.append(("stop", profiler.done)),
        },
    )()
    for _ in range(job.warmup + job.steps):
        profiler.step()
    assert calls == [("start", 10), ("stop", 12)]  # started after step 10: steps 11 and 12 traced


def test_goals_mode_runs_each_goal_on_its_path_with_the_baseline_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    args = harness.parse_args(["--goals", "--tiny"])
    assert args.budget_s == harness.QUICK_BUDGET_S
    jobs = harness.plan(args, tmp_path)
    expected = []
    for goal in harness.GOALS:
        expected += [(goal.arch, goal.shape, harness.BASELINE)] if goal.needs_baseline else []
        expected.append((goal.arch, goal.shape, goal.variant))
    assert [(j.arch, j.shape, j.variant) for j in jobs] == expected
    assert (
        "mistral-7b",
        "1x32768",
        harness.BASELINE,
    ) not in expected  # judged against Unsloth's figure
    # One arch's goals, to fit one GPU command.
    llama = harness.plan(
        harness.parse_args(["--goals", "--tiny", "--archs", "llama-2-7b"]), tmp_path
    )
    assert (
        [(j.arch, j.variant) for j in llama]
        == [(a, v) for a, _, v in expected if a == "llama-2-7b"]
        != []
    )


def _row(arch, shape, variant, tokens_per_sec, peak):
    batch, seq = harness.parse_shape(shape)
    impl = harness.BASELINE if variant == harness.BASELINE else "project"
    return {
        "arch": arch,
        "batch": batch,
        "seq": seq,
        "variant": variant,
        "impl": impl,
        "tokens_per_sec": tokens_per_sec,
        "peak_alloc_gib": peak,
    }


def test_goal_verdicts_check_speed_and_memory_against_the_baseline_in_the_same_command():
    goal = {(g.arch, g.shape): g for g in harness.GOALS}
    mistral, llama, gemma = (
        goal["mistral-7b", "8x1024"],
        goal["llama-2-7b", "8x1024"],
        goal["gemma-7b", "8x1024"],
    )
    small, long = goal["mistral-7b", "1x512"], goal["mistral-7b", "1x32768"]
    # Slower than its baseline.
    rows = [
        _row("mistral-7b", "8x1024", harness.BASELINE, 6200, 12.4),
        _row("mistral-7b", "8x1024", mistral.variant, 12500, 5.5),  # met
        _row("llama-2-7b", "8x1024", harness.BASELINE, 6400, 11.7),
        _row("llama-2-7b", "8x1024", llama.variant, 12700, 5.4),  # 1.98x: not met
        _row("gemma-7b", "8x1024", harness.BASELINE, 5200, 34.6),
        _row(
            "gemma-7b", "8x1024", gemma.variant, 9900, 18.0
        ),  # 52% of the baseline's memory: not met
        _row("mistral-7b", "1x512", small.variant, 1500, 4.3),  # no baseline ran
        _row("mistral-7b", "1x32768", long.variant, 10000, 14.2),  # over 14 GiB: not met
        _row("mistral-7b", "8x1024", "eager", 6000, 9.0),
    ]
    verdicts = {v["goal"].split(",")[0]: v["met"] for v in report.goal_verdicts(rows)}
    assert verdicts == {
        "mistral-7b 8x1024": True,
        "llama-2-7b 8x1024": False,
        "gemma-7b 8x1024": False,
        "mistral-7b 1x512": None,
        "mistral-7b 1x32768": False,
        "no configuration slower or heavier than its baseline": False,
    }
    skipped = {
        **_row("mistral-7b", "1x512", small.variant, None, None),
        "status": "skipped (time budget)",
    }
    verdicts = report.goal_verdicts(rows[:2] + [skipped])
    assert [(v["measured"], v["met"]) for v in verdicts[1:2]] == [("skipped (time budget)", None)]
    uneven = {**rows[1], "step_times_s": [0.66, 0.65, 0.83, 0.66, 1.2, 0.65, 0.66, 0.66]}
    measured = report.goal_verdicts([rows[0], uneven])[0]["measured"]
    assert measured.endswith("; 2 of its 8 steps over 1.05x their median")
    behind = report.goal_verdicts(rows)[-1]["measured"]
    assert behind == "mistral-7b 8x1024 eager"
    assert "| NO |" in "\n".join(report.goal_lines(rows))
    failed = {**_row("gemma-7b", "1x512", "offload", None, None), "status": "error: UserError: ..."}
    open_verdict = report.goal_verdicts(rows[:2] + [failed])[-1]
    assert open_verdict["met"] is None  # a failed configuration is not "none slower"
    assert (
        open_verdict["measured"]
        == "none is; not measured: gemma-7b 1x512 offload (error: UserError: ...)"
    )


def test_goal_verdicts_of_a_cpu_dry_run_judge_speed_only():
    mistral = next(g for g in harness.GOALS if (g.arch, g.shape) == ("mistral-7b", "8x1024"))
    rows = [
        _row("mistral-7b", "8x1024", harness.BASELINE, 100, None),
        _row("mistral-7b", "8x1024", mistral.variant, 90, None),
    ]
    goal, slower = report.goal_verdicts(rows)
    # No GPU peak: memory cannot be judged.
    assert goal["met"] is None and "n/a GiB" in goal["measured"]
    assert slower["met"] is False and slower["measured"] == f"mistral-7b 8x1024 {mistral.variant}"
