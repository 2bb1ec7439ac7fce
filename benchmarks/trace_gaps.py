"""Where the GPU waits, from a Chrome trace of the harness
(``harness.py --trace DIR --profile-host``).

    python benchmarks/trace_gaps.py DIR/mistral-7b_8x1024_..._r0.json.gz [--min-gap-us 10]

On the stream that runs the most GPU time it lists the copies that ran on it (work too: an
out-of-place ``addmm`` copies its whole input first), sums the idle gaps between its kernels and
copies, and splits them: a gap whose next kernel was launched after the previous one ended waited
for the host (charged to the Python frames and operator the launch came from, which only a
``--profile-host`` trace records); any other waited for the device (an event on another stream;
marked where a copy on another stream ended just before). It also lists the host's busiest
Python functions, inclusive time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from typing import Optional

# Frames worth naming: the project and the libraries its step runs through.
PACKAGES = (
    "qlora_lightning",
    "transformers/",
    "peft/",
    "bitsandbytes/",
    "torch/utils/checkpoint",
    "lightning/",
    "torch/optim",
    "torch/_dynamo/eval_frame",
    "harness.py",
)


def load(path: str) -> list[dict]:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def enclosing_frames(
    events: list[dict], queries: list[tuple[int, float]]
) -> dict[tuple[int, float], list[tuple[str, str]]]:
    """For each (tid, time): the Python frames and operators open at that time on that thread,
    outermost first (the backward's thread runs operators with no Python frames)."""
    by_tid: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("python_function", "cpu_op"):
            by_tid[e["tid"]].append(e)
    found = {}
    for tid, times in _group(queries).items():
        frames = sorted(by_tid.get(tid, []), key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        i = 0
        for t in sorted(times):
            while i < len(frames) and frames[i]["ts"] <= t:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < frames[i]["ts"]:
                    stack.pop()
                stack.append(frames[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < t:
                stack.pop()
            found[(tid, t)] = [(f["cat"], f["name"]) for f in stack]
    return found


def _group(queries: list[tuple[int, float]]) -> dict[int, list[float]]:
    grouped: dict[int, list[float]] = defaultdict(list)
    for tid, t in queries:
        grouped[tid].append(t)
    return grouped


def short(frames: list[tuple[str, str]], depth: int) -> str:
    """The innermost named Python frames, and the innermost operator."""
    named = [
        name.split("/")[-1]
        for cat, name in frames
        if cat == "python_function" and any(p in name for p in PACKAGES)
    ]
    ops = [name for cat, name in frames if cat == "cpu_op"]
    return " > ".join(named[-depth:] + ops[-1:]) or "(nothing open)"


def explain(events: list[dict], host_gaps: list[tuple], n: int, top: int) -> None:
    """For the ``n`` longest waits for the host: the outermost host events the launching thread ran
    between launching the kernel before the gap and the one after it, by name."""
    by_tid: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("python_function", "cpu_op", "user_annotation", "cuda_runtime"):
            by_tid[e["tid"]].append(e)
    for gap, tid, ts, name, since in sorted(host_gaps, key=lambda g: -g[0])[:n]:
        inside = sorted(
            (e for e in by_tid[tid] if since <= e["ts"] < ts), key=lambda e: (e["ts"], -e["dur"])
        )
        outer, reach = [], since
        for e in inside:  # outermost: not inside one already taken
            if e["ts"] >= reach:
                outer.append(e)
                reach = e["ts"] + e["dur"]
        named: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for e in outer:
            named[e["name"][:90]][0] += e["dur"]
            named[e["name"][:90]][1] += 1
        print(
            f"\n  gap {gap / 1e3:.2f} ms before {name[:70]}; host window {(ts - since) / 1e3:.2f} "
            "ms:"
        )
        for key, (dur, count) in sorted(named.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"    {dur / 1e3:8.2f} ms {count:5d}  {key}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("trace")
    parser.add_argument("--min-gap-us", type=float, default=10.0)
    parser.add_argument("--depth", type=int, default=3, help="named frames per host-bound gap")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="for the N longest waits for the host: what the launching thread ran meanwhile",
    )
    args = parser.parse_args(argv)

    events = load(args.trace)
    # Copies and fills are work on their stream too (an out-of-place addmm copies its whole input).
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    per_stream: dict[int, float] = defaultdict(float)
    for k in kernels:
        per_stream[k["args"].get("stream")] += k["dur"]
    main_stream = max(per_stream, key=per_stream.get)
    stream = sorted(
        (k for k in kernels if k["args"].get("stream") == main_stream), key=lambda k: k["ts"]
    )
    span = stream[-1]["ts"] + stream[-1]["dur"] - stream[0]["ts"]
    print(
        f"stream {main_stream}: {len(stream)} kernels and copies, busy "
        f"{per_stream[main_stream] / 1e3:.1f} ms of {span / 1e3:.1f} ms; other streams: "
        + ", ".join(f"{s}: {d / 1e3:.1f} ms" for s, d in per_stream.items() if s != main_stream)
    )
    copies: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in stream:
        if e["cat"] != "kernel":
            key = f"{e['name']}, {e['args'].get('bytes', 0) / 2**20:.1f} MiB"
            copies[key][0] += e["dur"]
            copies[key][1] += 1
    for key, (dur, n) in sorted(copies.items(), key=lambda kv: -kv[1][0])[:5]:
        print(f"  on it: {n} x {key}: {dur / 1e3:.1f} ms")

    # Copies on other streams (the offloading's side stream), by end time: a kernel that starts
    # right after one ended most likely waited for it.
    copy_ends = sorted(
        e["ts"] + e["dur"]
        for e in events
        if e.get("cat") in ("gpu_memcpy", "gpu_memset")
        and e.get("args", {}).get("stream") != main_stream
    )
    host_gaps, device_gaps, queries = [], defaultdict(lambda: [0.0, 0]), []
    for prev, nxt in zip(stream, stream[1:]):
        end = prev["ts"] + prev["dur"]
        gap = nxt["ts"] - end
        if gap < args.min_gap_us:
            continue
        launch = launches.get(nxt["args"].get("correlation"))
        if launch is not None and launch["ts"] + launch["dur"] > end:
            before = launches.get(prev["args"].get("correlation"))
            host_gaps.append(
                (gap, launch["tid"], launch["ts"], nxt["name"], before["ts"] if before else end)
            )
            queries.append((launch["tid"], launch["ts"]))
        else:
            i = bisect.bisect_right(copy_ends, nxt["ts"])
            after_copy = i > 0 and copy_ends[i - 1] >= end - 1
            key = f"{prev['name'][:60]} -> {nxt['name'][:60]}" + (
                " (after a side-stream copy)" if after_copy else ""
            )
            device_gaps[key][0] += gap
            device_gaps[key][1] += 1
    total_gap = span - per_stream[main_stream]
    host_total = sum(g for g, *_ in host_gaps)
    device_total = sum(v[0] for v in device_gaps.values())
    print(
        f"idle {total_gap / 1e3:.1f} ms; in gaps >= {args.min_gap_us:.0f} us: waiting for the host "
        f"{host_total / 1e3:.1f} ms ({len(host_gaps)} gaps), for the device "
        f"{device_total / 1e3:.1f} ms"
    )

    frames = enclosing_frames(events, queries)
    by_site: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for gap, tid, ts, *_ in host_gaps:
        site = short(frames.get((tid, ts), []), args.depth)
        by_site[site][0] += gap
        by_site[site][1] += 1
    print("\nwaiting for the host, by launch site (ms, gaps):")
    for site, (gap, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {gap / 1e3:8.2f} {n:6d}  {site}")
    if args.explain:
        explain(events, host_gaps, args.explain, args.top)
    print("\nwaiting for the device, by kernel pair (ms, gaps):")
    for key, (gap, n) in sorted(device_gaps.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {gap / 1e3:8.2f} {n:6d}  {key}")

    inclusive: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "python_function" and any(p in e["name"] for p in PACKAGES):
            inclusive[e["name"]] += e["dur"]
    print("\nhost: inclusive time of named Python functions (ms):")
    for name, dur in sorted(inclusive.items(), key=lambda kv: -kv[1])[: args.top * 2]:
        print(f"  {dur / 1e3:9.2f}  {name}")


if __name__ == "__main__":
    main()
