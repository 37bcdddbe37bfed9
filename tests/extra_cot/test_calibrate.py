"""Calibration rule: reference length and the strictly monotone target level."""
import itertools

import numpy as np
import pytest

from data.formats import LEVELS
from experiments.extra_cot.calibrate import calibration_target, reference_length


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


def _row(uid, acc, *, ref=100, think=(20, 45, 60, 80, 100)):
    """A calibration row: greedy verdicts = acc > 0.5, sampled accuracy ``acc``."""
    return {"uid": uid, "ref_len": ref, "target": None,
            "levels": {str(lv): {"correct": a > 0.5, "think_length": t, "cot_ids": []}
                       for lv, a, t in zip(LEVELS, acc, think)},
            "accuracy": {str(lv): a for lv, a in zip(LEVELS, acc)}}


def test_budget_targets_give_hard_questions_the_long_levels():
    from experiments.extra_cot.calibrate import budget_targets, level_accuracy
    easy = [_row(f"e{i}", (1.0, 1.0, 1.0, 1.0, 1.0)) for i in range(6)]
    hard = [_row(f"h{i}", (0.2, 0.4, 1.0, 1.0, 1.0)) for i in range(4)]
    none = [_row("n", (0.0,) * 5, ref=None)]
    rows = easy + hard + none
    targets, info = budget_targets(rows, 0.36)
    # costs are the mean realized ratios (0.2, 0.45, 0.6, 0.8, 1.0); 6 x 0.2 + 4 x 0.6 = 3.6
    assert targets == [20] * 6 + [60] * 4 + [None]
    assert info["planned_ratio"] == pytest.approx(0.36, abs=1e-6)
    assert info["costs"]["40"] == pytest.approx(0.45)
    tight, _ = budget_targets(rows, 0.2)
    assert tight == [20] * 10 + [None]
    assert level_accuracy({"levels": {str(lv): {"correct": lv >= 60} for lv in LEVELS}}) == {
        20: 0.0, 40: 0.0, 60: 1.0, 80: 1.0, 100: 1.0}


def test_length_weights_predict_each_questions_share_of_the_tokens():
    from experiments.extra_cot.calibrate import length_weights
    rows = [{"question_tokens": q, "ref_len": 10 + 2 * q} for q in (5, 10, 20)]
    rows.append({"question_tokens": 7, "ref_len": None})            # no reference: not fitted
    # ref_len = 10 + 2 q exactly: predictions 30, 50 for q = 10, 20 -> shares 0.75, 1.25
    np.testing.assert_allclose(length_weights(rows, [10, 20]), [0.75, 1.25], rtol=1e-6)
    assert length_weights(rows, [10, 20]).dtype == np.float32
    assert length_weights(rows, []).shape == (0,)
    same = [{"question_tokens": 8, "ref_len": r} for r in (30, 50)]   # one length: no line
    np.testing.assert_array_equal(length_weights(same, [3, 9]), [1.0, 1.0])


def test_length_costs_make_long_questions_dearer():
    from experiments.extra_cot.calibrate import budget_targets
    # two questions gain from 60 alike at the same ratios; the long one (ref 300) spends
    # three times the short one's tokens: shares 0.5 and 1.5 of the mean
    rows = [_row("short", (0.2, 0.4, 1.0, 1.0, 1.0), ref=100),
            _row("long", (0.2, 0.4, 1.0, 1.0, 1.0), ref=300, think=(60, 135, 180, 240, 300))]
    by_level, _ = budget_targets(rows, 0.3)
    by_length, info = budget_targets(rows, 0.3, costs_by="length")
    # per question, one move to 60 costs (0.2 + 0.6) / 2 = 0.4 > 0.3: nobody moves; by
    # tokens the short one's move costs (0.5 x 0.6 + 1.5 x 0.2) / 2 = 0.3 exactly
    assert by_level == [20, 20] and by_length == [60, 20]
    assert info["planned_ratio"] == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(ValueError, match="costs_by"):
        budget_targets(rows, 0.3, costs_by="tokens")


def test_policy_targets_follow_the_config():
    import ml_collections
    from experiments.extra_cot.calibrate import policy_targets
    rows = [_row("e", (1.0,) * 5), _row("h", (0.2, 0.4, 1.0, 1.0, 1.0))]
    rows[0]["target"], rows[1]["target"] = 20, 60
    config = ml_collections.ConfigDict({"rl": {"budget": None, "budget_targets": "allocation",
                                               "budget_two_sided": True}})
    assert policy_targets(config, rows) == [20, 60]       # no budget: the paper's targets
    config.rl.budget = 0.2
    assert policy_targets(config, rows) == [20, 20]       # the budget's allocation
    config.rl.budget_targets = "calibration"
    assert policy_targets(config, rows) == [20, 60]


def test_length_buckets_and_pooled_allocation():
    from experiments.extra_cot.calibrate import budget_targets, length_buckets
    assert length_buckets([5, 5, 9, 9], 2) == [0, 0, 1, 1]
    assert length_buckets([3, 1, 2], 1) == [0, 0, 0]
    with pytest.raises(ValueError, match="buckets"):
        length_buckets([1], 0)
    # short questions: level 20 suffices; long ones need 60. One long question's own answers
    # say 20 is enough (a lucky sample); pooled over its length bucket it still gets 60.
    short = [_row(f"s{i}", (1.0,) * 5) for i in range(4)]
    long = [_row(f"l{i}", (0.2, 0.4, 1.0, 1.0, 1.0)) for i in range(3)]
    long.append(_row("lucky", (1.0,) * 5))
    rows = short + long
    for r in short:
        r["question_tokens"] = 10
    for r in long:
        r["question_tokens"] = 30
    alone, _ = budget_targets(rows, 0.4)
    pooled, _ = budget_targets(rows, 0.4, buckets=2)
    assert alone[-1] == 20 and pooled[-1] == 60 and pooled[:4] == [20] * 4
    del rows[0]["question_tokens"]
    with pytest.raises(ValueError, match="question_tokens"):
        budget_targets(rows, 0.4, buckets=2)
