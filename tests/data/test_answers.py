"""data/answers.py: extraction, normalisation and exact equivalence.

Every expected value below was written by hand.
"""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.answers import (MAX_ANSWER_CHARS, extract_answer_is, extract_boxed, extract_gsm8k_answer,
                          is_equivalent, normalize_answer)

# (pred, gold, equivalent?)
PAIRS = [
    # integers, signs, separators
    ("42", "42", True), ("042", "42", True), ("+7", "7", True), ("-5", "\u22125", True),
    ("-(5)", "-5", True), ("5", "-5", False), ("- 5", "-5", True), ("1,000", "1000", True),
    ("1\\,000", "1000", True), ("1{,}000{,}000", "1000000", True), ("12 345", "12345", True),
    ("1,000", "1", False), ("10,00", "1000", False), ("1,234.5", "1234.5", True),
    # decimals and fractions
    ("3.0", "3", True), ("3.01", "3", False), (".5", "1/2", True), ("0.50", "\\frac{1}{2}", True),
    ("0.333", "\\frac13", False), ("\\frac12", "\\frac{1}{2}", True), ("\\dfrac{2}{4}", "1/2", True),
    ("\\tfrac{3}{6}", "0.5", True), ("\\frac1{2}", "0.5", True), ("\\frac{1}2", "0.5", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True), ("\\frac{1}{-2}", "-0.5", True),
    ("\\frac{1}{2}", "-\\frac{1}{2}", False), ("\\frac{3}{4}", "\\frac{4}{3}", False),
    ("\\frac{10}{4}", "2.5", True), ("7/2", "3.5", True), ("2\\frac{1}{2}", "\\frac52", True),
    ("2\\frac{1}{2}", "1", False),
    # percentages
    ("50\\%", "50", True), ("50%", "0.5", True), ("50\\%", "5", False), ("0.5\\%", "0.005", True),
    # square roots
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("2\\sqrt3", "\\sqrt{12}", True), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\sqrt{2}", "1.414", False), ("\\sqrt{16}", "4", True), ("\\sqrt{\\frac{1}{4}}", "0.5", True),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{1}{2}+\\frac{\\sqrt{5}}{2}", True),
    ("1+\\sqrt{5}", "1-\\sqrt{5}", False), ("3\\sqrt{2}", "2\\sqrt{3}", False),
    ("\u221a2", "\\sqrt{2}", True), ("sqrt(2)", "\\sqrt2", True), ("2 \\cdot 3", "6", True),
    ("2\\times 3", "6", True), ("2^{10}", "1024", True), ("2^{-1}", "0.5", True), ("2^{10}", "1000", False),
    # LaTeX decoration, units, assignments
    ("$5$", "5", True), ("\\boxed{5}", "5", True), ("10\\text{ cm}", "10", True),
    ("10 \\text{cm}^2", "10", True), ("\\$5.00", "5", True), ("5 dollars", "5", True),
    ("30^\\circ", "30", True), ("30^{\\circ}", "30", True), ("90\u00b0", "90", True),
    ("x = 5", "5", True), ("x=5", "6", False), ("5.", "5", True), ("\\left( 3, 4 \\right)", "(3,4)", True),
    ("\\text{(B)}", "B", True), ("(B)", "B", True), ("\\textbf{(C)}", "B", False),
    # tuples, intervals, sets, lists
    ("(1, 2)", "(1,2)", True), ("(1,2)", "(2,1)", False), ("[0, 1)", "[0,1)", True),
    ("[0,1)", "(0,1]", False), ("\\{1,2\\}", "\\{2, 1\\}", True), ("1, 2", "2,1", True),
    ("1, 2", "12", False), ("(0,100)", "(0, 100)", True), ("(0,100)", "100", False),
    ("(\\frac12, \\sqrt{4})", "(0.5, 2)", True), ("(1,2,3)", "(1,2)", False),
    # symbolic answers compared as cleaned text
    ("\\frac{\\pi}{3}", "\\frac\\pi3", True), ("\\dfrac{\\pi}{3}", "\\frac{\\pi}{3}", True),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}", False), ("x^2 + 1", "x^2+1", True), ("2x", "2", False),
    ("2 x", "2", False), ("\\text{Monday}", "Monday", True), ("Tuesday", "Monday", False),
    # no answer
    (None, "5", False), ("", "5", False), ("\\frac{1}{2", "0.5", False), ("}5{", "5", False),
    ("5", "", False), ("1/0", "1/0", False), ("0^{0}", "1", False),
]


