"""The pre-flight memory estimate (forge check, B1-memory-estimate) against the measured peak of a real step.

    .venv/bin/python benchmarks/bench_memory_estimate.py [--threads 1] [--ledger] [--quick]

Cases: tiny (batch 8, 16) and phase1 (batch 4, 8, seq 512), each with gradient checkpointing off and
"backbone_and_trm", fp32 on the CPU. Per case:
  - estimate: forge.train.memory_estimate.estimate, what forge check prints (the model's arithmetic);
  - ledger (--ledger): the real training step on the meta device with every storage booked (live tensor bytes of
    the step from the model's and optimizer's own code; no runtime term);
  - measured: one fresh process per case builds the trainer as `forge train` does (bench_train_step.build_trainer)
    and runs three training steps (the optimizer's state and its kept copy of weights and state are complete only
    after the second step's optimizer call, so the third is the first whose forward and backward run beside them,
    as every later step's do); the peak of its anonymous resident memory (heap and mapped tensors:
    /proc/self/statm, resident - shared, sampled every millisecond, and the third step's through the kernel's
    VmHWM) over the steps minus its value before the model is built (torch, forge and torch._dynamo imported:
    building a model imports it first); undecidable where a step was skipped as non-finite (no optimizer state
    then). Measured twice:
    with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_=131072: a freed tensor goes back to the
    OS, so the RSS follows the live tensors: the quantity the estimate predicts), and with glibc's default
    (its threshold rises with every freed block up to 32 MiB, so freed activations of a small batch stay
    resident in its heap: the excess is the allocator's, and varies run to run).
Writes benchmarks/results/memory_estimate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading

from common import ROOT, setup_threads, table, write_result

CASES = [("specs/tiny.toml", 8), ("specs/tiny.toml", 16), ("specs/phase1.toml", 4), ("specs/phase1.toml", 8)]
MODES = ("off", "backbone_and_trm")
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def anonymous_bytes() -> int:
    """Resident memory that no file backs (heap and mapped tensors): /proc/self/statm resident - shared. Not
    ru_maxrss: that counts the code pages of torch's libraries as the step first touches them, which varies
    with the page cache by ~0.1 GB."""
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(x) for x in f.read().split()[:3])
    return (resident - shared) * resource.getpagesize()


class PeakSampler:
    """The largest anonymous_bytes() seen by a thread that reads it every millisecond."""

    def __init__(self):
        self.peak, self._stop = anonymous_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anonymous_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_bytes())


def child(spec: str, batch: int, mode: str, precision: str = "fp32") -> None:
    import torch._dynamo  # noqa: F401  (what building a model imports first: in every forge process before a step)
    from bench_train_step import build_trainer

    before = anonymous_bytes()
    sampler = PeakSampler()
    trainer = build_trainer(spec, [f"data.batch_size={batch}", "data.grad_accum=1", f"train.precision={precision}",
                                   f"train.gradient_checkpointing={mode}"])
    # the first two steps build the optimizer's state: the first its moments and a kept copy of the weights, the
    # second the kept copy of weights and state (forge.optim.optimizer._KeptCopy), in its optimizer call, after
    # its forward and backward. Only from the third step on does a forward and backward run beside all of it,
    # as in every later step of a run: the third is the one measured.
    for _ in range(2):
        trainer.train_step(collect=False)
    # the third step through the kernel's own high-water mark (exact, where a starved sampler can miss a short
    # peak): VmHWM reset to the current RSS (clear_refs 5), less the file-backed pages, which the first steps
    # have touched already
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    trainer.train_step(collect=False)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("VmHWM", "RssFile", "RssShmem")}
    hwm = kib["VmHWM"] - kib["RssFile"] - kib["RssShmem"] - before
    # a skipped (non-finite) step creates no optimizer state: the steps measured would not be a training step's
    print(json.dumps({"peak_bytes": max(sampler.stop() - before, hwm), "sampled": sampler.peak - before, "hwm": hwm,
                      "skipped_steps": trainer.counters.nonfinite_total}))


def resident_bytes(address: int, size: int) -> int:
    """Bytes of the pages spanning [address, address + size) that are resident (mincore): pages a tensor's
    kernel never wrote are mapped but not resident."""
    import ctypes

    page = resource.getpagesize()
    start = address & ~(page - 1)
    pages = (address + size - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(start, pages * page, vec):
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) * page


def residency(spec: str, batch: int, mode: str) -> None:
    """--residency: after two steps, the third step's storages booked as the ledger books them, on the CPU's own
    kernels; at its peak, the anonymous RSS growth over the step's start against the booked bytes, and how many
    of the booked bytes (storages of 1 MiB or more, each its own mapping under the fixed mmap threshold) are
    resident."""
    import gc
    import warnings

    import torch

    from bench_train_step import build_trainer
    from forge.train.memory_estimate import Ledger
    from forge.train.objective import training_loss

    class Booked(Ledger):
        def __init__(self):
            super().__init__(fake_host_reads=False)
            self.address: dict[int, int] = {}
            self.at_peak: dict = {}

        def hold(self, tensor):
            self.address[tensor.untyped_storage()._cdata] = tensor.untyped_storage().data_ptr()
            super().hold(tensor)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            # a snapshot at each new peak 2% above the last (mincore over every big storage is not free)
            if self.peak == self.current and self.current > 1.02 * self.at_peak.get("booked", 0) + 1e6:
                big = [(self.address[k], n) for k, n in self.live.items() if n >= 1 << 20 and k not in before]
                self.at_peak = {"booked": self.current, "op": str(func), "rss_growth": anonymous_bytes() - start,
                                "booked_big": sum(n for _, n in big),
                                "resident_big": sum(resident_bytes(a, n) for a, n in big)}
            return out

    trainer = build_trainer(spec, [f"data.batch_size={batch}", "data.grad_accum=1", "train.precision=fp32",
                                   f"train.gradient_checkpointing={mode}"])
    for _ in range(2):
        trainer.train_step(collect=False)
    model, optimizer = trainer.parts.model, trainer.parts.optimizer
    (idx, targets), = trainer.parts.loader.micro_batches(2)
    ledger = Booked()
    with warnings.catch_warnings():          # gc sees deprecated torch module attributes
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for t in found:                          # what the step finds (weights, optimizer state): not booked
        ledger.hold(t)
    del found
    before, held = set(ledger.live), ledger.current
    ledger.current = ledger.peak = 0
    start = anonymous_bytes()
    with ledger:
        out = model(idx, targets, act_loss_weight=trainer.act_loss_weight(2))
        training_loss(model, out, trainer.act_loss_weight(2), trainer.batch).backward()
        del out
        optimizer.step()
        trainer.parts.qk_clip.after_step(True)
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"held_before_gb": held / 1e9, "step_peak_gb": ledger.peak / 1e9,
                      **{k: v / 1e9 if isinstance(v, int) else v for k, v in ledger.at_peak.items()}}))


def measure(spec: str, batch: int, mode: str, threads: int, env: dict) -> int | None:
    """The measured peak (bytes); None when a step was skipped as non-finite (then no optimizer state exists and
    the process holds less than a training step does: undecidable, not a measurement)."""
    out = subprocess.run([sys.executable, __file__, "--child", spec, "--batch", str(batch), "--mode", mode,
                          "--threads", str(threads)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env})
    if out.returncode:
        sys.exit(f"{spec} batch {batch} {mode}: the measuring process failed\n{out.stderr}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    if record["skipped_steps"]:
        print(f"{spec} batch {batch} {mode}: {record['skipped_steps']} of 3 steps skipped (non-finite): undecidable",
              flush=True)
        return None
    return record["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ledger", action="store_true", help="also the meta-device ledger (slow: seconds a case)")
    parser.add_argument("--quick", action="store_true", help="tiny only")
    parser.add_argument("--residency", nargs=3, metavar=("SPEC", "BATCH", "MODE"),
                        help="the third step's booked storages against the RSS and their resident pages (one case)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.child:
        return child(args.child, args.batch, args.mode, args.precision)
    if args.residency:
        return residency(args.residency[0], int(args.residency[1]), args.residency[2])

    import torch

    from forge.model import build_model
    from forge.spec.load import load_spec
    from forge.train.memory_estimate import estimate, ledger_peaks, model_shapes

    GB = 1e9
    rows, results = [], []
    for spec_path, batch in CASES[:2] if args.quick else CASES:
        spec = load_spec(ROOT / spec_path, ["train.precision=fp32", "data.grad_accum=1"]).spec
        shapes = model_shapes(spec, build_model(spec.model, spec.objective, device="meta"))
        for mode in MODES:
            predicted = estimate(spec, shapes, "cpu", "fp32", micro_batch=batch, grad_accum=1,
                                 seq_len=spec.data.seq_len, mode=mode)
            ledger = (ledger_peaks(spec, (batch,), spec.data.seq_len, mode)[0].peak
                      if args.ledger else None)
            live = measure(spec_path, batch, mode, args.threads, FIXED_MMAP)
            default = measure(spec_path, batch, mode, args.threads, {})
            record = {"spec": spec_path, "batch": batch, "seq_len": spec.data.seq_len, "mode": mode,
                      "estimate_gb": predicted.total / GB, "estimate_parts_gb": {k: v / GB for k, v in predicted.bytes().items()},
                      "ledger_gb": None if ledger is None else ledger / GB,
                      "measured_fixed_mmap_gb": None if live is None else live / GB,
                      "measured_default_gb": None if default is None else default / GB}
            results.append(record)

            def gb(x):
                return "undecidable (non-finite step)" if x is None else f"{x / GB:.3f}"

            def ratio(x):
                return "-" if x is None else f"{predicted.total / x:.2f}"

            rows.append([spec_path, f"{batch}x{spec.data.seq_len}", mode, f"{predicted.total / GB:.3f}",
                         "-" if ledger is None else f"{ledger / GB:.3f}", gb(live), ratio(live), gb(default),
                         ratio(default)])
            print(rows[-1], flush=True)
    print(table(["spec", "batch x seq", "checkpointing", "estimate (GB)", "ledger, tensors (GB)",
                 "measured, fixed mmap (GB)", "estimate / measured", "measured, glibc default (GB)",
                 "estimate / default"], rows))
    write_result("memory_estimate" + ("_quick" if args.quick else ""),
                 {"measure": "peak anonymous RSS minus its value before the model is built, three training "
                             "steps (the third through VmHWM), fp32, CPU",
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(), "results": results})


if __name__ == "__main__":
    main()
