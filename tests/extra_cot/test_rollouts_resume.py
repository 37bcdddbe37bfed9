"""answer_questions(resume_dir=...): chunked answers that a killed stage reads back."""
import os

import jax
import pytest

from data.arithmetic import ArithmeticConfig, generate_problems
from experiments.extra_cot import rollouts
from experiments.extra_cot.datasets import Question


@pytest.fixture(scope="module")
def questions():
    problems = generate_problems(3, 11, ArithmeticConfig(max_steps=2))
    return [Question(uid=f"q{i}", question=p.question, answer=p.answer_text.strip("\\boxed{}"),
                     cot=p.cot, difficulty={}) for i, p in enumerate(problems)]


def answer(model, tok, questions, **kwargs):
    return rollouts.answer_questions(model, tok, questions, batch_size=2, max_new_tokens=6,
                                     **kwargs)


@pytest.mark.parametrize("sampled", [False, True])
def test_chunks_give_the_answers_of_one_call_and_resume_after_a_kill(
        small_tok, tiny_decoder, questions, tmp_path, monkeypatch, sampled):
    model = tiny_decoder(small_tok.vocab_size, seed=4)
    kwargs = dict(control=40, temperature=1.0, key=jax.random.key(9)) if sampled else \
        dict(control=None)
    straight = answer(model, small_tok, questions, **kwargs)
    resume = str(tmp_path / "partial")
    real = rollouts.generate_responses
    calls = []

    def dies_on_the_third_chunk(*args, **kw):
        calls.append(kw["batch_offset"])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(rollouts, "generate_responses", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        answer(model, small_tok, questions, resume_dir=resume, chunk_batches=2, **kwargs)
    assert sorted(os.listdir(resume)) == ["0000000.jsonl", "0000004.jsonl"]   # 4 per chunk
    calls.clear()
    monkeypatch.setattr(rollouts, "generate_responses", lambda *a, **kw: (
        calls.append(kw["batch_offset"]), real(*a, **kw))[1])
    resumed = answer(model, small_tok, questions, resume_dir=resume, chunk_batches=2, **kwargs)
    assert calls == [4]          # only the third chunk (batches 4 and 5) is decoded again
    assert resumed == straight   # same verdicts, token ids and text, greedy or sampled


def test_a_chunk_file_of_other_questions_is_refused(small_tok, tiny_decoder, questions,
                                                     tmp_path):
    model = tiny_decoder(small_tok.vocab_size, seed=4)
    resume = str(tmp_path / "partial")
    answer(model, small_tok, questions[:4], control=None, resume_dir=resume, chunk_batches=2)
    with pytest.raises(ValueError, match="not those of this chunk's 4 questions; remove"):
        answer(model, small_tok, questions[4:8], control=None, resume_dir=resume,
               chunk_batches=2)
    with pytest.raises(ValueError, match="chunk_batches=0 must be an int >= 1"):
        answer(model, small_tok, questions, control=None, resume_dir=resume, chunk_batches=0)

