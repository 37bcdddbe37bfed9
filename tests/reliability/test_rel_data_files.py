"""Broken data files give errors that name the file and line; missing ones say where to put them.

Complements the format tests of each reader (tests/data/test_arithmetic.py::
test_malformed_lines_name_file_and_line, tests/data/test_benchmarks.py::
test_malformed_lines_name_file_and_line and ::test_missing_file_names_the_expected_path)
with what those do not cover: a file cut mid-line (what a killed non-atomic
writer leaves), a missing dataset *directory* and an empty path, the run
directory's own JSONL files (experiments/rundir.py) and a missing tokenizer.
"""
from __future__ import annotations

import json
import re

import pytest

from data import benchmarks as B
from data.arithmetic import generate_problems, load_problems, save_problems
from data.tokenizers import load_tokenizer
from experiments import rundir


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    save_problems(str(path), generate_problems(3, 4))
    return path


def test_problems_file_cut_mid_line_names_the_last_line(problems_file, tmp_path):
    text = problems_file.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:len(text) - 40])          # line 4 loses its end
    with pytest.raises(ValueError, match=re.escape(f"{cut}:4: invalid JSON")):
        load_problems(cut)
    assert len(load_problems(problems_file)) == 4


def test_problems_missing_field_names_file_line_and_field(problems_file, tmp_path):
    lines = problems_file.read_text().splitlines()
    row = json.loads(lines[2])
    del row["question"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3") + ".*question"):
        load_problems(bad)


def test_missing_dataset_directory_says_where_the_file_goes(tmp_path):
    missing_dir = tmp_path / "datasets" / "gsm8k"
    expected = missing_dir / "test.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        B.load_benchmark("gsm8k", jsonl_path=missing_dir, data_dir=tmp_path / "tfds")
    message = str(err.value)
    assert f"directory {missing_dir} does not exist" in message
    assert f"at {expected}" in message and "question, answer" in message
    assert not (tmp_path / "tfds").exists()        # nothing was built


def test_empty_dataset_path_says_where_the_file_goes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no jsonl_path was given.*<dir>/train\.jsonl"):
        B.build_benchmark("metamathqa", jsonl_path="", data_dir=tmp_path, split="train")


def test_benchmark_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text('{"problem": "1+1?", "solution": "2", "answer": "2", "subject": "a", '
                    '"level": 1, "unique_id": "u"}\n\n{"problem": "2+2?"}\n')
    with pytest.raises(B.BenchmarkFormatError, match=re.escape(f"{path}:3: missing field")):
        list(B.read_records("math500", jsonl_path=path, split="test"))


@pytest.mark.parametrize("bad_line, message", [
    ('{"uid": "a", "question": ', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
])
def test_run_directory_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "sft.jsonl"
    rundir.write_jsonl(str(path), [{"uid": "a"}, {"uid": "b"}])
    assert rundir.read_jsonl(str(path)) == [{"uid": "a"}, {"uid": "b"}]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: {message}")):
        rundir.read_jsonl(str(path))


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tok.model"))):
        load_tokenizer(tmp_path / "tok.model")


def test_question_file_missing_field_names_file_line_and_field(tmp_path):
    from experiments.extra_cot.datasets import question_row, read_questions
    rows = [question_row(p) for p in generate_problems(3, 7)]
    del rows[1]["cot"]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field(s) ['cot']")):
        read_questions(str(path))
    rows[1]["cot"] = "restored"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q.uid for q in read_questions(str(path))] == [r["uid"] for r in rows]


def _question_file(tmp_path, edit=None, name="q.jsonl"):
    from experiments.extra_cot.datasets import question_row
    rows = [question_row(p) for p in generate_problems(3, 4)]
    if edit:
        edit(rows)
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_fields_of_the_wrong_type_name_file_line_and_field(tmp_path):
    from experiments.extra_cot.datasets import read_questions
    path = _question_file(tmp_path, lambda rows: rows[2].update(question=None))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'question' must be str, "
                                                   "got null")):
        read_questions(str(path))
    path = _question_file(tmp_path, lambda rows: rows[0].update(answer=True))
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: field 'answer' must be str or int")):
        read_questions(str(path))


def test_an_integer_gold_answer_is_read_as_its_text(tmp_path):
    from data.answers import is_equivalent
    from experiments.extra_cot.datasets import read_questions
    path = _question_file(tmp_path, lambda rows: rows[1].update(answer=7))
    q = read_questions(str(path))[1]
    assert q.answer == "7" and q.answer_text == "\\boxed{7}" and is_equivalent("7", q.answer)


def test_empty_and_non_utf8_question_files_name_the_file(tmp_path):
    from experiments.extra_cot.datasets import read_questions
    empty = tmp_path / "sft.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: holds no question")):
        read_questions(str(empty))
    path = _question_file(tmp_path)
    data = path.read_bytes().split(b"\n")
    data[1] = data[1][:20] + b"\xff" + data[1][20:]
    path.write_bytes(b"\n".join(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 (byte 0xff at column 21)")):
        read_questions(str(path))


def test_truncated_tokenizer_and_model_files_name_the_file(tmp_path):
    from data.arithmetic import tokenizer_corpus
    from data.tokenizers import train_sentencepiece
    tok = train_sentencepiece(tokenizer_corpus(generate_problems(0, 60)), vocab_size=400)
    good = tmp_path / "tokenizer.model"
    tok.save(good)
    cut = tmp_path / "cut.model"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"'{cut}' is not a valid SentencePiece model")):
        load_tokenizer(cut)
    renamed = tmp_path / "tokenizer.json"          # a SentencePiece model under a JSON name
    renamed.write_bytes(good.read_bytes())
    assert load_tokenizer(renamed).encode("12+3") == tok.encode("12+3")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "model.json").write_text('{"vocab_size": 30')
    with pytest.raises(ValueError, match=re.escape(f"{stage / 'model'}.json: not a model")):
        rundir.load_model(str(stage))


def test_truncated_hf_config_names_the_file(tmp_path):
    from models.hf import load_hf
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "hidden_size"')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: malformed JSON")):
        load_hf(str(tmp_path))
