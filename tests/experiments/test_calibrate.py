"""Calibration rule: reference length and the strictly monotone target level."""
import itertools

import pytest

from data.formats import LEVELS
from experiments.calibrate import calibration_target, reference_length


def verdicts(*bits):
    return dict(zip(LEVELS, bits))


@pytest.mark.parametrize("bits, want", [
    ((1, 1, 1, 1, 1), 20),
    ((0, 1, 1, 1, 1), 40),
    ((1, 0, 1, 1, 1), 60),     # a lucky 20 above a failed 40 does not count
    ((1, 1, 1, 1, 0), None),   # the full CoT fails: no target
    ((0, 0, 0, 0, 1), 100),
    ((0, 0, 0, 0, 0), None),
    ((1, 1, 0, 1, 1), 80),
])
def test_target_hand_cases(bits, want):
    assert calibration_target(verdicts(*map(bool, bits))) == want


def test_target_is_strictly_monotone_on_every_pattern():
    for bits in itertools.product((False, True), repeat=len(LEVELS)):
        got = calibration_target(verdicts(*bits))
        if got is None:
            assert not bits[-1]
            continue
        k = LEVELS.index(got)
        assert all(bits[k:]), (bits, got)          # every level from the target up solves it
        assert k == 0 or not bits[k - 1], (bits, got)  # the level just below does not


def test_target_needs_every_level():
    with pytest.raises(ValueError, match="missing"):
        calibration_target({20: True, 100: True})


def test_reference_length():
    assert reference_length(True, 173) == 173
    assert reference_length(False, 173) is None
    assert reference_length(True, 0) is None
    with pytest.raises(ValueError, match="think_length"):
        reference_length(True, -1)
