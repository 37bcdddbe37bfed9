"""Keep-masks, ratios, level windows, re-bucketing and the annotation ranking (data/compression.py)."""
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data.compression import (CompressedCoT, annotation_order, complete_questions, compress,
                              importance_scores, keep_mask, keep_mask_batch, level_for_ratio,
                              measured_ratio, num_kept, rebucket, sentence_units,
                              unit_keep_mask)


@pytest.mark.parametrize("n, ratio, expected", [
    (10, 0.2, 2), (5, 0.3, 2), (5, 0.1, 1), (3, 0.5, 2), (5, 0.5, 3), (4, 0.125, 1),
    (7, 0.0, 0), (7, 1.0, 7), (0, 0.7, 0), (9, 0.25, 2), (11, 0.05, 1), (12, 0.2, 2)])
def test_num_kept_rounds_half_up(n, ratio, expected):
    # 5 * 0.5 = 2.5 -> 3 (Python's round gives 2); 0.3 * 5 = 1.5 -> 2 despite 0.3 < 3/10 in binary.
    assert num_kept(n, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "a", None])
def test_ratio_is_validated_with_its_value_named(ratio):
    with pytest.raises(ValueError, match=re.escape(repr(ratio))):
        keep_mask([0.1, 0.2], ratio)
    with pytest.raises(ValueError, match="ratio"):
        compress([1, 2], [0.1, 0.2], ratio)


def test_keep_mask_hand_examples():
    np.testing.assert_array_equal(keep_mask([0.1, 0.9, 0.5, 0.9], 0.5), [False, True, False, True])
    np.testing.assert_array_equal(keep_mask([1, 1, 1, 1], 0.5), [True, True, False, False])
    np.testing.assert_array_equal(keep_mask([3, 1, 2, 5, 4], 0.6), [True, False, False, True, True])
    assert compress([10, 11, 12, 13, 14], [3, 1, 2, 5, 4], 0.6) == [10, 13, 14]
    assert compress([7, 8, 9], [0.0, 0.0, 0.0], 1 / 3) == [7]


def _reference(scores, ratio):
    k = num_kept(len(scores), ratio)
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return sorted(top)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=40), st.floats(0.0, 1.0))
def test_exact_count_and_original_order(raw, ratio):
    scores = [float(s) for s in raw]
    ids = list(range(100, 100 + len(scores)))
    mask = keep_mask(np.asarray(scores), ratio)
    assert mask.sum() == num_kept(len(scores), ratio)
    kept = compress(ids, scores, ratio)
    assert kept == [ids[i] for i in _reference(scores, ratio)]
    assert kept == sorted(kept)  # ids increase with position: order preserved


def test_batched_matches_rows_and_ignores_padding():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(4, 9)).astype(np.float64)
    lengths = np.array([9, 5, 0, 3])
    ratios = np.array([0.5, 0.2, 0.9, 1.0])
    mask = keep_mask_batch(scores, lengths, ratios)
    for b in range(4):
        row = np.zeros(9, dtype=bool)
        row[:lengths[b]] = keep_mask(scores[b, :lengths[b]], ratios[b])
        np.testing.assert_array_equal(mask[b], row)
    assert mask[:, 5:][1].sum() == 0 and mask[2].sum() == 0
    assert keep_mask_batch(scores, lengths, 0.4).sum(axis=1).tolist() == [4, 2, 0, 1]


