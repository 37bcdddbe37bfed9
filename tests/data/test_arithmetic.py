"""Synthetic arithmetic problems, annotations and their token alignment (data/arithmetic.py)."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data.arithmetic import (ArithmeticConfig, Problem, align_spans, check_equation,
                             generate_problems, load_problems, problem_to_json, save_problems,
                             tokenizer_corpus)
from data.arithmetic_stats import describe
from data.compression import PROTECT_RATIOS, keep_mask
from data.tokenizers import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    return train_sentencepiece(tokenizer_corpus(generate_problems(31, 500)))


@pytest.fixture(scope="module")
def problems():
    return generate_problems(32, 1000)


def _jsonl(problems):
    return "".join(problem_to_json(p) + "\n" for p in problems).encode()


def test_same_seed_same_bytes_also_in_another_process():
    here = _jsonl(generate_problems(5, 40))
    assert here == _jsonl(generate_problems(5, 40))
    code = ("import sys; from data.arithmetic import generate_problems, problem_to_json; "
            "sys.stdout.buffer.write(''.join(problem_to_json(p) + '\\n' "
            "for p in generate_problems(5, 40)).encode())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                           capture_output=True).stdout
    assert other == here


def test_different_seeds_differ_and_prefixes_agree():
    a, b = generate_problems(5, 40), generate_problems(6, 40)
    assert sum(x.question != y.question for x, y in zip(a, b)) >= 35
    assert generate_problems(5, 10) == a[:10]
    assert generate_problems(5, 5, start=20) == a[20:25]
    assert len({p.uid for p in a}) == 40


def test_problem_structure_and_arithmetic(problems):
    c = ArithmeticConfig()
    for p in problems[:400]:
        assert p.cot == "".join(s.text for s in p.spans)
        assert p.answer_text == f"\\boxed{{{p.answer}}}"
        steps = [s.text for s in p.spans if s.kind == "step"]
        partials = [s.text for s in p.spans if s.kind == "partial"]
        d = p.difficulty
        assert c.min_steps <= d.n_steps == len(steps) <= c.max_steps
        assert len(partials) == 3 * d.n_partial_products
        for s in p.spans:
            if s.is_equation:
                assert check_equation(s.text), (p.uid, s.text)
            assert s.level == {"step": 2, "partial": 1}.get(s.kind, s.level)
            assert s.level == 0 or s.kind in ("step", "partial", "sep")
        # the chain: each step starts from the previous result and ends at the answer
        values = [tuple(int(v) for v in re.split(r"[-+*/=]", e)) for e in steps]
        for (x0, a0, y0), (x1, _, _) in zip(values, values[1:]):
            assert y0 == x1
        assert values[-1][2] == p.answer >= 2
        assert d.max_value < 10 ** c.max_digits and d.max_value == max([values[0][0]] + [v[2] for v in values])
        for x, a, y in values:  # the question states every operand
            assert re.search(rf"\b{a}\b", p.question)


def test_check_equation_by_hand():
    assert check_equation("322-57=265") and check_equation("14*23=322") and check_equation("265/5=53")
    assert not check_equation("322-57=266") and not check_equation("7/2=3")
    assert not check_equation("1+1") and not check_equation("__import__('os')=1")


def test_difficulty_varies(problems):
    d = [p.difficulty for p in problems]
    assert {x.n_steps for x in d} == {2, 3, 4, 5, 6}
    assert 0.1 < np.mean([x.n_partial_products > 0 for x in d]) < 0.8
    assert any(x.n_dead_ends for x in d) and any(x.n_checks for x in d)


def test_jsonl_round_trip(tmp_path, problems):
    path = tmp_path / "p.jsonl"
    save_problems(path, problems[:50])
    assert load_problems(path) == problems[:50]
    assert path.read_bytes() == _jsonl(problems[:50])


def _corrupt(tmp_path, problems, line2):
    path = tmp_path / "bad.jsonl"
    lines = [problem_to_json(p) for p in problems[:3]]
    lines[1] = line2(json.loads(lines[1]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda o: json.dumps({k: v for k, v in o.items() if k != "spans"}), "missing field 'spans'"),
    (lambda o: json.dumps(o)[:-3], "invalid JSON"),
    (lambda o: json.dumps({**o, "answer": "7"}), "'answer'"),
    (lambda o: json.dumps({**o, "extra": 1}), "unknown fields"),
    (lambda o: json.dumps({**o, "spans": [{**o["spans"][0], "level": 5}]}), "bad level"),
    (lambda o: json.dumps({**o, "spans": [{**o["spans"][0], "is_equation": True}]}), "contradicts"),
    (lambda o: json.dumps({**o, "difficulty": {**o["difficulty"], "n_steps": None}}), "n_steps"),
    (lambda o: "", "invalid JSON"),
])
def test_malformed_lines_name_file_and_line(tmp_path, problems, mutate, message):
    path = _corrupt(tmp_path, problems, mutate)
    with pytest.raises(ValueError, match=re.escape("bad.jsonl:2")) as err:
        load_problems(path)
    assert message in str(err.value)


@pytest.mark.parametrize("field, value", [("min_steps", 0), ("max_digits", 9), ("p_check", 1.5),
                                          ("op_weights", (0, 0, 0, 0)), ("max_essential_share", 0.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ArithmeticConfig(**{field: value})
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticConfig(min_steps=5, max_steps=3)


def test_config_changes_the_problems():
    easy = generate_problems(1, 50, ArithmeticConfig(min_steps=2, max_steps=2, max_digits=2, max_operand=20,
                                                     max_start=20))
    assert all(p.difficulty.n_steps == 2 and p.difficulty.max_value < 100 for p in easy)


class _CharTokenizer:
    """Test double: fixed token boundaries given as character offsets."""

    def __init__(self, bounds):
        self.bounds = bounds

    def encode_with_offsets(self, text):
        return list(range(len(self.bounds))), list(self.bounds)


def test_alignment_straddling_tokens_take_the_higher_level():
    from data.arithmetic import Difficulty, Span

    spans = (Span("So", 0, False, "narration"), Span("\n", 2, False, "sep"), Span("1+2=3", 2, True, "step"),
             Span(" ok", 0, False, "hedge"))
    p = Problem("u", "q", spans, 3, Difficulty(1, 0, 0, 0, 2, 3, 0, 0))
    # tokens: "S" | "o\n" (straddles filler/sep) | "1+" | "2=3 " (straddles eq/filler) | "ok"
    ann = align_spans(p, _CharTokenizer([(0, 1), (1, 3), (3, 5), (5, 9), (9, 11)]), protect_ratios=())
    assert ann.levels.tolist() == [0, 2, 2, 2, 0]
    assert ann.span_index.tolist() == [0, 1, 2, 2, 3]
    assert ann.is_equation.tolist() == [False, False, True, True, False]
    np.testing.assert_allclose(ann.scores, [0.4, 1.0, 0.8, 0.6, 0.2], rtol=1e-6)  # rank order 1 2 3 0 4


def test_alignment_uses_the_whole_text_ids(tok, problems):
    for p in problems[:50]:
        ann = align_spans(p, tok)
        assert ann.ids.tolist() == tok.encode(p.cot)
        for j, s in enumerate(p.spans):
            if s.is_equation:  # digits and operators are single tokens: no straddling
                assert tok.decode(ann.ids[ann.span_index == j].tolist()) == s.text


def _split_equations(problem, ann, mask):
    """(essential equations not kept whole, other equations split) under a keep mask."""
    kept = np.bincount(ann.span_index, weights=mask, minlength=len(problem.spans))
    total = np.bincount(ann.span_index, minlength=len(problem.spans))
    essential_lost = sum(s.is_equation and s.level == 2 and kept[j] < total[j] for j, s in enumerate(problem.spans))
    split = sum(s.is_equation and 0 < kept[j] < total[j] for j, s in enumerate(problem.spans))
    return essential_lost, split


def test_top_20_percent_keeps_equations_whole_on_1000_problems(tok, problems):
    strict_splits = 0
    for p in problems:
        ann = align_spans(p, tok)
        for ratio in PROTECT_RATIOS:  # default ranking: no equation is ever split at these ratios
            lost, split = _split_equations(p, ann, keep_mask(ann.scores, ratio))
            assert split == 0, (p.uid, ratio)
            assert ratio != 0.2 or lost == 0, p.uid
        for ratio in (0.15, 0.25, 0.33):  # any other ratio: at most one equation split
            assert _split_equations(p, ann, keep_mask(ann.scores, ratio))[1] <= 1
        strict = align_spans(p, tok, strict_levels=True)
        lost, split = _split_equations(p, strict, keep_mask(strict.scores, 0.2))
        assert lost == 0 and split <= 1, p.uid
        assert np.all(np.diff(strict.levels[np.argsort(-strict.scores)]) <= 0)  # level first
        strict_splits += split
    assert strict_splits > 0  # the strict ranking does need the cross-level fill to avoid splits


def test_describe_within_documented_bounds(tok, problems, capsys):
    stats = describe(problems[:300], tok)
    assert "cot_median=" in capsys.readouterr().out
    assert stats["share_filler"] >= 0.55
    assert stats["max_share_essential"] <= 0.20
    assert stats["max_share_core"] <= 0.40
    assert 150 <= stats["cot_median"] <= 260
    assert 40 <= stats["prompt_median"] <= 80
    assert abs(stats["share_filler"] + stats["share_supporting"] + stats["share_essential"] - 1) < 1e-9


def test_tokenizer_corpus_covers_the_chat_template(problems):
    texts = tokenizer_corpus(problems[:8])
    assert len(texts) == 8 and all(t.startswith("<|im_start|>user\n") for t in texts)
    assert any("<COMP_POLICY>" in t for t in texts) and any("<COMP_20>" in t for t in texts)
    assert dataclasses.is_dataclass(problems[0]) and problems[0].cot in texts[0]


def test_pad_width_zero_pads_every_equation_number():
    c = ArithmeticConfig(max_steps=3, max_digits=2, max_operand=11, max_start=20, pad_width=2)
    plain = ArithmeticConfig(max_steps=3, max_digits=2, max_operand=11, max_start=20)
    for i in range(50):
        p, q = generate_problems(5, i + 1, c)[-1], generate_problems(5, i + 1, plain)[-1]
        assert p.answer == q.answer and p.question == q.question
        for s in p.spans:
            if s.is_equation:
                assert check_equation(s.text), s.text
                assert all(len(n) >= 2 for n in re.findall(r"\d+", s.text)), s.text
    from data.arithmetic_cot import equation
    assert equation(36, "+", 9, 45, width=2) == "36+09=45"
    assert equation(322, "-", 57, 265, width=2) == "322-57=265"     # never truncated
    with pytest.raises(ValueError, match="pad_width"):
        ArithmeticConfig(pad_width=7)


def test_drills_are_true_equations_of_the_task_distribution():
    from data.arithmetic import DRILL_CUE, drill_text
    c = ArithmeticConfig(max_steps=3, max_digits=2, max_operand=11, max_start=20, pad_width=2)
    text = drill_text(50, 3, c, equations=30)
    assert text == drill_text(50, 3, c, equations=30)             # a pure function
    lines = text.split("\n")
    assert len(lines) == 30
    for line in lines:
        cue, eq = line.split(": ")
        word, operand = cue.rsplit(" ", 1)
        assert word in DRILL_CUE.values() and check_equation(eq), line
        assert int(re.match(r"\d+[-+*/](\d+)=", eq).group(1)) == int(operand)
        assert all(int(n) < 100 for n in re.findall(r"\d+", eq))
    with pytest.raises(ValueError, match="equations"):
        drill_text(50, 0, c, equations=0)


def test_quote_mode_restates_each_question_sentence_verbatim():
    from data.arithmetic_cot import shares
    c = ArithmeticConfig(max_steps=3, max_digits=2, max_operand=11, max_start=20,
                         pad_width=2, restate="quote")
    for p in generate_problems(8, 40, c):
        sentences = re.findall(r"[^.?]+[.?]", p.question)
        sentences = [s.strip() for s in sentences]
        steps = sentences[1:-1]
        restated = [s.text for s in p.spans if s.kind == "restate" and "So I " in s.text]
        assert len(restated) == len(steps) == p.difficulty.n_steps
        for sentence, text in zip(steps, restated):
            assert text.startswith("\n" + sentence + " So I "), (sentence, text)
        last = [s for s in p.spans if s.kind == "narration"][-1]
        assert last.text.startswith("\n" + sentences[-1] + " ") and str(p.answer) in last.text
        ess, core, _ = shares([(s.text, s.level, s.is_equation, s.kind) for s in p.spans])
        assert ess <= c.max_essential_share and core <= c.max_core_share
    steps_only = ArithmeticConfig(max_steps=3, max_digits=2, max_operand=11, max_start=20,
                                  pad_width=2, restate="quote_steps")
    p = generate_problems(8, 1, steps_only)[0]
    assert not [s for s in p.spans if s.kind == "narration"][-1].text.startswith("\nHow many")
    with pytest.raises(ValueError, match="restate"):
        ArithmeticConfig(restate="verbatim")


@pytest.mark.parametrize("restate", ["quote_steps", "paraphrase"])
def test_mark_last_marks_the_last_step_and_no_other(restate):
    from data.arithmetic_cot import LAST_LEAD, LAST_QUOTE
    kw = dict(max_steps=3, max_digits=2, max_operand=11, max_start=20, pad_width=2,
              restate=restate)
    marked = generate_problems(8, 40, ArithmeticConfig(mark_last=True, **kw))
    plain = generate_problems(8, 40, ArithmeticConfig(**kw))
    for p, q in zip(marked, plain):
        assert p.question == q.question and p.answer == q.answer   # the text of the task stays
        restated = [s.text for s in p.spans if s.kind == "restate" and "o I " in s.text]
        assert len(restated) == p.difficulty.n_steps
        if restate == "quote_steps":
            # the marker sits right after the quoted sentence, before its operation
            assert [LAST_QUOTE + " So I " in t for t in restated] == \
                [False] * (len(restated) - 1) + [True]
        else:
            assert [t.startswith("\n" + LAST_LEAD) for t in restated] == \
                [False] * (len(restated) - 1) + [p.difficulty.n_steps > 1]
        assert LAST_QUOTE not in q.cot and not any(
            s.text.startswith("\n" + LAST_LEAD) for s in q.spans)
    with pytest.raises(ValueError, match="mark_last"):
        ArithmeticConfig(mark_last=1)