def test_table_is_large_and_mixed():
    assert len(PAIRS) >= 60
    assert sum(eq for *_, eq in PAIRS) >= 30 and sum(not eq for *_, eq in PAIRS) >= 30


@pytest.mark.parametrize("pred,gold,expected", PAIRS)
def test_equivalence_table(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected
    if pred is not None:   # equivalence is symmetric
        assert is_equivalent(gold, pred) is expected


@pytest.mark.parametrize("text,expected", [
    ("42", "42"), ("-3.50", "-7/2"), ("\\frac{6}{8}", "3/4"), ("2\\sqrt{12}", "4*sqrt(3)"),
    ("-\\sqrt{2}", "-sqrt(2)"), ("\\frac{1+\\sqrt5}{2}", "1/2+1/2*sqrt(5)"), ("12.5\\%", "25/2"),
    ("\\$1,000.50", "2001/2"), ("(1, \\frac{1}{2}]", "(1,1/2]"), ("\\{3, 1, 2\\}", "{1,2,3}"),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{3}"), ("\\left[ 0, 1 \\right)", "[0,1)"), ("k = 7.", "7"),
    ("", None), ("   ", None), ("\\frac{1}{2", None), ("1/0", None), ("x" * (MAX_ANSWER_CHARS + 1), None),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}.", "5"), ("\\boxed{1} then \\boxed{2}", "2"), ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"), ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\boxed{1} and \\boxed{2", None), ("\\boxed{", None), ("\\boxed{}", None),
    ("\\boxed 5", None), ("no box", None), ("\\boxedx{3}", None), (None, None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_gsm8k_and_answer_is():
    assert extract_gsm8k_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert extract_gsm8k_answer("a #### 1\nb\n#### -1,000") == "-1,000"
    assert extract_gsm8k_answer("no marker") is None
    assert extract_gsm8k_answer("####   ") is None
    assert extract_answer_is("x\nThe answer is: \\frac{1}{2}") == "\\frac{1}{2}"
    assert extract_answer_is("the answer is 7.") == "7"
    assert extract_answer_is("The answer is:") is None


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def test_adversarial_inputs_are_bounded():
    deep = "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}"
    out, seconds = _timed(extract_boxed, deep)
    assert out == "{" * 100_000 + "}" * 100_000 and seconds < 2.0
    unclosed = "\\boxed{" * 50_000
    assert _timed(extract_boxed, unclosed)[0] is None
    for text in ("{" * 500 + "1" + "}" * 500, "(" * 400 + "1" + ")" * 400, "9" * 900,
                 "10^{10^{10}}", "9^{9999}", "\\sqrt{" + "9" * 59 + "}", "2^" * 300 + "2",
                 "5 " + "a" * 900 + "!", "5" + " ab" * 300 + "!", "\\frac{" * 300 + "}" * 300,
                 "x=" * 400 + "1", "1," * 450 + "1", " " * 990 + "%x"):
        value, seconds = _timed(normalize_answer, text)
        assert seconds < 1.0, text[:30]
        assert value is None or isinstance(value, str)
    assert normalize_answer("9" * 61) == "9" * 61   # too many digits: compared as text
    assert normalize_answer("10^{10^{10}}") == "10^{10^{10}}"
    assert not is_equivalent("9" * 2000, "9" * 2000)   # longer than MAX_ANSWER_CHARS


LATEX_BITS = st.sampled_from(["\\frac", "\\sqrt", "\\boxed", "{", "}", "(", ")", "[", "]", "\\{",
                              "\\}", "^", "-", "+", "/", ",", ".", "%", "\\%", "$", "1", "23", "0",
                              "\\left(", "\\right)", "\\text{cm}", "x", "=", " ", "\\pi", "\\cdot",
                              "\\dfrac", "\u221a", "\\,", "e", "cm", "ab", "\\sqrt[3]",
                              "\\fbox", "####", "The answer is:", "\n", "\u2212"])
TEXTS = st.one_of(st.text(max_size=200), st.lists(LATEX_BITS, max_size=40).map("".join))


@settings(max_examples=300, deadline=1000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS, TEXTS)
def test_fuzz_never_raises(a, b):
    for text in (a, b):
        boxed = extract_boxed(text)
        assert boxed is None or (boxed and boxed in text)
        normal = normalize_answer(text)
        assert normal is None or isinstance(normal, str)
        assert extract_gsm8k_answer(text) is None or "####" in text
    result = is_equivalent(a, b)
    assert result is False or (normalize_answer(a) is not None and normalize_answer(b) is not None)


@settings(max_examples=200, deadline=1000, derandomize=True)
@given(st.fractions(max_denominator=10**6).filter(lambda q: abs(q.numerator) < 10**9))
def test_fuzz_fraction_forms_agree(q):
    """a/b, \\frac{a}{b} and (for terminating decimals) the decimal are one value."""
    plain, tex = f"{q.numerator}/{q.denominator}", f"\\frac{{{q.numerator}}}{{{q.denominator}}}"
    assert is_equivalent(plain, tex) and normalize_answer(tex) == str(q)
    assert not is_equivalent(plain, f"{q.numerator + 1}/{q.denominator}")
    scaled = q * 10**6
    if scaled.denominator == 1:   # terminating decimal: write it out exactly
        sign, digits = "-" if scaled < 0 else "", f"{abs(scaled.numerator):07d}"
        assert is_equivalent(f"{sign}{digits[:-6]}.{digits[-6:]}", plain)
        assert not is_equivalent(f"{sign}{digits[:-6]}.{digits[-6:]}1", plain)


def _square_free(m: int) -> bool:
    return all(m % (d * d) for d in range(2, int(m**0.5) + 1))


@settings(max_examples=150, deadline=1000, derandomize=True)
@given(st.integers(1, 3000), st.integers(1, 3000))
def test_fuzz_square_roots_reduce_exactly(a, b):
    """sqrt(a^2 b) = a sqrt(b), and the canonical radicand is square-free."""
    assert is_equivalent(f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{{{b}}}")
    canonical = normalize_answer(f"\\sqrt{{{a * a * b}}}")
    if "sqrt(" in canonical:
        radicand = int(canonical.split("sqrt(")[1].rstrip(")"))
        assert radicand > 1 and _square_free(radicand) and b % radicand == 0
    else:
        assert int(canonical) ** 2 == a * a * b


@pytest.mark.parametrize("pred, gold", [
    ("5\\text{or}6", "56"),          # issue 25: a \text between numbers never merges them
    ("3\\text{ or }-3", "0"),
    ("2 \\text{ or } (3)", "6"),
    ("\\text{not } 5", "5"),         # words before the number are not decoration
    ("2 or more", "2"),              # "or more" is not a unit
    ("at least 4", "4"),
    ("x = 3", "y=3"),                # an answer for another variable
])
def test_text_and_words_that_change_the_answer_are_not_dropped(pred, gold):
    assert not is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("5\\text{ cm}", "5"), ("5\\text{cm}^2", "5"), ("12 dollars", "12"), ("x = 3", "x=3"),
    ("x=3", "3"), ("3", "y = 3"), ("\\text{(B)}", "B"),
])
def test_units_and_assignments_still_match(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold, expected", [
    # scientific notation, on either side, exactly
    ("1.5e3", "1500", True), ("1500", "1.5e3", True), ("8.05e-06", "0.00000805", True),
    ("8.05e-06", "8.05e-6", True), ("8.05E-06", "8.05e-06", True), ("2e+5", "200000", True),
    ("8.05e-06", "8.05e-05", False), ("1.5e3", "150", False), ("1e1001", "1e1001", True),
    # beyond MAX_EXPONENT the literal is text: equal only to the same text
    ("1e1001", "1e1000", False),
    # big integers compared exactly, not as text
    ("1" * 70 + ".0", "1" * 70, True), ("1" * 70, "1" * 69 + "2", False),
    ("9" * 900, "9" * 900 + ".00", True),
    # dashes that stand for minus signs
    ("\u20103", "-3", True), ("\u20113", "-3", True), ("\u20123", "-3", True),
    ("\ufe633", "-3", True), ("\uff0d3", "-3", True), ("\u20143", "-3", False),
    # mixed numbers: an integer and a proper fraction of integers
    ("2\\frac{1}{2}", "2.5", True), ("-2\\frac{1}{2}", "-5/2", True), ("3 \\frac34", "15/4", True),
    ("2\\frac{1}{2}", "1", False), ("10^2\\frac{1}{2}", "100.5", False),
    # several boxes: the last one, or all of them where the gold answer is a list of as many
    ("\\boxed{3} and \\boxed{4}", "3, 4", True), ("\\boxed{4} and \\boxed{3}", "3, 4", True),
    ("\\boxed{3} and \\boxed{4}", "(3, 4)", True), ("\\boxed{4} and \\boxed{3}", "(3, 4)", False),
    ("\\boxed{3} and \\boxed{4}", "4", True), ("\\boxed{3} and \\boxed{4}", "3", False),
    ("\\boxed{3} and \\boxed{4}", "3, 4, 5", False), ("\\boxed{3}", "3, 4", False),
    # \text never merges the numbers around it
    ("3\\text{ or }-3", "0", False), ("2 \\text{ or } (3)", "6", False),
])
def test_issue_22_answer_forms(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected


def test_extract_boxed_all_takes_outermost_boxes_in_order():
    from data.answers import extract_boxed_all
    assert extract_boxed_all(r"\boxed{1} then \boxed{\boxed{2}} and \boxed{}") == ["1", r"\boxed{2}"]
    assert extract_boxed_all(r"\boxed{1} \boxed{2") == ["1"]
    assert extract_boxed_all(None) == [] and extract_boxed_all("no box") == []


def test_the_largest_answers_get_a_verdict():
    """At the bounds (the longest literal, the largest exponent, many roots, deep nesting)
    the checker answers True or False and raises nothing."""
    from data.latex_numbers import MAX_EXPONENT, MAX_LITERAL_DIGITS
    worst = ["9" * MAX_LITERAL_DIGITS, "9" * 500 + f"e{MAX_EXPONENT}",
             " + ".join(["\\sqrt{%d}" % p for p in range(2, 99)]),
             "\\boxed{1}" * 100, "(" * 40 + "1" + ")" * 40]
    for text in worst:
        assert is_equivalent(text, text + " ") in (True, False)
    assert is_equivalent("9" * 990, "9" * 990 + ".0")   # inside MAX_ANSWER_CHARS too


@pytest.mark.parametrize("pred, gold, expected", [
    ("-7+1i", "-7.0 + 1.0i", True), ("-7+i", "-7+1i", True), ("3i", "3*i", True),
    ("-i", "-1i", True), ("i", "1i", True), ("5+0i", "5", True),
    ("\\frac12+\\frac{\\sqrt3}{2}i", "0.5 + \\frac{\\sqrt{3}}{2} i", True),
    ("1+2i, 3", "3, 1+2i", True), ("x = 2-3i", "2-3i", True),
    ("2-3i", "2+3i", False), ("-7+1i", "-7", False), ("1i", "1", False),
    ("\\pi", "i", False), ("xi", "x", False),
])
def test_complex_numbers_are_read_as_numbers(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected
