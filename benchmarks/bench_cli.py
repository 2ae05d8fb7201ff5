"""CLI latency: wall time of `forge --help` and `forge check` in fresh processes (warm OS and data caches).

    .venv/bin/python benchmarks/bench_cli.py [--repeats 5] [--quick]

Each command runs once untimed (warms the page cache, .pyc files and forge's data cache), then --repeats
times; median and min. Writes benchmarks/results/cli.json.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from common import ROOT, table, write_result

COMMANDS = {
    "forge --help": [".venv/bin/forge", "--help"],
    "forge check specs/phase1.toml": [".venv/bin/forge", "check", "specs/phase1.toml"],
    "forge check specs/tiny.toml": [".venv/bin/forge", "check", "specs/tiny.toml"],
}


def wall_time(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    rc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="`forge --help` only, 2 repeats")
    args = parser.parse_args()
    names = ["forge --help"] if args.quick else list(COMMANDS)
    repeats = 2 if args.quick else args.repeats
    results = {}
    for name in names:
        wall_time(COMMANDS[name])                                  # warm-up
        runs = [wall_time(COMMANDS[name]) for _ in range(repeats)]
        seconds = [s for s, _ in runs]
        results[name] = {"median_s": statistics.median(seconds), "min_s": min(seconds), "exit_code": runs[-1][1]}
    print(table(["command", "median (s)", "min (s)", "exit code"],
                [[k, f"{v['median_s']:.2f}", f"{v['min_s']:.2f}", v["exit_code"]] for k, v in results.items()]))
    write_result("cli_quick" if args.quick else "cli", {"repeats": repeats, "results": results})


if __name__ == "__main__":
    main()
