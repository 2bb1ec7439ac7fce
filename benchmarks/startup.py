"""Wall time of the commands a new user types first: the command list, a command's help, a parse error.

    python benchmarks/startup.py [--tree DIR] [--repeat 3]

Each command runs ``--repeat`` times in a fresh Python (``python -m qlora_lightning ...`` from ``--tree``,
a checkout of this project, this one by default); the median is printed. Compare two checkouts on
one machine, one run after the other: the times depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "fit --help": ["fit", "--help"],
    "parse error": ["fit", "--config", "configs/quickstart.yaml", "--model.init_args.lora.r", "0"],
}


def time_command(tree: Path, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qlora_lightning", *args], cwd=tree, capture_output=True,
                   env={"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"tree {args.tree}, median of {args.repeat} runs")
    for name, command in COMMANDS.items():
        times = [time_command(args.tree, command) for _ in range(args.repeat)]
        print(f"{name:<12} {statistics.median(times):6.2f} s   ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
