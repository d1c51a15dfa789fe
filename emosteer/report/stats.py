"""Statistics of the measured results: one percentile bootstrap, used by every interval.

``bootstrap(stat, n)`` resamples ``n`` items (prompts, pairs, values) with replacement,
all resamples drawn at once from a seeded ``torch.Generator`` so a result is reproducible
and the statistic can be computed for every resample in one vectorised call. Its users:

* :func:`bootstrap_ci` / :func:`summarize`: the 95 % interval of a mean (the demo's
  paired deltas);
* ``emosteer.analysis.attribution.layers``: the band and stage confidence of a layer
  profile, prompts resampled;
* ``emosteer.analysis.attribution.heads.head_map``: the interval of every head's
  patching recovery, pairs resampled (a ratio of means).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

__all__ = ["bootstrap", "bootstrap_ci", "summarize"]


def bootstrap(stat: Callable[[torch.Tensor], torch.Tensor], n: int, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap over ``n`` items.

    ``stat`` receives the ``[n_boot, n]`` matrix of resampled item indices (one resample
    per row) and returns the statistic of every resample, ``[n_boot, ...]``. Returns
    ``(draws, interval)``: the statistics as float64 and the ``level`` percentile
    interval, ``[..., 2]`` (lower, upper), quantiles interpolated linearly. Needs
    ``n >= 2`` (one item has no sampling spread)."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 items, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    draws = torch.as_tensor(stat(idx)).to(torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return draws, draws.quantile(q, dim=0).movedim(0, -1)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (nan, nan for < 2 values)."""
    vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if len(vals) < 2:
        return (math.nan, math.nan)
    _, ci = bootstrap(lambda idx: vals[idx].mean(-1), len(vals), n_boot, level, seed)
    return (float(ci[0]), float(ci[1]))


def summarize(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """mean, sd, min/median/max, n and a 95 % bootstrap CI of the mean."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": [None, None],
                "min": None, "median": None, "max": None}
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    s = sorted(vals)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    lo, hi = bootstrap_ci(vals, seed=seed)
    ci = [None if math.isnan(lo) else lo, None if math.isnan(hi) else hi]
    return {"n": n, "mean": mean, "sd": sd, "ci95": ci, "min": s[0], "median": med, "max": s[-1]}
