"""Templates and the writer of the verbose, annotated chain of thought for data/arithmetic.py.

A chain is a list of spans ``(text, level, is_equation, kind)``:

- essential (level 2): the step equation ``x-a=y`` of every reasoning step,
  preceded by its separator span (the line break before it), so that a chain
  cut down to its essential spans still reads one equation per line;
- supporting (level 1): partial products ``x*T=p``, ``x*u=q``, ``p+q=y`` of a
  two-digit by two-digit product, each with its separator line break;
- filler (level 0): narration, restatements of the question with its numbers,
  hedges, checks (``y+a=x``, an equation of kind 'check') and dead ends (a
  true equation of the wrong operation, kind 'dead_end', then abandoned).

Equations are written compactly (``322-57=265``) and are atomic spans.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

FILLER, SUPPORTING, ESSENTIAL = 0, 1, 2
EQUATION_KINDS = ("step", "partial", "check", "dead_end")
TEXT_KINDS = ("narration", "restate", "hedge", "sep")
OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

NAMES = (("Mia", "she", "her"), ("Leo", "he", "him"), ("Ava", "she", "her"),
         ("Sam", "he", "him"), ("Nora", "she", "her"), ("Ben", "he", "him"),
         ("Zoe", "she", "her"), ("Max", "he", "him"), ("Lily", "she", "her"),
         ("Tom", "he", "him"))
ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "cards", "coins",
         "books", "shells", "beads")

# Question sentence and its restatement in the chain share an index.
QUESTION = {
    "add": ("{S} buys {a} more {items}.", "A friend gives {O} {a} more {items}.",
            "{S} finds {a} more."),
    "sub": ("{S} gives away {a} {items}.", "{S} uses {a} of them.", "{S} loses {a} of them."),
    "mul": ("Then {s} gets {a} times as many {items}.",
            "The number of {items} becomes {a} times as large."),
    "div": ("{S} shares them equally among {a} friends and keeps one share.",
            "{S} packs them into {a} equal bags and keeps one bag."),
}
RESTATE = {
    "add": ("{N} buys {a} more, so I add them.", "a friend gives {O} {a} more, so I add them.",
            "{N} finds {a} more, so I add them."),
    "sub": ("{N} gives away {a}, so I subtract.", "{N} uses {a} of them, so I subtract.",
            "{N} loses {a}, so I subtract."),
    "mul": ("{N} gets {a} times as many, so I multiply.",
            "the number becomes {a} times as large, so I multiply."),
    "div": ("{N} shares them among {a} friends, so I divide.",
            "{N} packs them into {a} bags, so I divide."),
}
QUOTE_OP = {"add": " So I add.", "sub": " So I subtract.", "mul": " So I multiply.",
            "div": " So I divide."}
"""After a quoted question sentence (``restate='quote'``): the operation it asks for."""
LAST_QUOTE = " That is the last change."
"""Between the last step's quoted sentence and its operation (``mark_last``): written where
the model, still copying the question, can see that the question asks next."""
LAST_LEAD = "Last, "
"""The paraphrased last step's lead (``mark_last``), in place of :data:`LATER`."""
START = "{N} has {v} {items}."
ASK = ("How many {items} does {N} have now?", "How many {items} does {N} end up with?")
OPENING = ("Okay, let me think.", "Alright, let me work it out.", "Let me figure this out.")
START_RESTATE = " {N} starts with {v} {items}."
FIRST = ("First, ", "To start, ")
LATER = ("Next, ", "Then ", "After that, ")
HEDGES = (" Hmm, let me think.", " Okay.", " Let me be careful here.", " Right.",
          " Wait, let me make sure I read that right.")
SPLIT = " That is a two-digit product, so I split {a} into {T} and {u}."
RESULT = ("\nSo now {N} has {y} {items}.", "\nSo there are {y} {items} now.",
          "\nNow the count is {y}.")
CHECK = ((" Let me double-check:", ". Yes, that matches."), (" Quick check:", ", good."))
DEAD_END = ((" Maybe", "? No, wait, that is the wrong operation."),
            (" Hmm, is it", "? No, that is not what the question says."))
EXTRA = (" Let me reread the question to be sure.", " The question says {N} started with {v} {items}.",
         " I will keep track of each number as I go.", " Hmm, okay, that part is clear.")
CLOSING = ("\nSo the answer is {y}.", "\nSo {N} has {y} {items} in the end.")


class Step(NamedTuple):
    """One reasoning step ``y = x op a``; ``variant`` picks the question sentence."""

    op: str
    x: int
    a: int
    y: int
    variant: int


def equation(x: int, op: str, a: int, y: int, width: int = 0) -> str:
    """Compact equation text, e.g. ``equation(322, '-', 57, 265) == '322-57=265'``.

    ``width > 0`` writes every number with at least ``width`` digits, zero-padded
    (``equation(36, '+', 9, 45, width=2) == '36+09=45'``): digits of one place
    value then sit at fixed offsets from the operator and the ``=``, which is
    how small transformers learn multi-digit arithmetic from far fewer examples
    (Nogueira et al. 2021, arXiv 2102.13019; Lee et al. 2023, arXiv 2307.03381).
    """
    def num(v: int) -> str:
        return str(v).zfill(width)

    return f"{num(x)}{op}{num(a)}={num(y)}"


_EQ = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def check_equation(text: str) -> bool:
    """True iff ``text`` is ``int op int = int`` and arithmetically true (no eval)."""
    m = _EQ.match(text)
    if not m:
        return False
    x, op, a, y = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    if op == "/":
        return a != 0 and x == a * y
    return {"+": x + a, "-": x - a, "*": x * a}[op] == y


