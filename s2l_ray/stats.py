"""Statistics that can say no: paired differences between two selection methods, and bootstrap intervals.

Two methods are compared on the same evaluation items and the same seeds, so the comparison is
paired: ``x[s, i]`` and ``y[s, i]`` are seed s's score of item i (exact match 0/1, or its response
loss) under each. The difference is the mean over seeds and items of ``x - y``; its 95% interval is
a percentile bootstrap that resamples seeds and items together (the same draws for both methods),
so it carries the spread over training seeds as well as over evaluation items. A method wins only
where the interval excludes 0.
"""
from __future__ import annotations

import numpy as np


def paired_differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per seed, the mean over items of ``x - y`` (``x``, ``y``: [seeds, items])."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"paired scores must be two [seeds, items] arrays of one shape, got {x.shape} and {y.shape}")
    return (x - y).mean(axis=1)


def bootstrap_interval(x: np.ndarray, y: np.ndarray, *, draws: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """The mean paired difference of ``x - y`` and its percentile bootstrap interval (seeds and items
    resampled with replacement, together for both methods): ``(mean, low, high)``."""
    paired_differences(x, y)  # checks the shapes
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    seeds, items = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for k in range(0, draws, 500):  # in blocks: [block, seeds, items] index arrays stay small
        n = min(500, draws - k)
        s = rng.integers(0, seeds, (n, seeds))
        i = rng.integers(0, items, (n, items))
        means[k:k + n] = d[s[:, :, None], i[:, None, :]].mean(axis=(1, 2))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)


def verdict(low: float, high: float, lower_is_better: bool = False) -> str:
    """``better``, ``worse`` or ``no difference`` for an interval of (method - baseline)."""
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "no difference"
