"""Final-answer extraction and safe equivalence checking for math benchmarks.

Nothing here evaluates model output as code: no ``eval``, ``sympify`` or
``ast.literal_eval``. Numbers are read by the parser of ``data/latex_numbers.py`` into
exact values ``sum_i q_i * sqrt(n_i)`` (``q_i`` a ``fractions.Fraction``,
``n_i`` a square-free positive integer), so ``2\\sqrt{3}``, ``\\sqrt{12}`` and
``\\frac{6}{\\sqrt3}`` compare equal while ``0.333`` and ``\\frac13`` do not.
Every entry point accepts arbitrary text and answers "no answer" (``None`` /
``False``) instead of raising; work is linear in the text length and bounded
by ``MAX_ANSWER_CHARS`` here and the digit/bit caps of ``data/latex_numbers.py``.

Answers that are not numbers (``\\frac{\\pi}{3}``, ``x^2+1``, ``\\text{Monday}``)
fall back to a cleaned string comparison (whitespace, ``$``,
``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` and TeX shorthand such as
``\\frac12`` normalised). A comma list is a tuple inside ``(...)``/``[...]``
(ordered; ``[0,1)`` and ``(0,1]`` differ) and a set when bare or inside
``\\{...\\}`` (order ignored). A percentage ``p\\%`` normalises to ``p``;
:func:`is_equivalent` also accepts it against a gold ``p/100``.

Known limitation: a mixed number ``2\\frac{1}{2}`` is ambiguous (2.5 or 1) and
is compared as a string, never as a number.

>>> is_equivalent(extract_boxed(r"so \\boxed{\\dfrac{\\sqrt{12}}{4}}."), r"\\frac{\\sqrt3}{2}")
True
>>> normalize_answer(r"\\$1,000.50")
'2001/2'
"""
from __future__ import annotations

import re
from fractions import Fraction

from data.latex_numbers import NotANumber, format_number, multiply, parse_number

__all__ = [
    "extract_boxed", "extract_boxed_all", "extract_gsm8k_answer", "extract_answer_is",
    "normalize_answer", "is_equivalent", "MAX_ANSWER_CHARS",
]

MAX_ANSWER_CHARS = 1000   # longer answers are "no answer" (other bounds: data/latex_numbers.py)

