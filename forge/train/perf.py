"""Performance accounting: the machine's measured matmul peak and the model's counted FLOPs (MFU)."""
from __future__ import annotations

import time

import torch


def matmul_peak_flops(device: torch.device, n: int = 1024, repeats: int = 5,
                      dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a square n x n matmul in `dtype` (default fp32) on `device` (best of `repeats`)."""
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class FlopCounter:
    """torch's own FLOP counter over a block (forward + backward of the model), when enabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = 0
        self._mode = None

    def __enter__(self) -> "FlopCounter":
        if self.enabled:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.total = self._mode.get_total_flops()
            # torch's counter ignores `groups` in convolution_backward: a depthwise convolution's backward
            # (the memory's causal conv) is counted as a dense one, ~channels x too much. Its backward is 2 x
            # its forward, which the counter gets right.
            counts = self._mode.get_flop_counts().get("Global", {})
            backward = counts.get(torch.ops.aten.convolution_backward, 0)
            if backward:
                self.total += 2 * counts.get(torch.ops.aten.convolution, 0) - backward
            self._mode = None
