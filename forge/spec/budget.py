"""The memory budget check: a spec whose parameters alone cannot fit in this machine's memory is refused
before anything is allocated (an absurd model.vocab_size would otherwise abort the process)."""
from __future__ import annotations

import os

from forge.errors import ForgeError

# fp32 weights, their gradient and two optimizer moments: the least any training step holds per parameter
# (Grokfast's EMA, the non-finite guard's kept copy and the activations come on top)
TRAIN_BYTES_PER_PARAM = 16


def available_bytes(device: str) -> tuple[int | None, str]:
    """(bytes free for this run, where): free CUDA memory on cuda (auto: if present), else MemAvailable."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name(0)}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
    except (ValueError, OSError, AttributeError):
        return None, "available RAM"


def total_bytes(device: str) -> tuple[int | None, str]:
    """(the device's memory, what it is): the first GPU's total memory on cuda (None without one), else total RAM."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            return None, "no CUDA device on this machine"
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"total memory of {props.name}"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "total RAM"
    except (ValueError, OSError, AttributeError):
        return None, "total RAM unknown"


def check_memory_budget(spec) -> int:
    """The parameter count of the model built from spec.model (on the meta device: nothing allocated);
    ForgeError (exit 2) when parameters x TRAIN_BYTES_PER_PARAM exceed the memory available."""
    from forge.model import build_model, count_parameters

    params = count_parameters(build_model(spec.model, spec.objective, device="meta"))["total"]
    free, where = available_bytes(spec.train.device)
    need = params * TRAIN_BYTES_PER_PARAM
    if free is not None and need > free:
        raise ForgeError(f"the model of this spec has {params:,} parameters: training needs at least "
                         f"{need / 2**30:,.1f} GiB ({TRAIN_BYTES_PER_PARAM} bytes per parameter), but only "
                         f"{free / 2**30:,.1f} GiB are {where}; reduce model.vocab_size, model.d_model, "
                         "model.n_layers or the ffn widths")
    return params