# ----------------------------------------------------------------- extraction
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.S)


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing a group whose ``{`` sits just before ``start``.

    ``\\{`` and ``\\}`` are escaped and do not count; ``None`` if never closed.
    """
    depth = 1
    for m in _BRACE_OR_ESCAPE.finditer(text, start):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed {...}`` / ``\\fbox{...}``.

    "Last" is the box that *opens* last, so ``\\boxed{\\boxed{3}}`` gives ``3``.
    Nested braces are matched (escaped ``\\{ \\}`` ignored) in one linear scan.
    If that box never closes (a truncated generation), or is empty, the text
    has no answer: ``None``.

    >>> extract_boxed(r"\\boxed{1} then \\boxed {\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_OPEN.finditer(text):
        pass
    if last is None:
        return None
    end = _closing_brace(text, last.end())
    if end is None:
        return None
    content = text[last.end():end].strip()
    return content or None


def extract_boxed_all(text: str) -> list[str]:
    """Contents of every outermost box, in order (a box inside a box is part of it).

    An unclosed box ends the list; empty boxes are skipped.

    >>> extract_boxed_all(r"x = \\boxed{3} or \\boxed{-3}")
    ['3', '-3']
    """
    out: list[str] = []
    if not isinstance(text, str):
        return out
    pos = 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        end = _closing_brace(text, m.end())
        if end is None:
            break
        content = text[m.end():end].strip()
        if content:
            out.append(content)
        pos = end + 1
    return out


def extract_gsm8k_answer(solution: str) -> str | None:
    """Text after the last ``####`` marker (GSM8K convention), on its line.

    >>> extract_gsm8k_answer("48/2 = <<48/2=24>>24 clips\\n#### 72")
    '72'
    """
    if not isinstance(solution, str) or "####" not in solution:
        return None
    tail = solution.rsplit("####", 1)[1].split("\n", 1)[0].strip().rstrip(".").strip()
    return tail or None


_ANSWER_IS = re.compile(r"the answer is\s*:?", re.I)


def extract_answer_is(text: str) -> str | None:
    """Text after the last "The answer is:" (MetaMathQA convention), on its line."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end():].split("\n", 1)[0].strip().rstrip(".").strip()
    return tail or None


# ----------------------------------------------------------------- cleaning
# minus signs: U+2212 minus, U+2010 hyphen, U+2011 non-breaking hyphen, U+2012 figure dash,
# U+2013 en dash, U+FE63 small hyphen-minus, U+FF0D fullwidth hyphen-minus (not the em dash,
# which joins words and ranges)
_UNICODE = (("\u2212", "-"), ("\u2010", "-"), ("\u2011", "-"), ("\u2012", "-"), ("\u2013", "-"),
            ("\ufe63", "-"), ("\uff0d", "-"), ("\u00d7", "\\times "), ("\u00f7", "\\div "),
            ("\u00b7", "\\cdot "), ("\u221a", "\\sqrt "), ("\\$", ""), ("$", ""))
_THOUSANDS_TEX = re.compile(r"(?<=\d)(?:\\,|\{,\})(?=\d{3}(?!\d))")
_THOUSANDS_FULL = re.compile(r"[+-]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|[bB]igg?|displaystyle)(?![A-Za-z])")
_SPACES = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_FRACS = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|\u00b0")
_BARE_SQRT = re.compile(r"(?<![A-Za-z\\])sqrt(?![A-Za-z])")
_SHORT_FIRST = re.compile(r"\\(frac|sqrt)(?![A-Za-z])\s*(\d|\\[A-Za-z]+|[A-Za-z])")
_SHORT_SECOND = re.compile(r"\\frac\s*(\{(?:[^{}]|\{[^{}]*\})*\})\s*(\d|\\[A-Za-z]+|[A-Za-z])")
_PERCENT = re.compile(r"\s*\\?%\s*$")
# a mixed number: an integer, then a proper fraction of integers (2\frac{1}{2} is 5/2)
_MIXED = re.compile(r"(?<![\d.}^_])(\d+)\s*\\frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}")
_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_TEXT = re.compile(_TEXT.pattern + r"(?:\s*\^\s*(?:\{\d\}|\d))?")   # 5\text{cm}^2
# only trailing text groups are units: a \text between numbers is words (5\text{or}6 is not 56)
_TRAILING_UNIT_TEXT = re.compile(r"(?:\s*" + _UNIT_TEXT.pattern + r")+\s*$")
_NOT_UNITS = frozenset({"or", "and", "nor", "not", "more", "less", "than", "at", "least", "most",
                        "to", "about", "over", "under", "either", "neither", "plus", "minus",
                        "times", "only", "no", "none", "or more", "approximately"})
"""Words after a number that change its meaning, so they are never read as its unit."""
_ASSIGN = re.compile(r"\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*=\s*(?P<rhs>[^=]+)")
_UNIT = r"[A-Za-z]{2,}(?:\^\{?\d\}?)?\.?"   # a unit word: cm, cm^2, sq., dollars
_UNIT_WORDS = re.compile(rf"(?P<head>.*?[\d}}.)])(?:\s+{_UNIT})+\s*")   # words need spaces between
_CHOICE = re.compile(r"\(([A-E])\)")


def _balanced(s: str) -> bool:
    """Unescaped braces balance (``\\{``/``\\}`` are literal and ignored)."""
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(s):
        depth += {"{": 1, "}": -1}.get(m.group(), 0)
        if depth < 0:
            return False
    return depth == 0


def _clean(s) -> tuple[str, bool] | None:
    """Strip TeX decoration; returns (text, had a trailing percent sign) or None."""
    if not isinstance(s, str):
        return None
    s = s.strip()
    if not s or len(s) > MAX_ANSWER_CHARS or not _balanced(s):
        return None
    if _BOX_OPEN.search(s):
        s = extract_boxed(s)
        if s is None:
            return None
    for old, new in _UNICODE:
        s = s.replace(old, new)
    s = _THOUSANDS_TEX.sub("", s)
    s = _SPACES.sub(" ", _LEFT_RIGHT.sub("", s))
    s = _DEGREE.sub("", _FRACS.sub(r"\\frac", s))
    s = _BARE_SQRT.sub(r"\\sqrt", s)
    s = _SHORT_SECOND.sub(lambda m: f"\\frac{m[1]}{{{m[2]}}}",
                          _SHORT_FIRST.sub(lambda m: f"\\{m[1]}{{{m[2]}}}", s))
    s = _MIXED.sub(lambda m: f"({m[1]}+\\frac{{{m[2]}}}{{{m[3]}}})"
                   if int(m[2]) < int(m[3]) else m[0], s)
    percent = _PERCENT.search(s) is not None
    s = _PERCENT.sub("", s).strip().rstrip(".").strip()
    return (s, percent) if s else None


# ------------------------------------------------------------ structured values
# ("num", surd dict, percent) | ("str", text) | ("seq", open, close, items) | ("set", sorted canon texts)

def _element(e: str, percent: bool) -> tuple:
    """One answer item: a number if it reads as one, else cleaned text."""
    m = _ASSIGN.fullmatch(e)
    if m:
        e = m["rhs"]
    e = e.strip()
    if not e:
        raise NotANumber("empty item")
    no_text, unwrapped = _TRAILING_UNIT_TEXT.sub("", e).strip(), _TEXT.sub(r"\1", e).strip()
    unit = _UNIT_WORDS.fullmatch(no_text)
    if unit and any(w.lower().rstrip(".") in _NOT_UNITS for w in no_text[unit.end("head"):].split()):
        unit = None   # "2 or more" is not 2 with a unit
    for candidate in (no_text, unwrapped, unit["head"] if unit else ""):
        if candidate:
            try:
                return ("num", parse_number(candidate), percent)
            except NotANumber:
                pass
    value = _complex(no_text)
    if value is not None:
        return value
    text = re.sub(r"\s+", "", unwrapped)
    return ("str", _CHOICE.sub(r"\1", text) if _CHOICE.fullmatch(text) else text)


# a + bi, a - i, bi, -i (i last, the real part first; a and b any number this module reads)
_COMPLEX = re.compile(r"(?P<re>.*?)(?P<sign>(?<![{(^*/])[+-]|^)(?P<im>[^+-]*?)\s*(?:\*\s*)?i")


def _complex(e: str) -> tuple | None:
    """``("cplx", real, imaginary)`` surd dicts of ``a + bi``-style text, a real number
    when the imaginary part is 0, else None."""
    m = _COMPLEX.fullmatch(e.replace(" ", ""))
    if m is None:
        return None
    try:
        real = parse_number(m["re"]) if m["re"] else {}
        imag = parse_number(m["im"]) if m["im"] else parse_number("1")
    except NotANumber:
        return None
    if m["sign"] == "-":
        imag = multiply(imag, parse_number("-1"))
    return ("num", real, False) if not imag else ("cplx", real, imag)


def _split_top(s: str) -> list[str]:
    """Split on commas outside any ( [ { group."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _brackets(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) when one bracket pair encloses the whole text."""
    if len(s) >= 4 and s.startswith("\\{") and s.endswith("\\}"):
        opening, closing, inner = "\\{", "\\}", s[2:-2]
    elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        opening, closing, inner = s[0], s[-1], s[1:-1]
    else:
        return None
    depth = 0
    for c in inner:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth < 0:
            return None
    return opening, closing, inner


def _structure(s: str, percent: bool, depth: int = 0) -> tuple:
    if depth > 8:
        raise NotANumber("nested too deeply")
    s = s.strip()
    if _THOUSANDS_FULL.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    enclosed = _brackets(s)
    parts = _split_top(enclosed[2] if enclosed else s)
    if enclosed and enclosed[0] == "(" and enclosed[1] == ")" and len(parts) == 1:
        return _structure(enclosed[2], percent, depth + 1)
    if enclosed and enclosed[0] != "\\{":
        return ("seq", enclosed[0], enclosed[1], tuple(_structure(p, False, depth + 1) for p in parts))
    if enclosed or len(parts) > 1:
        return ("set", tuple(sorted(_canonical(_structure(p, False, depth + 1)) for p in parts)))
    return _element(s, percent)


def _canonical(v: tuple) -> str:
    if v[0] == "num":
        return format_number(v[1])
    if v[0] == "cplx":
        return f"{format_number(v[1])}+({format_number(v[2])})i"
    if v[0] == "str":
        return v[1]
    if v[0] == "seq":
        return v[1] + ",".join(_canonical(x) for x in v[3]) + v[2]
    return "{" + ",".join(v[1]) + "}"


def _parse(s) -> tuple | None:
    cleaned = _clean(s)
    if cleaned is None:
        return None
    try:
        return _structure(*cleaned)
    except (NotANumber, ZeroDivisionError, ValueError, OverflowError, RecursionError):
        return None


def normalize_answer(s: str) -> str | None:
    """Canonical text of an answer, or None when there is no (well-formed) answer.

    Numbers become exact canonical forms (``"1/2"``, ``"-3"``, ``"2*sqrt(3)"``,
    ``"1/2+1/2*sqrt(5)"``; a trailing ``%`` is dropped); tuples/intervals keep
    their brackets, sets and bare comma lists are sorted inside ``{}``; any
    other text is returned cleaned. Unbalanced braces, empty text, division by
    zero or more than ``MAX_ANSWER_CHARS`` characters give None.

    >>> normalize_answer(r"x = \\dfrac{2}{\\sqrt{3}}")
    '2/3*sqrt(3)'
    """
    value = _parse(s)
    return None if value is None else _canonical(value)


def _equal(a: tuple, b: tuple) -> bool:
    if a[0] == "num" and b[0] == "num":
        if a[1] == b[1]:
            return True
        if a[2] != b[2]:   # exactly one side was written as a percentage
            pct, other = (a, b) if a[2] else (b, a)
            return multiply(pct[1], {1: Fraction(1, 100)}) == other[1]
        return False
    if a[0] == "seq" and b[0] == "seq":
        return a[1:3] == b[1:3] and len(a[3]) == len(b[3]) and all(map(_equal, a[3], b[3]))
    return _canonical(a) == _canonical(b)


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one (exactly, never by float).

    Equal canonical forms (see :func:`normalize_answer`), elementwise for
    tuples; ``p%`` also matches ``p/100`` and ``p`` matches ``p%`` (so ``5000\\%``
    equals 50: a percent sign on one side only is read as /100, by design). A
    missing or malformed side is False. A text with several boxes answers with
    its last box, or, where the gold answer has as many items, with all of them
    as one list (``\\boxed{3} and \\boxed{4}`` answers ``3, 4``).

    >>> is_equivalent("50\\\\%", "0.5"), is_equivalent("0.333", r"\\frac13")
    (True, False)
    """
    a = _parse(pred)
    if a is None:
        return False
    b = _parse(gold)
    if b is None:
        return False
    names = _assigned_name(pred), _assigned_name(gold)
    if None not in names and names[0] != names[1]:
        return False   # x = 3 does not answer y = 3
    if _equal(a, b):
        return True
    boxes = extract_boxed_all(pred) if isinstance(pred, str) else []
    if len(boxes) > 1 and b[0] in ("set", "seq"):
        items = [_parse(box) for box in boxes]
        if None in items:
            return False
        if b[0] == "seq":   # an ordered tuple: the boxes in their order
            return len(items) == len(b[3]) and all(map(_equal, items, b[3]))
        return sorted(_canonical(x) for x in items) == list(b[1])
    return False


def _assigned_name(s: str) -> str | None:
    """The left side of a whole-answer assignment ``x = ...`` (spaces dropped), else None."""
    cleaned = _clean(s)
    m = _ASSIGN.fullmatch(cleaned[0]) if cleaned else None
    return None if m is None else re.sub(r"\s+", "", cleaned[0][:m.start("rhs")]).rstrip("=")
