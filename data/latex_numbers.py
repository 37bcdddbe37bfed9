"""Exact numbers written in (simple) LaTeX: a parser and surd arithmetic.

A value is ``sum_i q_i * sqrt(n_i)``: a dict ``{n_i: q_i}`` from square-free
positive integers to non-zero ``fractions.Fraction`` coefficients (``{}`` is
zero). The set is closed under +, -, * and exact square roots of rationals;
division is allowed by single terms ``q*sqrt(n)`` (1/(q sqrt n) = sqrt(n)/(q n)).
Parsing never evaluates code and stops with :class:`NotANumber` past the
bounds below, so adversarial text costs time linear in its length.

>>> format_number(parse_number(r"\\frac{6}{\\sqrt{3}} - 1"))
'-1+2*sqrt(3)'
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["NotANumber", "parse_number", "format_number", "multiply",
           "MAX_LITERAL_DIGITS", "MAX_EXPONENT", "MAX_VALUE_BITS", "MAX_RADICAND", "MAX_TERMS"]

MAX_LITERAL_DIGITS = 1000  # longer number literals are not numbers (about 3,300 bits, inside
                           # MAX_VALUE_BITS, so a long integer is compared exactly, not as text)
MAX_EXPONENT = 1000       # |k| of a scientific literal 1.5e3 / 8.05e-06 (10**1000: 3,322 bits)
MAX_VALUE_BITS = 4000     # numerators/denominators beyond this abort the parse
MAX_RADICAND = 10**12     # square-free reduction by trial division up to 10**4
MAX_TERMS = 64            # surd terms of a value: a product of sums grows their count
                          # geometrically ((1+sqrt 2)(1+sqrt 3)... doubles it per factor)
_MAX_DEPTH = 40           # parser nesting limit


class NotANumber(ValueError):
    """The text is not a number this module can read (or exceeds a bound)."""


def _check(q: Fraction) -> Fraction:
    if max(q.numerator.bit_length(), q.denominator.bit_length()) > MAX_VALUE_BITS:
        raise NotANumber("value too large")
    return q


def _square_free(n: int) -> tuple[int, int]:
    """``n = s**2 * m`` with ``m`` square-free; returns ``(s, m)`` for 0 < n <= MAX_RADICAND.

    Trial division by every d <= n**(1/3); the cofactor then has at most two
    prime factors, so it is a square exactly when it is a perfect square.
    """
    if n > MAX_RADICAND:
        raise NotANumber("radicand too large")
    s, m, d = 1, 1, 2
    while d * d * d <= n:
        while n % (d * d) == 0:
            n //= d * d
            s *= d
        if n % d == 0:
            n //= d
            m *= d
        d += 1
    r = math.isqrt(n)
    return (s * r, m) if r * r == n else (s, m * n)


def _terms(out: dict) -> dict:
    if len(out) > MAX_TERMS:
        raise NotANumber(f"more than {MAX_TERMS} surd terms")
    return out


def _add(a: dict, b: dict, sign: int = 1) -> dict:
    out = dict(a)
    for n, q in b.items():
        out[n] = _check(out.get(n, Fraction(0)) + sign * q)
    return _terms({n: q for n, q in out.items() if q != 0})


def _mul(a: dict, b: dict) -> dict:
    """The product, in ``len(a) * len(b) <= MAX_TERMS**2`` term products (bounded work)."""
    if len(a) * len(b) > MAX_TERMS * MAX_TERMS:
        raise NotANumber(f"more than {MAX_TERMS} surd terms")
    out: dict = {}
    for n1, q1 in a.items():
        for n2, q2 in b.items():
            g = math.gcd(n1, n2)   # n1*n2 = g**2 * (n1/g)*(n2/g), the latter square-free
            key = (n1 // g) * (n2 // g)
            out[key] = _check(out.get(key, Fraction(0)) + _check(q1 * q2 * g))
    return _terms({n: q for n, q in out.items() if q != 0})


def _inverse(a: dict) -> dict:
    if not a:
        raise ZeroDivisionError("division by zero")
    if len(a) != 1:
        raise NotANumber("can only divide by a single term q*sqrt(n)")
    (n, q), = a.items()
    return {n: _check(1 / (q * n))}   # 1/(q sqrt n) = sqrt(n)/(q n)


def _power(a: dict, k: int) -> dict:
    if not a:
        if k <= 0:
            raise ZeroDivisionError
        return {}
    if len(a) != 1 or abs(k) > 10_000:
        raise NotANumber("unsupported power")
    if k < 0:
        a, k = _inverse(a), -k
    (n, q), = a.items()
    bits = max(q.numerator.bit_length(), q.denominator.bit_length(), n.bit_length())
    if bits * k > MAX_VALUE_BITS:
        raise NotANumber("power too large")
    return {n if k % 2 else 1: _check(q**k * n ** (k // 2))}


def _sqrt(a: dict) -> dict:
    if not a:
        return {}
    if set(a) != {1} or a[1] < 0:
        raise NotANumber("sqrt of a non-rational or negative value")
    q = a[1]   # sqrt(p/r) = sqrt(p*r)/r
    s, m = _square_free(q.numerator * q.denominator)
    return {m: Fraction(s, q.denominator)}


def _format(a: dict) -> str:
    """Canonical text: terms by radicand, e.g. ``1/2+1/2*sqrt(5)``."""
    if not a:
        return "0"
    parts = []
    for n in sorted(a):
        q = a[n]
        if n == 1:
            parts.append(str(q))
        else:
            coef = "" if abs(q) == 1 else f"{abs(q)}*"
            parts.append(("-" if q < 0 else "") + coef + f"sqrt({n})")
    return "+".join(parts).replace("+-", "-")


# --------------------------------------------------------------- number parser
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?|(\\[A-Za-z]+)|(\S))")
_WORDS = {"\\frac": "\\frac", "\\sqrt": "\\sqrt", "\\cdot": "*", "\\times": "*", "\\div": "/"}


def _lex(s: str) -> list:
    """Tokens of a number expression: Fractions and operator strings."""
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:   # only trailing whitespace is left
            break
        pos = m.end()
        num, exponent, word, char = m.groups()
        if num is not None:
            whole, _, frac = num.partition(".")
            if len(whole) + len(frac) > MAX_LITERAL_DIGITS:
                raise NotANumber("literal too long")
            value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
            if exponent is not None:   # scientific notation: 1.5e3, 8.05e-06, 2E+5
                if len(exponent.lstrip("+-")) > 4 or abs(int(exponent)) > MAX_EXPONENT:
                    raise NotANumber("exponent out of range")
                value *= Fraction(10) ** int(exponent)
            out.append(value)
        elif word is not None:
            if word not in _WORDS:
                raise NotANumber(f"unknown command {word}")
            out.append(_WORDS[word])
        elif char in "+-*/^(){}":
            out.append(char)
        else:
            raise NotANumber(f"unexpected {char!r}")
    return out


class _Parser:
    """Recursive descent over the grammar

        expr  := term (('+' | '-') term)*
        term  := unary (('*' | '/') unary | <implicit *> power)*   implicit before \\sqrt or '('
        unary := ('+' | '-') unary | power
        power := atom ('^' ['+' | '-'] atom)?                       integer exponents only
        atom  := number | '(' expr ')' | '{' expr '}' | \\frac atom atom | \\sqrt atom
    """

    def __init__(self, tokens: list):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise NotANumber(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> dict:
        value = self.expr()
        if self.i != len(self.tokens):
            raise NotANumber("trailing tokens")
        return value

    def expr(self) -> dict:
        value = self.term()
        while self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            value = _add(value, self.term(), sign)
        return value

    def term(self) -> dict:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok == "*":
                self.take()
                value = _mul(value, self.unary())
            elif tok == "/":
                self.take()
                value = _mul(value, _inverse(self.unary()))
            elif tok in ("\\sqrt", "("):
                value = _mul(value, self.power())
            else:
                return value

    def unary(self) -> dict:
        if self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            self.enter()
            value = self.unary()
            self.depth -= 1
            return value if sign == 1 else _add({}, value, -1)
        return self.power()

    def power(self) -> dict:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        sign = -1 if self.peek() == "-" else 1
        if self.peek() in ("+", "-"):
            self.take()
        exponent = self.atom()
        if set(exponent) - {1} or exponent.get(1, Fraction(0)).denominator != 1:
            raise NotANumber("non-integer exponent")
        return _power(base, sign * int(exponent.get(1, 0)))

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise NotANumber("nested too deeply")

    def atom(self) -> dict:
        self.enter()
        tok = self.take()
        if isinstance(tok, Fraction):
            value = {1: tok} if tok else {}
        elif tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
        elif tok == "\\frac":
            numerator = self.atom()
            value = _mul(numerator, _inverse(self.atom()))
        elif tok == "\\sqrt":
            value = _sqrt(self.atom())
        else:
            raise NotANumber(f"unexpected {tok!r}")
        self.depth -= 1
        return value


def parse_number(text: str) -> dict:
    """Exact value of ``text`` (digits, + - * / ^, \\cdot, \\times, \\div, ( ), { },
    ``\\frac{a}{b}``, ``\\sqrt{x}``; TeX shorthand must be expanded first).

    Raises NotANumber, or ZeroDivisionError for a zero divisor.
    """
    return _Parser(_lex(text)).parse()


def multiply(a: dict, b: dict) -> dict:
    """Product of two values."""
    return _mul(a, b)


def format_number(a: dict) -> str:
    """Canonical text: terms by radicand, e.g. ``1/2+1/2*sqrt(5)``; zero is ``0``."""
    return _format(a)
