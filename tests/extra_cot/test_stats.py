"""Intervals and paired tests (experiments/extra_cot/stats.py) against hand-computed values."""
import math

import numpy as np
import pytest

from experiments.extra_cot import stats


def test_wilson_hand_computed():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half = 1.96 * sqrt(0.0025 + 0.000096) / 1.0384
    lo, hi = stats.wilson_interval(50, 100)
    half = stats.Z95 * math.sqrt(0.25 / 100 + stats.Z95 ** 2 / 40000) / (1 + stats.Z95 ** 2 / 100)
    assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    # k = 0: the lower end is 0 and the upper end is z^2 / (n + z^2)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(stats.Z95 ** 2 / (10 + stats.Z95 ** 2))
    lo, hi = stats.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + stats.Z95 ** 2))
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_width_at_1000():
    # the arithmetic: 1,000 questions give a half-width near 1.96 * 1.5 points at 50%
    lo, hi = stats.wilson_interval(500, 1000)
    assert (hi - lo) / 2 == pytest.approx(0.031, abs=0.001)


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (1.5, 10), (1, -1), (True, 10)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        stats.wilson_interval(k, n)


def test_mean_interval_hand_computed():
    mean, lo, hi = stats.mean_interval([0.70, 0.72, 0.74])
    # sd = 0.02, t_{0.975, 2} = 4.302653, half = 4.302653 * 0.02 / sqrt(3)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert mean == pytest.approx(0.72)
    assert lo == pytest.approx(0.72 - half) and hi == pytest.approx(0.72 + half)
    assert stats.mean_interval([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_interval([0.5, float("nan")])
    with pytest.raises(ValueError):
        stats.mean_interval([])


def test_mcnemar_exact():
    out = stats.mcnemar([1, 1, 1, 0], [0, 0, 0, 0])
    assert out == {"n": 4, "a_only": 3, "b_only": 0, "p_value": 0.25}   # 2 * 0.5**3
    # 10 discordant pairs split 8 / 2: 2 * P[Bin(10, .5) <= 2] = 2 * 56 / 1024
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    assert stats.mcnemar(a, b)["p_value"] == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar(b, a)["p_value"] == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar([1, 0], [1, 0])["p_value"] == 1.0


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.7
    b = a.copy()
    flip = rng.choice(1000, size=100, replace=False)
    b[flip[:80]] = False          # b loses 80 of a's questions where a was right or wrong
    out = stats.paired_bootstrap(a, b, samples=2000, seed=1)
    assert out["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    lo, hi = out["ci"]
    assert lo < out["diff"] < hi and lo > 0 and out["p_value"] < 0.01
    assert stats.paired_bootstrap(a, b, samples=2000, seed=1) == out   # seeded: same interval
    same = stats.paired_bootstrap(a, a, samples=500)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_paired_inputs_checked():
    with pytest.raises(ValueError, match="one length"):
        stats.mcnemar([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        stats.paired_bootstrap([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="samples"):
        stats.paired_bootstrap([1], [1], samples=10)


def test_docstring_examples_run():
    import doctest
    failures, tried = doctest.testmod(stats)
    assert tried >= 2 and failures == 0