def test_batched_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="rank 2"):
        keep_mask_batch(np.zeros(3), [3], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        keep_mask_batch(np.zeros((1, 3)), [4], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        keep_mask([0.1, math.nan], 0.5)


def test_measured_ratio_and_windows():
    assert measured_ratio([1, 2, 3], [1, 2, 3, 4, 5, 6]) == 0.5
    assert measured_ratio(3, 10) == 0.3
    with pytest.raises(ValueError, match="positive"):
        measured_ratio(0, 0)
    cases = {0.05: None, 0.0999: None, 0.1: 20, 0.2: 20, 0.2999: 20, 0.3: 40, 3 / 10: 40,
             0.49: 40, 0.5: 60, 0.7: 80, 0.8999: 80, 0.9: 100, 1.0: 100, 1.1: 100, 1.1001: None}
    for r, level in cases.items():
        assert level_for_ratio(r) == level, r


def _sample(q, target, kept, full=10):
    return CompressedCoT(question_id=q, target_ratio=target, think_ids=tuple(range(kept)), full_length=full)


def test_rebucket_and_complete_questions_by_hand():
    samples = [
        _sample("q1", 0.1, 1), _sample("q1", 0.2, 2), _sample("q1", 0.3, 3), _sample("q1", 0.5, 5),
        _sample("q1", 0.7, 7), _sample("q1", 0.9, 9), _sample("q1", 0.95, 10),
        _sample("q2", 0.2, 2), _sample("q2", 0.4, 4), _sample("q2", 0.8, 8), _sample("q2", 1.0, 10),
        _sample("q3", 0.05, 0, 20)]
    full = rebucket(samples, one_per_level=False)
    assert {lv: {q: [s.target_ratio for s in g] for q, g in b.items()} for lv, b in full.items()} == {
        20: {"q1": [0.1, 0.2], "q2": [0.2]}, 40: {"q1": [0.3], "q2": [0.4]}, 60: {"q1": [0.5]},
        80: {"q1": [0.7], "q2": [0.8]}, 100: {"q1": [0.9, 0.95], "q2": [1.0]}}
    one = rebucket(samples)
    assert [s.target_ratio for s in one[20]["q1"]] == [0.2]  # measured 0.2 is nearest 0.20
    assert [s.target_ratio for s in one[100]["q1"]] == [0.95]  # measured 1.0 is nearest 1.00
    done = complete_questions(one)
    assert all(set(b) == {"q1"} for b in done.values())
    assert set(complete_questions(one, levels=(20, 40, 80, 100))[40]) == {"q1", "q2"}
    with pytest.raises(ValueError, match="30"):
        complete_questions(one, levels=(30,))


def test_annotation_order_by_hand():
    # positions:   0  1  2  3  4  5  6  7  8  9
    levels = np.array([0, 2, 2, 2, 0, 1, 1, 1, 0, 0])
    spans = np.array([0, 1, 1, 1, 2, 3, 3, 3, 4, 4])
    is_eq = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    plain = annotation_order(levels, spans, is_eq, protect_ratios=())
    assert plain.tolist() == [1, 2, 3, 5, 6, 7, 0, 4, 8, 9]
    # k(0.5) = 5 would cut the supporting equation 5-7: it is deferred, filler fills the gap.
    assert annotation_order(levels, spans, is_eq, protect_ratios=(0.5,)).tolist() == \
        [1, 2, 3, 0, 4, 5, 6, 7, 8, 9]
    # strict levels: no supporting unit fits the gap, so the equation straddles the cut.
    assert annotation_order(levels, spans, is_eq, protect_ratios=(0.5,), strict_levels=True).tolist() == \
        plain.tolist()
    scores = importance_scores(levels, spans, is_eq, protect_ratios=())
    np.testing.assert_allclose(scores[plain], np.arange(10, 0, -1) / 10)
    np.testing.assert_array_equal(keep_mask(scores, 0.3), np.isin(np.arange(10), [1, 2, 3]))



def test_sub_rank_orders_inside_a_level():
    levels = np.array([0, 0, 2, 0, 0])
    spans = np.arange(5)
    is_eq = np.zeros(5, dtype=bool)
    sub = np.array([0, 1, 0, 2, 1])
    order = annotation_order(levels, spans, is_eq, sub_rank=sub, protect_ratios=())
    assert order.tolist() == [2, 3, 1, 4, 0]
    with pytest.raises(ValueError, match="sub_rank"):
        annotation_order(levels, spans, is_eq, sub_rank=sub[:3])


def test_sentence_units_by_hand():
    pieces = ["Ben", " has", " 3", ".", "\n", "He", " buys", " 8", ".", " So", " I", " add", ".",
              "\n", "0", "3", "+", "0", "8", "=", "1", "1", "\n", "So", " 11", ".  "]
    assert sentence_units(pieces).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                               3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4]
    assert sentence_units([]).tolist() == []
    assert sentence_units(["?", "!", "a"]).tolist() == [0, 1, 2]


def test_unit_keep_mask_by_hand():
    scores = [.9, .9, .1, .1, .5, .8, .8, .8]
    units = [0, 0, 1, 1, 2, 3, 3, 3]
    # room 4 of 8: unit 0 (2), unit 3 (3) does not fit, unit 2 (1) does; unit 1 would not
    assert unit_keep_mask(scores, units, 0.5).tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert unit_keep_mask(scores, units, 0.65).tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    assert unit_keep_mask(scores, units, 1.0).all() and not unit_keep_mask(scores, units, 0.0).any()
    # a unit's rank is its mean score: [.9, .0] (mean .45) loses to [.5]
    assert unit_keep_mask([.9, .0, .5], [0, 0, 1], 0.34).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="one length"):
        unit_keep_mask([.1, .2], [0], 0.5)
    with pytest.raises(ValueError, match="ratio"):
        unit_keep_mask([.1], [0], 1.5)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 1.0)), min_size=0, max_size=12),
       st.floats(0.0, 1.0))
def test_unit_keep_mask_never_cuts_a_unit_and_stays_within_the_count(units, ratio):
    sizes = [size for size, _ in units]
    unit_ids = np.repeat(np.arange(len(units)), sizes).astype(int)
    scores = np.repeat([score for _, score in units], sizes)
    mask = unit_keep_mask(scores, unit_ids, ratio)
    n = len(unit_ids)
    assert mask.sum() <= num_kept(n, ratio)
    for u in range(len(units)):            # all or nothing of every unit
        assert len(set(mask[unit_ids == u].tolist())) <= 1
    # with single-token units it is exactly keep_mask
    if n:
        assert (unit_keep_mask(scores, np.arange(n), ratio) == keep_mask(scores, ratio)).all()


def test_unit_keep_mask_priority_units_go_first():
    scores = [.9, .9, .1, .1, .1]
    units = [0, 0, 1, 1, 1]
    # room 3 of 5: by score unit 0 (2 tokens) and nothing else fits; with unit 1 first it does
    assert unit_keep_mask(scores, units, 0.6).tolist() == [1, 1, 0, 0, 0]
    assert unit_keep_mask(scores, units, 0.6, priority=[0, 0, 0, 1, 0]).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="priority"):
        unit_keep_mask(scores, units, 0.6, priority=[0, 1])
