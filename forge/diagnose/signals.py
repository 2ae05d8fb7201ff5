"""Robust signals over a metric's logged series: each reads a window of the most recent logging
steps, so one noisy step never decides a diagnosis.

    mean        mean over the window
    max / min   extreme over the window
    last        the latest value
    trend       relative change across the window from a least-squares line: slope * (n - 1) / |mean|
                (-0.3: fell by ~30% of its level; ~0: flat)
    roughness   std of step-to-step differences / mean |value| (oscillation amplitude relative to level)
    spikes      points whose robust z-score (vs the window median and MAD) exceeds 5
    improvement relative drop from the mean of the first `window` values of the run to the last `window`
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def slope(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, _mean(xs)
    return sum((i - xm) * (v - ym) for i, v in enumerate(xs)) / sum((i - xm) ** 2 for i in range(n))


def trend(xs: Sequence[float]) -> float:
    level = abs(_mean(xs))
    return slope(xs) * (len(xs) - 1) / level if level > 0 else 0.0


def roughness(xs: Sequence[float]) -> float:
    if len(xs) < 3:
        return 0.0
    diffs = [b - a for a, b in zip(xs, xs[1:])]
    level = _mean([abs(x) for x in xs])
    return statistics.pstdev(diffs) / level if level > 0 else 0.0


def spikes(xs: Sequence[float], z: float = 5.0) -> float:
    if len(xs) < 5:
        return 0.0
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs) * 1.4826
    if mad == 0:
        return 0.0
    return float(sum(1 for x in xs if (x - med) / mad > z))


WINDOWED: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": _mean, "max": max, "min": min, "last": lambda xs: xs[-1], "trend": trend,
    "roughness": roughness, "spikes": spikes,
}


def compute(signal: str, series: Sequence[tuple[int, float]], window: int) -> tuple[float, int, int] | None:
    """(value, first step, last step) of `signal` over the last `window` points, or None if the series
    is shorter than the window (not enough evidence yet)."""
    finite = [(s, v) for s, v in series if v is not None and math.isfinite(v)]
    if signal == "improvement":
        if len(finite) < 2 * window:
            return None
        head, tail = [v for _, v in finite[:window]], [v for _, v in finite[-window:]]
        start = _mean(head)
        value = (start - _mean(tail)) / abs(start) if start else 0.0
        return value, finite[0][0], finite[-1][0]
    if signal == "nonfinite":  # share of logged values that are NaN/inf
        tail = series[-window:]
        if len(tail) < window:
            return None
        bad = sum(1 for _, v in tail if v is None or not math.isfinite(v))
        return bad / len(tail), tail[0][0], tail[-1][0]
    tail = finite[-window:]
    if len(tail) < window:
        return None
    return WINDOWED[signal]([v for _, v in tail]), tail[0][0], tail[-1][0]


SIGNALS = tuple(WINDOWED) + ("improvement", "nonfinite")
