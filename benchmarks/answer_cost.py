"""Cost of one answer check (``data.answers.is_equivalent``) on hostile answers (not a unit test).

    .venv/bin/python benchmarks/answer_cost.py [--repeats=5]

The checker reads model output, so its cost per answer must stay bounded whatever
the model writes: answers over ``MAX_ANSWER_CHARS`` are no answer, and
data/latex_numbers.py caps literal digits, exponents, value bits, radicands and
surd terms. Each case below is timed as the best of ``--repeats`` rounds of enough
calls to fill about 0.1 s, side by side with the reference case (two equal small
integers) in the same process; the table gives microseconds per call and the ratio
to the reference. The number to read is the largest ratio: the worst case's price
in units of the everyday check, on whatever machine runs it.
"""
from __future__ import annotations

import argparse
import time

from data.answers import MAX_ANSWER_CHARS, is_equivalent

PRIMES = [p for p in range(2, 400) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def cases() -> list[tuple[str, str, str, bool]]:
    """``(name, prediction, gold, the right verdict)``; the first is the reference."""
    roots = [f"\\sqrt{{{p}}}" for p in PRIMES[:49]]
    big = "9" * 998
    return [
        ("reference: 42 = 42", "42", "42", True),
        ("fraction = decimal", "\\frac{6}{8}", "0.75", True),
        ("surd sum = surd sum", "\\frac{1+\\sqrt5}{2}", "1/2+1/2*sqrt(5)", True),
        ("49 square roots, reordered", "+".join(roots), "+".join(reversed(roots)), True),
        ("49 square roots, squared, against 1", "(" + "+".join(roots) + ")^2", "1", False),
        ("998-digit literal = the same with .0", big, big + ".0", True),
        ("exponent 998 = its 999 digits", "1.5e998", "15" + "0" * 997, True),
        ("nested fractions x 10", "\\frac{1}{" * 10 + "2" + "}" * 10, "2", True),
        ("nested fractions x 40 (over the depth limit)", "\\frac{1}{" * 40 + "2" + "}" * 40,
         "2", False),
        (f"{MAX_ANSWER_CHARS}-character sum", "+".join(["7"] * (MAX_ANSWER_CHARS // 2)),
         str(7 * (MAX_ANSWER_CHARS // 2)), True),
        ("tuple of 200 numbers", ", ".join(map(str, range(200))),
         ", ".join(map(str, range(200))), True),
        ("over the length cap", "1" * (MAX_ANSWER_CHARS + 1), "1", False),
    ]


def per_call_seconds(pred: str, gold: str, repeats: int) -> float:
    """Best of ``repeats`` rounds; each round runs enough calls to fill ~0.1 s."""
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.02:
        is_equivalent(pred, gold)
        calls += 1
    number = max(1, int(calls * 5))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            is_equivalent(pred, gold)
        best = min(best, (time.perf_counter() - start) / number)
    return best


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    rows = []
    for name, pred, gold, expected in cases():
        rows.append({"case": name, "verdict": is_equivalent(pred, gold), "expected": expected,
                     "seconds": per_call_seconds(pred, gold, args.repeats)})
    ref = rows[0]["seconds"]
    print("| case | verdict | us / call | x reference |")
    print("|---|---|---:|---:|")
    for r in rows:
        verdict = str(r["verdict"]) + ("" if r["verdict"] == r["expected"] else " (WRONG)")
        print(f"| {r['case']} | {verdict} | {r['seconds'] * 1e6:.1f} | "
              f"{r['seconds'] / ref:.3g} |")
    return rows


if __name__ == "__main__":
    main()
