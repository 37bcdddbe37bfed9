"""Per-equation error classes and restatement profiles (experiments/extra_cot/diagnose.py)."""
import pytest

from experiments.extra_cot import diagnose

REF = ("Leo starts with 10.\nFirst, a friend gives him 8 more, so I add them.\n10+08=18\n"
       "Next, the number becomes 2 times as large, so I multiply.\n18*02=36\n"
       "Then Leo buys 9 more, so I add them.\n36+09=45\nSo the answer is 45.")


def test_step_equations_and_restatements():
    assert diagnose.step_equations(REF) == [("10", "+", "08", "18"), ("18", "*", "02", "36"),
                                            ("36", "+", "09", "45")]
    assert diagnose.restated_steps(REF) == [True, True, True]
    bare = "10+08=18\nNext, the number becomes 2 times, so I multiply.\n18*02=36\n36+09=45"
    assert diagnose.restated_steps(bare) == [False, True, False]
    # a check equation inside a sentence is not a step
    assert diagnose.step_equations("18*02=36 Quick check: 36/02=18, good.") == []


@pytest.mark.parametrize("cot, want", [
    (REF, ("final-copy", None)),
    ("10+08=18\n18+02=20\n20+09=29", ("op", 1)),
    ("10+08=18\n19*02=38\n38+09=47", ("x-copy", 1)),
    ("10+08=18\n18*03=54\n54+09=63", ("operand", 1)),
    ("10+08=18\n18*02=36\n36+09=44", ("arith", 2)),
    ("10+08=18\n18*02=36", ("missing-step", 2)),
    ("10+08=18\n18*02=36\n36+09=45\n45+09=54", ("extra-step", 3)),
])
def test_first_error_classes(cot, want):
    assert diagnose.first_error(REF, cot) == want


class _Tok:
    """Ids are characters: enough for decode-based profiles."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_restatement_profile_counts_all_some_none():
    rows = [{"level": 40, "ratio": 0.4, "cot_ids": [ord(c) for c in text]} for text in (
        "so I add.\n10+08=18\nso I multiply.\n18*02=36",       # all
        "so I add.\n10+08=18\n18*02=36",                       # some
        "10+08=18\n18*02=36")]                                  # none
    out = diagnose.restatement_profile(_Tok(), rows)
    assert out[40] == {"rows": 3, "all": pytest.approx(1 / 3), "some": pytest.approx(1 / 3),
                       "none": pytest.approx(1 / 3), "ratio": pytest.approx(0.4)}
    assert out[20]["rows"] == 0
