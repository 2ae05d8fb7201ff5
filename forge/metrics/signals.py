"""Robust signals over a metric's logged series. Each reads a window of the most recent logging
steps (never one reading), over finite values:

    mean        mean over the window
    median      median over the window (for noisy timings: one outlier never decides)
    max / min   extreme over the window
    last        the latest value
    spread      max - min over the window (a stepwise setting such as data/seq_len changed: > 0)
    sum         total over the window (a counter's increments: events in the window)
    trend       relative change across the window from a least-squares line: slope * (n - 1) / |mean|
                (-0.3: fell by ~30% of its level; ~0: flat)
    roughness   std of step-to-step differences / mean |value| (oscillation amplitude relative to level)
    spikes      points whose robust z-score (residual from the window's trend line vs its MAD) exceeds 5
    zlast       z-score of the latest value against the window before it
    improvement relative drop from the mean of the first `window` values of the run to the last `window`
    growth      relative rise from the first `window` values of the run to the last `window`
    nonfinite   share of logged values in the window that are NaN/inf (null in the JSONL)
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def slope(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, mean(xs)
    return sum((i - xm) * (v - ym) for i, v in enumerate(xs)) / sum((i - xm) ** 2 for i in range(n))


def trend(xs: Sequence[float]) -> float:
    level = abs(mean(xs))
    return slope(xs) * (len(xs) - 1) / level if level > 0 else 0.0


def roughness(xs: Sequence[float]) -> float:
    if len(xs) < 3:
        return 0.0
    diffs = [b - a for a, b in zip(xs, xs[1:])]
    level = mean([abs(x) for x in xs])
    return statistics.pstdev(diffs) / level if level > 0 else 0.0


def spikes(xs: Sequence[float], z: float = 5.0) -> float:
    """Points far above the window's trend: residuals from a Theil-Sen line (median of pairwise slopes,
    so neither a falling loss nor the spikes themselves tilt it), robust z-score against the residuals'
    median and MAD."""
    if len(xs) < 5:
        return 0.0
    n = len(xs)
    b = statistics.median((xs[j] - xs[i]) / (j - i) for i in range(n) for j in range(i + 1, n))
    residuals = [x - b * i for i, x in enumerate(xs)]
    ym = mean(xs)
    centre = statistics.median(residuals)
    # floor: 0.1% of the level, so an exactly smooth synthetic series does not divide by zero
    mad = max(statistics.median(abs(r - centre) for r in residuals) * 1.4826, 1e-3 * abs(ym), 1e-12)
    return float(sum(1 for r in residuals if (r - centre) / mad > z))


def robust_z(xs: Sequence[float]) -> list[float]:
    """Each value's robust z-score against the sample: (x - median) / (1.4826 MAD); the MAD is floored at 0.1%
    of the median's magnitude, so identical values score 0 rather than dividing by zero. A non-finite value
    scores inf (it carries any spike)."""
    finite = [x for x in xs if math.isfinite(x)]
    if not finite:
        return [math.inf] * len(xs)
    centre = statistics.median(finite)
    mad = max(statistics.median(abs(x - centre) for x in finite) * 1.4826, 1e-3 * abs(centre), 1e-12)
    return [(x - centre) / mad if math.isfinite(x) else math.inf for x in xs]


def zlast(xs: Sequence[float]) -> float:
    before, latest = xs[:-1], xs[-1]
    std = statistics.pstdev(before) if len(before) > 1 else 0.0
    return (latest - mean(before)) / std if std > 0 else 0.0


WINDOWED: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": mean, "median": statistics.median, "max": max, "min": min, "last": lambda xs: xs[-1], "spread": lambda xs: max(xs) - min(xs), "sum": sum, "trend": trend,
    "roughness": roughness, "spikes": spikes, "zlast": zlast,
}
RUN_LEVEL = ("improvement", "growth")
SIGNALS = (*WINDOWED, *RUN_LEVEL, "nonfinite")


def compute(signal: str, series: Sequence[tuple[int, float | None]], window: int) -> tuple[float, int, int] | None:
    """(value, first step, last step) of `signal` over the last `window` points, or None if the series
    is shorter than the window (not enough evidence yet)."""
    finite = [(s, v) for s, v in series if v is not None and math.isfinite(v)]
    if signal in RUN_LEVEL:
        if len(finite) < 2 * window:
            return None
        start, end = mean([v for _, v in finite[:window]]), mean([v for _, v in finite[-window:]])
        change = (start - end) if signal == "improvement" else (end - start)
        return (change / abs(start) if start else 0.0), finite[0][0], finite[-1][0]
    if signal == "nonfinite":
        tail = series[-window:]
        if len(tail) < window:
            return None
        bad = sum(1 for _, v in tail if v is None or not math.isfinite(v))
        return bad / len(tail), tail[0][0], tail[-1][0]
    tail = finite[-window:]
    if len(tail) < window:
        return None
    return WINDOWED[signal]([v for _, v in tail]), tail[0][0], tail[-1][0]
