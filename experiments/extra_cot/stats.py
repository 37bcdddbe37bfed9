"""Intervals and paired tests for accuracies measured on the same held-out questions.

Every accuracy this project reports comes with an interval, and every claim
that one method beats another on the same questions comes from a paired test:

- :func:`wilson_interval`: the 95% score interval of a binomial proportion
  (Wilson 1927). It stays inside [0, 1] and keeps its coverage near 0 and 1,
  where the normal (Wald) interval does not.
- :func:`mean_interval`: a Student-t interval of a mean over a few seeds.
- :func:`mcnemar`: the exact McNemar test on paired correct/wrong verdicts:
  only the discordant questions count, and under the null hypothesis each of
  them is a fair coin (two-sided binomial p-value).
- :func:`paired_bootstrap`: the difference of two accuracies on the same
  questions with a percentile interval, resampling questions (Efron &
  Tibshirani 1993; Koehn 2004 for its use in comparing systems).

>>> lo, hi = wilson_interval(50, 100)
>>> round(lo, 4), round(hi, 4)
(0.4038, 0.5962)
>>> mcnemar([1, 1, 1, 0], [0, 0, 0, 0])["p_value"]
0.25
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["wilson_interval", "mean_interval", "mcnemar", "paired_bootstrap", "Z95"]

Z95 = 1.959963984540054   # the 0.975 quantile of the standard normal


def _counts(k, n) -> tuple[int, int]:
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int")
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in [0, n={n}]")
    return int(k), int(n)


def wilson_interval(k: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n``.

    .. math::  \\frac{\\hat p + z^2/2n \\pm z\\sqrt{\\hat p(1-\\hat p)/n + z^2/4n^2}}{1 + z^2/n}

    ``n == 0`` gives (0, 1): nothing is known.
    """
    k, n = _counts(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)   # exact ends: no float rounding there
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def mean_interval(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of ``values`` (seeds).

    One value gives (v, v, v) (no spread can be estimated); non-finite values
    raise, so a NaN never hides in an interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_interval needs a non-empty 1-D list, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_interval got non-finite values {x.tolist()}")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1)")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired verdicts need two 1-D arrays of one length, got {a.shape} "
                         f"and {b.shape}")
    for name, v in (("a", a), ("b", b)):
        if v.size and not np.all((v == 0) | (v == 1)):
            raise ValueError(f"verdicts {name} must be 0/1 (or bool)")
    return a.astype(bool), b.astype(bool)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired verdicts ``a[i]``, ``b[i]`` on question i.

    Returns ``{"n", "a_only", "b_only", "p_value"}``: ``a_only`` questions that
    only ``a`` answers, ``b_only`` the reverse; the two-sided p-value is
    ``min(1, 2 * P[Bin(a_only + b_only, 1/2) <= min(a_only, b_only)])``.
    """
    a, b = _paired(a, b)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    m = a_only + b_only
    p = 1.0 if m == 0 else min(1.0, 2.0 * float(_scipy_stats.binom.cdf(min(a_only, b_only), m, 0.5)))
    return {"n": int(a.size), "a_only": a_only, "b_only": b_only, "p_value": p}


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], *, samples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy difference ``mean(a) - mean(b)`` on the same questions, resampled.

    Returns ``{"n", "diff", "ci": [low, high], "p_value"}``: questions are drawn
    with replacement ``samples`` times (``numpy.random.default_rng(seed)``: the
    same inputs give the same interval); the two-sided p-value is twice the
    share of resampled differences on the far side of 0, at most 1.
    """
    a, b = _paired(a, b)
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 100:
        raise ValueError(f"samples={samples!r} must be an int >= 100")
    d = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = np.empty(samples)
    for start in range(0, samples, 1000):   # 1,000 resamples at a time bounds the memory
        stop = min(samples, start + 1000)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        draws[start:stop] = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    diff = float(d.mean())
    if diff == 0 and not np.any(d):
        p = 1.0
    else:
        p = min(1.0, 2.0 * float(min(np.mean(draws <= 0), np.mean(draws >= 0))))
    return {"n": int(d.size), "diff": diff, "ci": [float(lo), float(hi)], "p_value": p}
