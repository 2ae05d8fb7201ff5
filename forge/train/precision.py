"""Which precision a run computes in: train.precision = "auto" | "fp32" | "bf16", resolved against the device.

bf16 autocast pays only where the hardware computes bf16 natively. Measured (techniques.md section 7): an
AMD EPYC with AVX-512 BF16 runs a bf16 matmul ~4x faster than fp32; an EPYC with AVX2 only emulates it,
over 100x *slower* (0.3-0.8 GFLOP/s against ~102). So "auto" asks two things of the device:

  1. torch's own capability queries: on CPU oneDNN's bf16 support plus the AVX-512 BF16 / AMX instructions
     (torch.cpu._is_avx512_bf16_supported, _is_amx_tile_supported); on CUDA is_bf16_supported without
     emulation;
  2. a short measured matmul ratio, bf16 FLOP/s over fp32 FLOP/s: native means at least MIN_BF16_SPEEDUP.

and resolves to bf16 when both say native, else fp32. The measurement (the machine's fp32 and bf16 matmul
peaks) is cached per machine under the forge cache dir ($FORGE_CACHE_DIR/machine/<key>.json, the key naming
the device, its capability, the torch version and the thread count), so that `forge check` measures once;
a training run measures again at its start (~0.1-0.3 s) and the cache keeps the best of each peak, so that a
measurement taken under outside load does not stay the MFU's denominator. The queries run every time (cheap). perf/mfu divides by the peak of the precision that actually runs, native only: a bf16 run on
a device that emulates bf16 is measured against the fp32 peak, the machine's real capability.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# bf16 counts as native when its matmuls run at least this much faster than fp32 (native AVX-512 BF16: ~2-4x;
# emulated: < 0.01x). Below it bf16 autocast buys nothing on the matmuls and costs casts.
MIN_BF16_SPEEDUP = 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MachinePeaks:
    """Measured matmul FLOP/s of this machine (square n x n, best of a few), cached per machine."""
    fp32_flops: float
    bf16_flops: float
    n: int                       # the size of the fp32 (and, where fast, bf16) measurement
    measured_at: str

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_flops / self.fp32_flops


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run on its device, with the evidence."""
    setting: str                 # train.precision as written: auto | fp32 | bf16
    name: str                    # what runs: fp32 | bf16
    device: str                  # cpu | cuda
    capability: str              # e.g. "AVX512 +avx512_bf16" or the GPU's name
    bf16_query: bool             # torch's capability queries report native bf16
    bf16_native: bool            # ... and the measured matmul ratio agrees
    peaks: MachinePeaks

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def peak_flops(self) -> float:
        """The matmul peak of what runs: the bf16 peak only where bf16 is native, never an emulation speed."""
        return self.peaks.bf16_flops if self.name == "bf16" and self.bf16_native else self.peaks.fp32_flops

    def describe(self) -> str:
        """One line for the start output and `forge check`."""
        ratio = self.peaks.bf16_speedup
        speed = f"bf16 matmul {ratio:.2f}x fp32" if ratio >= 0.1 else f"bf16 matmul {1 / ratio:.0f}x slower than fp32"
        native = "native bf16" if self.bf16_native else "no native bf16"
        how = f"{self.setting} -> {self.name}" if self.setting == "auto" else self.name
        return f"{how} ({self.device} {self.capability}: {native}, {speed})"

    def record(self) -> dict:
        """What environment.json records."""
        return {"setting": self.setting, "resolved": self.name, "device": self.device,
                "capability": self.capability, "bf16_query": self.bf16_query, "bf16_native": self.bf16_native,
                "bf16_speedup": round(self.peaks.bf16_speedup, 4), "peak_flops": self.peak_flops,
                "peaks": asdict(self.peaks)}


def resolve_precision(setting: str, device: torch.device, refresh: bool = False) -> Precision:
    """train.precision on `device`: auto -> bf16 where bf16 is native (queries and measured ratio), else fp32;
    fp32 and bf16 as written (the checklist fails an explicit bf16 that is not native). refresh: see
    machine_peaks (training runs refresh the cached peaks)."""
    query, capability = bf16_query(device)
    peaks = machine_peaks(device, refresh)
    native = query and peaks.bf16_speedup >= MIN_BF16_SPEEDUP
    name = ("bf16" if native else "fp32") if setting == "auto" else setting
    return Precision(setting, name, device.type, capability, query, native, peaks)


# ------------------------------------------------------------------------------------------------ queries
def bf16_query(device: torch.device) -> tuple[bool, str]:
    """(torch reports native bf16 on `device`, the capability it reports)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [name for name, query in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))
             if getattr(torch.cpu, query, lambda: False)()]
    native = bool(flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return native, " ".join([capability, *(f"+{f}" for f in flags)])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ measurement
def measure_peaks(device: torch.device, rounds: int = 5) -> MachinePeaks:
    """fp32 and bf16 matmul peaks, the two interleaved round by round (best of each), so that load from other
    processes hits both alike and the ratio holds. An emulated bf16 (over 100x slower) is recognised on a
    256 x 256 probe and measured there only, so that the measurement stays short (~0.3 s) where it is slow."""
    from forge.train.perf import matmul_peak_flops

    n = 4096 if device.type == "cuda" else 1024
    probe = {dtype: matmul_peak_flops(device, 256, repeats=3, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    emulated = probe[torch.bfloat16] < probe[torch.float32] / 20
    fp32 = bf16 = 0.0
    for _ in range(rounds):
        fp32 = max(fp32, matmul_peak_flops(device, n, repeats=1))
        if not emulated:
            bf16 = max(bf16, matmul_peak_flops(device, n, repeats=1, dtype=torch.bfloat16))
    return MachinePeaks(fp32, max(bf16, probe[torch.bfloat16]), n, time.strftime("%Y-%m-%dT%H:%M:%S"))


def machine_key(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": device.type, "name": name, "capability": bf16_query(device)[1], "torch": torch.__version__,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


_MEMO: dict[Path, MachinePeaks] = {}
_REFRESHED: set[Path] = set()


def peaks_path(device: torch.device) -> Path:
    from forge.data.cache import default_cache_dir

    key = machine_key(device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "machine" / f"{device.type}-{digest}.json"


def machine_peaks(device: torch.device, refresh: bool = False) -> MachinePeaks:
    """This machine's matmul peaks: measured once, then read from the cache. refresh (a training run, once per
    process): measure again and keep the best of each peak, so that a first measurement taken while other
    processes loaded the machine does not stay the MFU's denominator."""
    path = peaks_path(device)
    peaks = _MEMO.get(path)
    if peaks is None and path.is_file():
        try:
            peaks = MachinePeaks(**json.loads(path.read_text())["peaks"])
        except (OSError, ValueError, KeyError, TypeError):
            peaks = None                   # unreadable: measure again and rewrite it
    if peaks is None or (refresh and path not in _REFRESHED):
        new = measure_peaks(device)
        if peaks is not None:
            new = MachinePeaks(max(peaks.fp32_flops, new.fp32_flops), max(peaks.bf16_flops, new.bf16_flops),
                               new.n, new.measured_at)
        peaks = new
        _REFRESHED.add(path)
        _write_atomic(path, {"key": machine_key(device), "peaks": asdict(peaks)})
    _MEMO[path] = peaks
    return peaks


def _write_atomic(path: Path, obj: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass          # a read-only cache dir: measure again next time, never fail the run for it
