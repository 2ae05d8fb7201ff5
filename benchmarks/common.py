"""Shared machinery of the benchmark scripts: thread setup, the machine line, interleaved timing, results.

Every script writes benchmarks/results/<name>.json holding its figures, the exact command that produced
them and the machine; BENCHMARKS.md quotes those. Scripts run from the repository root:

    .venv/bin/python benchmarks/<script>.py [--quick]
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from forge.train.precision import bf16_query, cpu_name

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/gpu.sh points this elsewhere (FORGE_BENCH_RESULTS) to collect a GPU machine's results
RESULTS = Path(os.environ.get("FORGE_BENCH_RESULTS", ROOT / "benchmarks" / "results")).resolve()
WARMUP_ROUNDS = 2


def setup_threads(threads: int) -> None:
    """Throughput figures use torch.set_num_threads(threads) (2 = every core of the project's CPU)."""
    torch.set_num_threads(threads)


def machine() -> str:
    """One line naming the hardware the figures come from: the CPU with its capability (bf16 is native on some
    CPUs of this project's kind and emulated, >100x slower, on others), and the GPU's name when one is used."""
    line = (f"{cpu_name()} ({platform.machine()}, {bf16_query(torch.device('cpu'))[1]}), {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line


def cpu_flags() -> dict:
    """torch's own answers about this CPU (recorded in every result): its vector capability and bf16 support."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16_supported": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
            "bf16_native": bf16_query(torch.device("cpu"))[0]}


def command() -> str:
    """The command line that is running, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def interleaved(cases: dict[str, Callable[[], object]], rounds: int,
                warmup: int = WARMUP_ROUNDS, sync: Callable[[], object] | None = None,
                cpu_times: dict[str, list[float]] | None = None, alternate: bool = False) -> dict[str, list[float]]:
    """Wall time of each case over `rounds` rounds, one call of every case per round (after `warmup` untimed
    rounds), so that background load on a shared machine hits every case alike. `sync` (on a GPU:
    torch.cuda.synchronize) runs before the clock starts and before it stops: kernels are asynchronous.
    `cpu_times`, when given, receives each timed call's process CPU time (time.process_time) per case too.
    `alternate`: every other round runs the cases in reverse order, so that no case always follows the same
    one (a call leaves caches and the heap in a state that can speed up or slow down the next)."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in cases})
    order = list(cases.items())
    for r in range(warmup + rounds):
        for name, fn in (order[::-1] if alternate and r % 2 else order):
            sync()
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
                if cpu_times is not None:
                    cpu_times[name].append(time.process_time() - cpu)
    return times


def device_sync(device: torch.device) -> Callable[[], object] | None:
    """What interleaved() must call around each timing on `device` (None on CPU: nothing to wait for)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="auto: CUDA when present; cuda without a GPU is an error")


def resolve_device(name: str) -> torch.device:
    """--device: cpu, cuda, or auto (CUDA when present). cuda without a GPU is an error, not a CPU fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "n": len(seconds)}


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>.json with the command and the machine in front of the figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    load = dict(zip(("1min", "5min", "15min"), os.getloadavg()))   # other processes on a shared machine
    path.write_text(json.dumps({"command": command(), "machine": machine(), "cpu_flags": cpu_flags(),
                                "load_average": load, **result},
                               indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (numbers right-aligned), as pasted into BENCHMARKS.md."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
