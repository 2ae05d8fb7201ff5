"""Precision check (CFG: a precision the device only emulates trains >100x slower, and nothing else says so)."""
from __future__ import annotations

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


@register("precision_native")
def precision_native(ctx: CheckContext) -> Outcome:
    """The precision the run will compute in (train.precision resolved on train.device, forge.train.precision),
    and whether the device computes it natively: an explicit bf16 where bf16 is emulated fails, naming the
    measured slowdown of its matmuls and the remedy."""
    from forge.train.components import resolve_device
    from forge.train.precision import resolve_precision

    precision = resolve_precision(ctx.spec.train.precision, resolve_device(ctx.spec.train.device))
    measured = precision.describe()
    expected = "bf16 only where the device computes it natively"
    if precision.name == "bf16" and not precision.bf16_native:
        slowdown = 1 / precision.peaks.bf16_speedup
        return failed(measured, expected,
                      f"bf16 matmuls run {slowdown:.1f}x slower than fp32 here "
                      f"({precision.peaks.bf16_flops / 1e9:.1f} vs {precision.peaks.fp32_flops / 1e9:.0f} GFLOP/s): "
                      'set train.precision = "auto" (or "fp32")', data=precision.record())
    detail = f"runs in {precision.name}"
    if precision.name == "fp32" and precision.bf16_native:
        detail += (f"; bf16 is native here ({precision.peaks.bf16_speedup:.1f}x the fp32 matmul speed): "
                   'train.precision = "auto" would use it')
    return passed(measured, expected, detail, data=precision.record())
