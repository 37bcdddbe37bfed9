"""Synthetic multi-step arithmetic word problems with a verbose, annotated chain of thought.

Each problem is a chain ``v0 -> v1 -> ... -> vS`` of S steps ``v_i = v_{i-1} op a_i``
(op in + - * /), told as a word problem; the answer ``vS`` is a positive
integer (divisions are exact, every value lies in [1, 10**max_digits)). The
chain of thought stands in for a real reasoning model's thinking: mostly
filler (narration, restatements with the question's numbers, hedges, checks,
dead ends), the step equations (essential) and, for two-digit by two-digit
products, partial products (supporting). See ``data/arithmetic_cot.py`` for
the span levels and the templates.

Shares (tokens of the CoT): the generator pads each chain with filler until,
by a tokenizer-free estimate (:func:`data.arithmetic_cot.proxy_tokens`),
essential <= ``max_essential_share`` (0.19) and essential+supporting <=
``max_core_share`` (0.38) on every problem; real tokenizers split words at
least as finely as the estimate, so real shares are no larger. Documented
bounds, asserted in tests/data/test_arithmetic.py on 300 problems with the
default SentencePiece tokenizer (BPE, 768 pieces): filler share >= 0.55,
essential <= 0.20 and essential+supporting <= 0.40 on every problem, median
CoT 150-260 tokens, median base-mode prompt 40-80 tokens (chat template
included). Defaults give about: CoT median 220 / p90 325, prompt median 61.

Importance (:func:`align_spans` -> ``scores``): the ranking of
:func:`data.compression.annotation_order`: level first, each equation
contiguous in rank order, so a top-k cut at any ratio splits at most one
equation; at the protected ratios 0.2, 0.3, ..., 0.9 a deferred equation's
slot is filled by lower-ranked units, so no equation is split there (0 of
1,000 problems in the test); at 0.2 every essential equation is kept because
essential tokens are at most 20% of the CoT. ``strict_levels=True`` keeps the
level order exact instead and then guarantees only "at most one split".

Determinism: problem i of ``generate_problems(seed, n)`` draws from
``numpy.random.default_rng([seed, i])`` only, so the first n problems do not
depend on n and output is identical across processes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from data import arithmetic_cot as cot
from data.arithmetic_cot import ESSENTIAL, FILLER, SUPPORTING, check_equation  # noqa: F401
from data.compression import PROTECT_RATIOS, importance_scores

SPAN_KINDS = cot.EQUATION_KINDS + cot.TEXT_KINDS
RESTATE_MODES = ("paraphrase", "quote_steps", "quote")
FILLER_SUB_RANK = {"restate": 2, "narration": 1}
"""Order inside the filler level: restatements (the question's givens), then
result narration, then hedges, checks and dead ends (0)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    """Generator settings (keyword-only); every field is validated on construction."""

    min_steps: int = 2
    max_steps: int = 6
    max_digits: int = 3          # every value < 10**max_digits
    max_operand: int = 60        # added/subtracted operands and two-digit multipliers
    max_start: int = 60
    op_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.8)  # add sub mul div
    p_two_digit_mul: float = 0.7  # chance a feasible multiplication is two-digit by two-digit
    p_hedge: float = 0.4
    p_check: float = 0.3
    p_dead_end: float = 0.15
    p_result: float = 0.7        # chance of a "So now ... has y ..." line after a step
    max_essential_share: float = 0.19
    max_core_share: float = 0.38
    pad_width: int = 0           # digits per number in equations, zero-padded (0: as is)
    restate: str = "paraphrase"  # 'quote': each step restates its question sentence verbatim,
                                 # and the closing line the question's last sentence;
                                 # 'quote_steps': the steps only (closing as in 'paraphrase')
    mark_last: bool = False      # the last step's restatement says it is the last
                                 # (data/arithmetic_cot.py LAST_QUOTE / LAST_LEAD)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"ArithmeticConfig.{name}={getattr(self, name)!r}: {why}")

        try:  # a ConfigDict may hand over a list
            object.__setattr__(self, "op_weights", tuple(float(w) for w in self.op_weights))
        except (TypeError, ValueError):
            bad("op_weights", "must be 4 numbers (add, sub, mul, div)")

        for name in ("min_steps", "max_steps", "max_digits", "max_operand", "max_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive int")
        if self.min_steps > self.max_steps:
            bad("min_steps", f"exceeds max_steps={self.max_steps}")
        if isinstance(self.pad_width, bool) or not isinstance(self.pad_width, int) \
                or not 0 <= self.pad_width <= 6:
            bad("pad_width", "must be an int in [0, 6] (0: numbers as they are)")
        if not isinstance(self.mark_last, bool):
            bad("mark_last", "must be a bool")
        if self.restate not in RESTATE_MODES:
            bad("restate", f"must be one of {RESTATE_MODES}")
        if not 2 <= self.max_digits <= 6:
            bad("max_digits", "must lie in [2, 6]")
        if self.max_operand < 11 or self.max_start < 2:
            bad("max_operand", "max_operand must be >= 11 and max_start >= 2")
        if max(self.max_operand, self.max_start) >= 10 ** self.max_digits:
            bad("max_operand", f"operands must stay below 10**max_digits={10 ** self.max_digits}")
        if len(self.op_weights) != 4 or min(self.op_weights) < 0 or sum(self.op_weights) <= 0:
            bad("op_weights", "must be 4 non-negative weights (add, sub, mul, div), not all zero")
        for name in ("p_two_digit_mul", "p_hedge", "p_check", "p_dead_end", "p_result"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a probability in [0, 1]")
        if not 0.05 <= self.max_essential_share <= self.max_core_share <= 0.9:
            bad("max_essential_share", "need 0.05 <= max_essential_share <= max_core_share <= 0.9")


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of the chain of thought: text, level (0 filler, 1 supporting, 2 essential)."""

    text: str
    level: int
    is_equation: bool
    kind: str  # 'step' | 'partial' | 'check' | 'dead_end' | 'narration' | 'restate' | 'hedge' | 'sep'


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Per-problem descriptor for plots."""

    n_steps: int
    n_partial_products: int  # two-digit by two-digit products (written with partials)
    n_mul: int
    n_div: int
    max_operand: int
    max_value: int
    n_checks: int
    n_dead_ends: int


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem; ``cot`` is the concatenation of the span texts."""

    uid: str
    question: str
    spans: tuple[Span, ...]
    answer: int
    difficulty: Difficulty

    @property
    def cot(self) -> str:
        return "".join(s.text for s in self.spans)

    @property
    def answer_text(self) -> str:
        """The response text after ``</think>``: ``\\boxed{N}``."""
        return f"\\boxed{{{self.answer}}}"


# ----------------------------------------------------------------------------- generation

def _draw_step(rng: np.random.Generator, x: int, c: ArithmeticConfig) -> cot.Step | None:
    limit = 10 ** c.max_digits - 1
    options: dict[str, list[int]] = {}
    if limit - x >= 2:
        options["add"] = list(range(2, min(c.max_operand, limit - x) + 1))
    if x >= 4:  # results stay >= 2
        options["sub"] = list(range(2, min(c.max_operand, x - 2) + 1))
    two = [a for a in range(11, min(c.max_operand, limit // x) + 1) if a % 10] if 10 <= x <= 99 else []
    one = list(range(2, min(9, limit // x) + 1))
    if two or one:
        options["mul"] = two if two and (not one or rng.random() < c.p_two_digit_mul) else one
    divisors = [a for a in range(2, 10) if x % a == 0 and x // a >= 2]
    if divisors:
        options["div"] = divisors
    ops = [op for op in cot.OPS if op in options]
    weights = np.array([c.op_weights[list(cot.OPS).index(op)] for op in ops], dtype=np.float64)
    if weights.sum() <= 0:
        return None
    op = ops[int(rng.choice(len(ops), p=weights / weights.sum()))]
    a = options[op][int(rng.integers(len(options[op])))]
    y = {"add": x + a, "sub": x - a, "mul": x * a, "div": x // a}[op]
    return cot.Step(op, x, a, y, int(rng.integers(len(cot.QUESTION[op]))))


def generate_problem(seed: int, index: int, config: ArithmeticConfig | None = None) -> Problem:
    """Problem ``index`` of the stream ``seed``: a pure function of (seed, index, config)."""
    c = config or ArithmeticConfig()
    rng = np.random.default_rng([int(seed), int(index)])
    name, subj, obj = cot.NAMES[int(rng.integers(len(cot.NAMES)))]
    items = cot.ITEMS[int(rng.integers(len(cot.ITEMS)))]
    n_steps = int(rng.integers(c.min_steps, c.max_steps + 1))
    v0 = int(rng.integers(2, c.max_start + 1))
    steps, x = [], v0
    for _ in range(n_steps):
        step = _draw_step(rng, x, c)
        if step is None:
            raise ValueError(f"op_weights={c.op_weights} leave no feasible operation at value {x}")
        steps.append(step)
        x = step.y
    fields = dict(N=name, S=subj.capitalize(), s=subj, O=obj, items=items, v=v0)
    sentences = [cot.START.format(**fields)]
    sentences += [cot.QUESTION[st.op][st.variant].format(**fields, a=st.a) for st in steps]
    sentences.append(cot.ASK[int(rng.integers(len(cot.ASK)))].format(**fields))

    w = cot.ChainWriter(rng, fields, width=c.pad_width)
    w.text(w.pick(cot.OPENING), "hedge")
    w.text(cot.START_RESTATE, "restate")
    quotes = sentences[1:1 + n_steps] if c.restate != "paraphrase" else [None] * n_steps
    partials = sum(cot.write_step(w, k, st, p_hedge=c.p_hedge, p_check=c.p_check,
                                  p_dead_end=c.p_dead_end, p_result=c.p_result, quote=quotes[k],
                                  last=c.mark_last and k == n_steps - 1)
                   for k, st in enumerate(steps))
    closing = w.pick(cot.CLOSING)
    if c.restate == "quote":   # the question's last sentence too, so that the chain
        closing = "\n" + sentences[-1] + " " + closing.lstrip("\n")   # ends where it does
    w.text(closing, "narration", y=x)
    cot.pad_with_filler(w, max_essential=c.max_essential_share, max_core=c.max_core_share)
    spans = tuple(Span(*s) for s in w.spans)
    difficulty = Difficulty(
        n_steps=n_steps, n_partial_products=partials,
        n_mul=sum(st.op == "mul" for st in steps), n_div=sum(st.op == "div" for st in steps),
        max_operand=max([v0] + [st.a for st in steps]), max_value=max([v0] + [st.y for st in steps]),
        n_checks=sum(s.kind == "check" for s in spans), n_dead_ends=sum(s.kind == "dead_end" for s in spans))
    return Problem(uid=f"arith-{seed}-{index}", question=" ".join(sentences), spans=spans,
                   answer=x, difficulty=difficulty)


DRILL_CUE = {"add": "add", "sub": "subtract", "mul": "multiply by", "div": "divide by"}
"""How a drill line names its step before the equation (``add 9: 36+09=45``)."""


def drill_text(seed: int, index: int, config: ArithmeticConfig | None = None, *,
               equations: int = 24) -> str:
    """Drill ``index`` of the stream ``seed``: ``equations`` step equations, one per line.

    Chains of steps drawn as the problems draw them (same operations, operands
    and value range, written as the chains of thought write them, e.g.
    ``add 9: 36+09=45``), restarting from a fresh start value every 2 to
    ``max_steps`` steps. Each line names its operand before the equation, as a
    chain of thought restates it before its equation, so the drills teach the
    operand to be copied, not guessed. A small decoder trained from scratch meets arithmetic
    only in the CoTs, a few equations per 200 tokens; the drills stand in for
    the arithmetic a pretrained model brings to its reasoning SFT. A pure
    function of (seed, index, config, equations).
    """
    c = config or ArithmeticConfig()
    if isinstance(equations, bool) or not isinstance(equations, int) or equations < 1:
        raise ValueError(f"equations must be a positive int, got {equations!r}")
    rng = np.random.default_rng([int(seed), int(index), 7])
    lines: list[str] = []
    while len(lines) < equations:
        x = int(rng.integers(2, c.max_start + 1))
        for _ in range(int(rng.integers(min(2, c.max_steps), c.max_steps + 1))):
            step = _draw_step(rng, x, c)
            if step is None or len(lines) == equations:
                break
            lines.append(f"{DRILL_CUE[step.op]} {step.a}: "
                         + cot.equation(step.x, cot.OPS[step.op], step.a, step.y, c.pad_width))
            x = step.y
    return "\n".join(lines)


def generate_problems(seed: int, n: int, config: ArithmeticConfig | None = None, *,
                      start: int = 0) -> list[Problem]:
    """Problems ``start .. start+n-1`` of the stream ``seed`` (same seed -> same bytes)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return [generate_problem(int(seed), start + i, config) for i in range(n)]


# ----------------------------------------------------------------------------- JSONL

def problem_to_json(problem: Problem) -> str:
    """One JSONL line (sorted keys, no spaces): byte-identical for equal problems."""
    obj = dataclasses.asdict(problem)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def save_problems(path: str | os.PathLike, problems: Iterable[Problem]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for p in problems:
            f.write(problem_to_json(p) + "\n")


def _field(obj: dict, key: str, types, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{where}: field {key!r} must be {types}, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"{where}: field {key!r} must be {types}, got {type(value).__name__}")
    return value


def _exact_keys(obj: Any, keys: Sequence[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(keys))
    if extra:
        raise ValueError(f"{where}: unknown fields {extra}")
    return obj


def problem_from_json(line: str, where: str = "<string>") -> Problem:
    """Parse and validate one line; errors name ``where`` (file:line) and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    _exact_keys(obj, ("uid", "question", "spans", "answer", "difficulty"), where)
    spans = []
    for j, s in enumerate(_field(obj, "spans", list, where)):
        at = f"{where}: spans[{j}]"
        _exact_keys(s, ("text", "level", "is_equation", "kind"), at)
        span = Span(_field(s, "text", str, at), _field(s, "level", int, at),
                    _field(s, "is_equation", bool, at), _field(s, "kind", str, at))
        if span.level not in (FILLER, SUPPORTING, ESSENTIAL) or span.kind not in SPAN_KINDS:
            raise ValueError(f"{at}: bad level {span.level!r} or kind {span.kind!r}")
        if span.is_equation != (span.kind in cot.EQUATION_KINDS):
            raise ValueError(f"{at}: is_equation={span.is_equation} contradicts kind {span.kind!r}")
        spans.append(span)
    d = _exact_keys(_field(obj, "difficulty", dict, where),
                    [f.name for f in dataclasses.fields(Difficulty)], f"{where}: difficulty")
    difficulty = Difficulty(**{f.name: _field(d, f.name, int, f"{where}: difficulty")
                               for f in dataclasses.fields(Difficulty)})
    answer = _field(obj, "answer", int, where)
    if answer < 1:
        raise ValueError(f"{where}: field 'answer' must be a positive int, got {answer}")
    return Problem(uid=_field(obj, "uid", str, where), question=_field(obj, "question", str, where),
                   spans=tuple(spans), answer=answer, difficulty=difficulty)


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Read a JSONL file written by :func:`save_problems`; blank lines are errors too."""
    with open(path, encoding="utf-8") as f:
        return [problem_from_json(line, f"{os.fspath(path)}:{k}") for k, line in enumerate(f, start=1)]


def tokenizer_corpus(problems: Iterable[Problem]) -> list[str]:
    """Training texts for the tokenizer: each problem as a full chat example (all modes)."""
    from data.formats import LEVELS, POLICY, prompt_text, response_text

    controls = (None, POLICY) + LEVELS
    texts = []
    for i, p in enumerate(problems):
        ctrl = controls[i % len(controls)]
        level = ctrl if isinstance(ctrl, int) else (LEVELS[i % len(LEVELS)] if ctrl else None)
        texts.append(prompt_text(p.question, control=ctrl) + response_text(p.cot, p.answer_text, level=level))
    return texts


# ----------------------------------------------------------------------------- token annotations

@dataclasses.dataclass(frozen=True)
class TokenAnnotation:
    """Per-token view of a chain of thought for one tokenizer (all arrays have length N)."""

    ids: np.ndarray          # int32: the ids of tokenizer.encode(problem.cot)
    levels: np.ndarray       # int8: level of the token's span
    span_index: np.ndarray   # int32: index of the token's span in problem.spans
    is_equation: np.ndarray  # bool: the token's span is an equation
    scores: np.ndarray       # float32 in (0, 1]: importance, see importance_scores


def align_spans(problem: Problem, tokenizer: Any, *,
                protect_ratios: Sequence[float] = PROTECT_RATIOS,
                strict_levels: bool = False) -> TokenAnnotation:
    """Tokenize the whole CoT once and give each token the span its characters cover.

    A token covering characters of several spans takes the span of the highest
    level (ties: an equation span, then the earlier span). A token with an empty
    character range takes the span holding its start. ``scores`` rank level
    first, then :data:`FILLER_SUB_RANK` inside the filler level, then position
    (see :func:`data.compression.annotation_order`).
    """
    text = problem.cot
    ids, offsets = tokenizer.encode_with_offsets(text)
    lengths = np.array([len(s.text) for s in problem.spans])
    char_span = np.repeat(np.arange(len(problem.spans)), lengths)
    key = np.array([2 * s.level + s.is_equation for s in problem.spans])
    span_index = np.empty(len(ids), dtype=np.int32)
    for t, (start, end) in enumerate(offsets):
        start = min(max(int(start), 0), len(text) - 1)
        covered = char_span[start:max(int(end), start + 1)]
        span_index[t] = covered[np.argmax(key[covered])]  # argmax: first of the best
    levels = np.array([s.level for s in problem.spans], dtype=np.int8)[span_index]
    is_eq = np.array([s.is_equation for s in problem.spans], dtype=bool)[span_index]
    sub = np.array([FILLER_SUB_RANK.get(s.kind, 0) if s.level == FILLER else 0
                    for s in problem.spans], dtype=np.int64)[span_index]
    scores = importance_scores(levels, span_index, is_eq, sub_rank=sub, protect_ratios=protect_ratios,
                               strict_levels=strict_levels)
    return TokenAnnotation(np.asarray(ids, dtype=np.int32), levels, span_index, is_eq, scores)