_PROXY = re.compile(r"\d|[A-Za-z]+| (?=[^A-Za-z])|\n|[^\sA-Za-z\d]")


def proxy_tokens(text: str) -> int:
    """Tokenizer-free token estimate: one per digit, word, symbol, newline, bare space.

    It matches a SentencePiece model with split digits that holds the template
    words whole; real tokenizers split rare words further, so filler counts
    only grow and the essential share only falls.
    """
    return len(_PROXY.findall(text))


class ChainWriter:
    """Accumulates annotated spans; ``rng`` is a ``numpy.random.Generator``."""

    def __init__(self, rng: np.random.Generator, fields: dict, *, width: int = 0):
        self.rng = rng
        self.fields = fields
        self.width = width   # digits per number in equations (see :func:`equation`)
        self.spans: list[tuple[str, int, bool, str]] = []

    def pick(self, options: tuple):
        return options[int(self.rng.integers(len(options)))]

    def text(self, template: str, kind: str = "narration", **extra) -> None:
        self.spans.append((template.format(**self.fields, **extra), FILLER, False, kind))

    def eq(self, body: str, *, level: int, kind: str, sep: str = "\n") -> None:
        self.spans.append((sep, level, False, "sep"))
        self.spans.append((body, level, True, kind))


def _dead_end(step: Step, width: int) -> str | None:
    """A true equation of the wrong operation: + for - and *, - for + and / (if positive)."""
    x, a = step.x, step.a
    if step.op in ("sub", "mul"):
        return equation(x, "+", a, x + a, width)
    return equation(x, "-", a, x - a, width) if x > a else None


def _check(step: Step, width: int) -> str:
    x, a, y = step.x, step.a, step.y
    return {"add": equation(y, "-", a, x, width), "sub": equation(y, "+", a, x, width),
            "mul": equation(a, "*", x, y, width), "div": equation(y, "*", a, x, width)}[step.op]


def write_step(w: ChainWriter, k: int, step: Step, *, p_hedge: float, p_check: float,
               p_dead_end: float, p_result: float, quote: str | None = None,
               last: bool = False) -> bool:
    """Append the spans of step ``k``; returns whether partial products were written.

    ``quote``: the step's question sentence, restated word for word (then the
    operation it asks for) instead of the paraphrase of :data:`RESTATE`.
    ``last``: the restatement says this is the last step (:data:`LAST_QUOTE`,
    :data:`LAST_LEAD`).
    """
    if quote is not None:
        mark = LAST_QUOTE if last else ""
        w.spans.append(("\n" + quote + mark + QUOTE_OP[step.op], FILLER, False, "restate"))
    else:
        lead = LAST_LEAD if last and k > 0 else w.pick(FIRST) if k == 0 else w.pick(LATER)
        w.text("\n" + lead + RESTATE[step.op][step.variant], "restate", a=step.a)
    if w.rng.random() < p_hedge:
        w.text(w.pick(HEDGES), "hedge")
    wrong = _dead_end(step, w.width)
    if wrong is not None and w.rng.random() < p_dead_end:
        before, after = w.pick(DEAD_END)
        w.text(before, "hedge")
        w.eq(wrong, level=FILLER, kind="dead_end", sep=" ")
        w.text(after, "hedge")
    partial = step.op == "mul" and step.x >= 10 and step.a >= 10
    if partial:
        tens, units = step.a - step.a % 10, step.a % 10
        w.text(SPLIT, "narration", a=step.a, T=tens, u=units)
        p, q = step.x * tens, step.x * units
        w.eq(equation(step.x, "*", tens, p, w.width), level=SUPPORTING, kind="partial")
        w.eq(equation(step.x, "*", units, q, w.width), level=SUPPORTING, kind="partial")
        w.eq(equation(p, "+", q, step.y, w.width), level=SUPPORTING, kind="partial")
    w.eq(equation(step.x, OPS[step.op], step.a, step.y, w.width), level=ESSENTIAL, kind="step")
    if w.rng.random() < p_result:
        w.text(w.pick(RESULT), "narration", y=step.y)
    if w.rng.random() < p_check:
        before, after = w.pick(CHECK)
        w.text("\n" + before.lstrip(" ") if w.spans[-1][3] == "step" else before, "hedge")
        w.eq(_check(step, w.width), level=FILLER, kind="check", sep=" ")
        w.text(after, "hedge")
    return partial


def shares(spans) -> tuple[float, float, int]:
    """(essential share, essential+supporting share, total) of proxy tokens."""
    counts = [0, 0, 0]
    for text, level, _, _ in spans:
        counts[level] += proxy_tokens(text)
    total = sum(counts)
    return counts[ESSENTIAL] / total, (counts[ESSENTIAL] + counts[SUPPORTING]) / total, total


def pad_with_filler(w: ChainWriter, *, max_essential: float, max_core: float) -> int:
    """Insert extra filler sentences after random narration spans (not the closing line)
    until both shares hold."""
    added = 0
    while True:
        ess, core, _ = shares(w.spans)
        if ess <= max_essential and core <= max_core:
            return added
        slots = [i for i, s in enumerate(w.spans[:-1]) if s[3] in ("restate", "narration")]
        at = slots[int(w.rng.integers(len(slots)))] + 1
        w.spans.insert(at, (w.pick(EXTRA).format(**w.fields), FILLER, False, "restate"))
        added += 1
