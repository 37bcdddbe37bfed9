"""Chat template, SFT examples and response parsing (data/formats.py)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data import formats as F
from data.arithmetic import generate_problems
from data.compression import compress


@pytest.fixture(scope="module")
def tok(problem_tok):        # tests/conftest.py
    return problem_tok


@pytest.fixture(scope="module")
def problem():
    return generate_problems(12, 1)[0]


def test_special_tokens_match_the_contract():
    assert F.SPECIAL_TOKENS == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<COMP_20>",
        "<COMP_40>", "<COMP_60>", "<COMP_80>", "<COMP_100>", "<COMP_POLICY>", "[SEP]")
    assert F.control_token(60) == "<COMP_60>" and F.level_of_token("<COMP_100>") == 100
    assert F.level_of_token("<COMP_POLICY>") is None and F.level_of_token("<COMP_30>") is None


def test_prompt_and_response_text_by_hand():
    assert F.prompt_text("Q?") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert F.prompt_text("Q?", control=20) == "<|im_start|>user\nQ?<COMP_20><|im_end|>\n<|im_start|>assistant\n"
    assert F.prompt_text("Q?", control="policy") == \
        "<|im_start|>user\nQ?<COMP_POLICY><|im_end|>\n<|im_start|>assistant\n"
    assert F.response_text("a=b", "\\boxed{3}", level=40) == \
        "<COMP_40><think>\na=b\n</think>\n\n\\boxed{3}<|im_end|>"


@pytest.mark.parametrize("bad, match", [(30, "30"), ("fast", "fast"), (True, "True")])
def test_bad_controls_are_named(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        F.build_prompt(tok, "Q", control=bad)
    with pytest.raises(ValueError, match=match):
        F.build_sft_example(tok, "Q", [5], "x", control=bad)


def test_policy_is_not_a_response_level(tok):
    with pytest.raises(ValueError, match="policy"):
        F.build_response(tok, [5], "x", level="policy")


def test_sft_example_layout_and_mask(tok, problem):
    cot = tok.encode(problem.cot)
    ids, mask = F.build_sft_example(tok, problem.question, cot, problem.answer_text, control=40)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    start = int(np.argmax(mask))
    assert not mask[:start].any() and mask[start:].all()
    assert tok.decode(ids[:start]) == F.prompt_text(problem.question, control=40)
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert ids[start] == tok.token_to_id("<COMP_40>") and ids[-1] == tok.eos_id
    assert tok.decode(ids[start:]) == F.response_text(problem.cot, problem.answer_text, level=40)
    base_ids, base_mask = F.build_sft_example(tok, problem.question, cot, problem.answer_text)
    assert base_ids[int(np.argmax(base_mask))] == tok.token_to_id("<think>")


def test_policy_warm_start(tok, problem):
    ids, mask = F.build_policy_example(tok, problem.question, [7, 8], problem.answer_text, target_level=60)
    start = int(np.argmax(mask))
    assert tok.token_to_id("<COMP_POLICY>") in ids[:start].tolist()
    assert ids[start] == tok.token_to_id("<COMP_60>")
    parsed = F.parse_response(tok, ids[start:].tolist())
    assert parsed.level == 60 and parsed.control_first and parsed.cot_ids == (7, 8)


@pytest.mark.parametrize("level", [None, 20, 40, 60, 80, 100])
@pytest.mark.parametrize("ratio", [1.0, 0.2])
def test_round_trip(tok, problem, level, ratio):
    full = tok.encode(problem.cot)
    cot = compress(full, np.arange(len(full))[::-1] % 7, ratio)  # any subsequence of the ids
    response = F.build_response(tok, cot, problem.answer_text, level=level)
    parsed = F.parse_response(tok, response, expect_control=level is not None)
    newline = tok.encode("\n")
    assert parsed.level == level
    assert parsed.control_first == (level is not None)
    assert parsed.cot_ids == tuple(cot)
    assert parsed.think_ids == tuple(newline + cot + newline)
    assert parsed.think_length == len(cot) + 2 * len(newline)
    assert parsed.think_closed and parsed.ended and parsed.valid
    assert parsed.answer == str(problem.answer)


def test_prefixes_never_raise_and_flags_follow(tok, problem):
    response = F.build_response(tok, tok.encode(problem.cot)[:40], problem.answer_text, level=20)
    close_at = response.index(tok.token_to_id("</think>"))
    brace_end = len(response) - 1  # the last id before <|im_end|> closes \boxed{...}
    for cut in range(len(response) + 1):
        parsed = F.parse_response(tok, response[:cut])
        assert parsed.think_closed == (cut > close_at)
        assert parsed.valid == (cut >= brace_end)
        assert parsed.think_length == len(parsed.think_ids)
        assert parsed.control_first == (cut >= 1) and parsed.level == (20 if cut else None)
        if not parsed.think_closed and cut > 1:
            assert parsed.think_length == cut - 2  # ids after <COMP_20> <think>


def test_validity_rules(tok):
    think = [tok.token_to_id("<think>")] + tok.encode("x") + [tok.token_to_id("</think>")]
    answer = tok.encode("\n\n\\boxed{7}") + [tok.eos_id]
    c20, pol = tok.token_to_id("<COMP_20>"), tok.token_to_id("<COMP_POLICY>")
    assert F.parse_response(tok, [c20] + think + answer).valid
    no_ctrl = F.parse_response(tok, think + answer)
    assert not no_ctrl.valid and no_ctrl.level is None
    assert F.parse_response(tok, think + answer, expect_control=False).valid
    late = F.parse_response(tok, tok.encode("hi") + [c20] + think + answer)
    assert late.level == 20 and not late.control_first and not late.valid
    assert not F.parse_response(tok, [pol] + think + answer).valid  # policy is not a level
    no_box = F.parse_response(tok, [c20] + think + tok.encode("7") + [tok.eos_id])
    assert no_box.think_closed and no_box.answer is None and not no_box.valid
    after_end = F.parse_response(tok, [c20] + think + [tok.eos_id] + answer)
    assert after_end.ended and after_end.answer is None  # text after <|im_end|> is ignored


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_parse_never_raises_on_garbage(tok, data):
    specials = list(tok.special_ids.values())
    ids = data.draw(st.lists(st.one_of(st.integers(-3, tok.vocab_size + 3), st.sampled_from(specials)),
                             max_size=60))
    parsed = F.parse_response(tok, ids, expect_control=data.draw(st.booleans()))
    assert parsed.think_length == len(parsed.think_ids)
    assert not parsed.valid or (parsed.think_closed and parsed.answer is not None)
    assert not parsed.control_first or parsed.level is not None
    assert all(0 <= i < tok.vocab_size for i in parsed.think_ids)


def test_equation_token_mask_marks_exactly_the_equations(tok):
    text = "Then 5 more.\n36+09=45\nSo 45 now, 2+3 is not an equation."
    ids = tok.encode(text)
    mask = F.equation_token_mask(tok, ids)
    marked = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert marked == "36+09=45"
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    assert np.array_equal(F.equation_token_mask(tok, ids, pieces=pieces), mask)
    assert F.equation_token_mask(tok, []).shape == (0,)


def test_weight_level_token_scales_the_chosen_level_only(tok, problem):
    ex = F.build_policy_example(tok, "What is 2+3?", tok.encode(problem.cot), problem.answer_text,
                                target_level=60)
    first = int(np.argmax(ex.loss_mask))
    assert ex.ids[first] == tok.token_to_id("<COMP_60>")
    w = F.weight_level_token(ex, 10.0).loss_mask
    assert w[first] == 10.0 and np.all(w[first + 1:] == ex.loss_mask[first + 1:])
    assert np.all(w[:first] == 0)
    # composes with the equation weight: both factors where they meet, each alone elsewhere
    both = F.weight_equations(F.weight_level_token(ex, 10.0), F.equation_token_mask(tok, ex.ids), 4.0)
    assert both.loss_mask[first] == 10.0 and both.loss_mask.max() == 10.0
    with pytest.raises(ValueError, match="no response token"):
        F.weight_level_token(F.SFTExample(ex.ids, np.zeros_like(ex.loss_mask)), 2.0)


def test_weight_equations_scales_response_equations_only(tok, problem):
    ex = F.build_sft_example(tok, "What is 2+3=5?", tok.encode(problem.cot), problem.answer_text)
    mask = F.equation_token_mask(tok, ex.ids)
    assert mask[~ex.loss_mask].any()           # the prompt's "2+3=5" is an equation too
    w = F.weight_equations(ex, mask, 4.0)
    assert w.loss_mask.dtype == np.float32
    assert np.all(w.loss_mask[~ex.loss_mask] == 0)                  # prompt: still no loss
    assert np.all(w.loss_mask[ex.loss_mask & mask] == 4.0)
    assert np.all(w.loss_mask[ex.loss_mask & ~mask] == 1.0)
    assert np.array_equal(F.weight_equations(ex, mask, 1.0).loss_mask, ex.loss_mask.astype(np.float32))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="equation weight"):
            F.weight_equations(ex, mask, bad)
    with pytest.raises(ValueError, match="shape"):
        F.weight_equations(ex, mask[:-1], 2.0)
