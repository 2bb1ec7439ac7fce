"""Wall time of the commands a new user types first: the command list, a command's help, parse
errors.

    python benchmarks/startup.py [--tree DIR] [--baseline REV] [--repeat 3]

Each command runs ``--repeat`` times in a fresh Python (``python -m qlora_lightning ...`` from
``--tree``, a checkout of this project, this one by default); the median is printed.
``--baseline REV`` times that commit too (extracted with ``git archive`` into a temporary folder),
each run beside the same run of ``--tree``, so that both see the same load of the machine: the times
depend on the machine and on what else it runs.

``fit --help`` is answered from a cache folder (``help_cache.py``) after its first time: it is timed
with a cache filled beforehand, and ``fit --help, first`` with an empty one each run. Likewise the
parse errors are timed after one parse of the quickstart config has recorded its keys
(``config_check.py``), as any earlier command of the install does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = ["-m", "qlora_lightning"]
BAD = CLI + ["fit", "--config", "configs/quickstart.yaml"]
# Python's arguments for each command. The last two are the floor of any command that builds the
# parser (LightningCLI needs Lightning, which imports torch), and a control: the same in every tree.
COMMANDS = {
    "--help": CLI + ["--help"],
    "fit --help": CLI + ["fit", "--help"],
    "fit --help, first": CLI + ["fit", "--help"],
    "bad value": BAD + ["--model.init_args.lora.r", "0"],
    "unknown key": BAD + ["--model.init_args.bogus", "1"],
    "wrong type": BAD + ["--data.init_args.batch_size", "two"],
    "missing file": CLI + ["fit", "--config", "configs/no_such.yaml"],
    "import torch": ["-c", "import torch"],
    "import lightning.pytorch": ["-c", "import lightning.pytorch"],
}
FRESH_CACHE = {"fit --help, first"}
# A parse of the quickstart config that stops before anything is built: what any earlier fit,
# validate or test of this install leaves in the cache folder (config_check.py's record of keys).
PARSE_ONLY = [
    "-c",
    "import sys; from qlora_lightning.run.cli import QLoRACLI, make_cli; "
    "QLoRACLI.instantiate_classes = lambda self: sys.exit(0); "
    "make_cli(['fit', '--config', 'configs/quickstart.yaml'])",
]


def time_command(tree: Path, args: list[str], cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *args],
        cwd=tree,
        capture_output=True,
        env={
            "PYTHONPATH": str(tree),
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "QLORA_CACHE": str(cache),
        },
    )
    return time.perf_counter() - start


def extract(rev: str, into: Path) -> Path:
    """The files of commit ``rev`` of this repository, in ``into``."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "archive", rev], cwd=repo, capture_output=True, check=True
    ).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--baseline", metavar="REV", help="a commit to time beside --tree")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": args.tree}
        if args.baseline:
            trees = {args.baseline: extract(args.baseline, Path(tmp, "baseline")), **trees}
        caches = {name: Path(tmp, f"cache-{i}") for i, name in enumerate(trees)}
        for name, tree in trees.items():  # compiles the sources and fills the caches: not timed
            time_command(tree, COMMANDS["fit --help"], caches[name])
            time_command(tree, PARSE_ONLY, caches[name])
        print(
            f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"at the start; median of {args.repeat} runs, seconds"
        )
        print(f"{'':<24} " + "  ".join(f"{name:>10}" for name in trees) + "   (each run)")
        for command, argv in COMMANDS.items():
            times: dict[str, list[float]] = {name: [] for name in trees}
            for run in range(args.repeat):
                for name, tree in trees.items():
                    cache = (
                        Path(tmp, f"fresh-{name}-{run}") if command in FRESH_CACHE else caches[name]
                    )
                    times[name].append(time_command(tree, argv, cache))
            medians = "  ".join(f"{statistics.median(t):10.2f}" for t in times.values())
            each = "; ".join(", ".join(f"{x:.2f}" for x in t) for t in times.values())
            print(f"{command:<24} {medians}   ({each})", flush=True)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
