"""data/benchmarks.py: local JSONL -> tfds array_record -> tfds.data_source + grain.

Fixtures under tests/data/fixtures/ are hand-written rows in each published
schema; every expected value below is read off those files by hand.
"""
import inspect
import json
import pathlib
import shutil
import socket
import sys

import grain
import pytest

from data import benchmarks as B

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FILES = {"gsm8k": ("gsm8k_test.jsonl", "test"), "math500": ("math500_test.jsonl", "test"),
         "amc2023": ("amc23_test.jsonl", "test"), "metamathqa": ("metamathqa_train.jsonl", "train")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """All four benchmarks built once into one data_dir, with sockets disabled."""
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        def no_network(*args, **kwargs):
            raise AssertionError("a benchmark build touched the network")
        for name in ("socket", "create_connection", "getaddrinfo"):
            mp.setattr(socket, name, no_network)
        for name, (file, split) in FILES.items():
            B.build_benchmark(name, jsonl_path=FIXTURES / file, data_dir=data_dir, split=split)
    return data_dir


def _load(built, name):
    return list(B.load_benchmark(name, jsonl_path=None, data_dir=built, split=FILES[name][1]))


def test_no_tensorflow_and_no_urls(built):
    assert "tensorflow" not in sys.modules
    assert "http" not in inspect.getsource(B)
    for name in B.BENCHMARKS:
        assert (built / f"chrpo_{name}" / FILES[name][1] / "1.0.0").is_dir()


def test_gsm8k_records(built):
    records = _load(built, "gsm8k")
    assert [r["answer"] for r in records] == ["56", "75", "1250", "-7"]   # blank line skipped
    assert [r["id"] for r in records] == [f"gsm8k/test/{i}" for i in range(4)]
    first = records[0]
    assert set(first) == set(B.RECORD_FIELDS) and first["source"] == "gsm8k"
    assert first["question"].startswith("Mira packs 36 apples")
    assert first["cot"] == ("Mira fills 36/4 = 9 bags.\nWith 5 more bags she has 9+5 = 14 bags.\n"
                            "That is 14*4 = 56 apples.")
    assert first["solution"].endswith("<<14*4=56>>56 apples.\n#### 56")


def test_math500_records(built):
    records = _load(built, "math500")
    assert [r["answer"] for r in records] == ["\\left( 2, \\frac{3\\pi}{2} \\right)", "15", "\\sqrt{3}"]
    assert [r["id"] for r in records] == ["test/precalculus/9001.json", "test/prealgebra/9002.json",
                                          "test/algebra/9003.json"]
    assert [r["category"] for r in records] == ["Precalculus", "Prealgebra", "Algebra"]
    assert records[1]["cot"].endswith("\\sqrt{225} = \\boxed{15}$.")


def test_amc_records_and_aimo_variant(built, tmp_path):
    records = _load(built, "amc2023")
    assert [(r["id"], r["answer"]) for r in records] == [("amc2023/0", "2"), ("amc2023/1", "25"),
                                                         ("amc2023/2", "66")]
    assert records[1]["question"].startswith("Positive real numbers $a$ and $b$")
    assert records[0]["cot"] == records[0]["solution"] == ""
    variant = list(B.load_benchmark("amc2023", jsonl_path=FIXTURES / "aimo_amc_train.jsonl",
                                    data_dir=tmp_path, split="test"))
    assert [(r["answer"], r["question"][:15]) for r in variant] == [("3", "What is the rem"),
                                                                    ("9", "How many positi")]


def test_metamathqa_records_and_json_array(built, tmp_path):
    records = _load(built, "metamathqa")
    assert [r["answer"] for r in records] == ["\\sqrt{5}", "12", "4"]
    assert [r["category"] for r in records] == ["MATH_AnsAug", "GSM_AnsAug", "MATH_FOBAR"]
    assert records[1]["cot"] == ("Lena earns 18/60 = $0.3 per minute.\n"
                                 "For 40 minutes she earned 0.3 x 40 = $12.")
    rows = [json.loads(line) for line in (FIXTURES / "metamathqa_train.jsonl").read_text().splitlines()]
    array_file = tmp_path / "MetaMathQA-395K.json"
    array_file.write_text(json.dumps(rows, indent=1))
    assert list(B.read_records("metamathqa", jsonl_path=array_file, split="train")) == records


def test_directory_path_and_sharded_reads(tmp_path):
    shutil.copy(FIXTURES / "gsm8k_test.jsonl", tmp_path / "test.jsonl")
    data_dir = tmp_path / "tfds"
    ids = [[r["id"] for r in B.load_benchmark("gsm8k", jsonl_path=tmp_path, data_dir=data_dir,
                                               split="test", shard_index=i, shard_count=2)]
           for i in range(2)]
    assert ids == [["gsm8k/test/0", "gsm8k/test/2"], ["gsm8k/test/1", "gsm8k/test/3"]]


def test_grain_loader_with_index_sampler(built):
    shards = [[r["id"] for r in B.benchmark_loader(
        "gsm8k", data_dir=built, split="test",
        shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2))] for i in range(2)]
    assert sorted(shards[0] + shards[1]) == [f"gsm8k/test/{i}" for i in range(4)]
    assert len(shards[0]) == len(shards[1]) == 2
    batches = list(B.benchmark_loader("gsm8k", data_dir=built, split="test", batch_size=3))
    assert [list(b["answer"]) for b in batches] == [["56", "75", "1250"], ["-7"]]
    shuffled = [r["id"] for r in B.benchmark_loader("gsm8k", data_dir=built, split="test",
                                                    shuffle=True, seed=3)]
    assert sorted(shuffled) == [f"gsm8k/test/{i}" for i in range(4)]


def test_changed_source_is_rebuilt(tmp_path):
    source = tmp_path / "math.jsonl"
    lines = (FIXTURES / "math500_test.jsonl").read_text().splitlines()
    source.write_text(lines[0] + "\n")
    data_dir = tmp_path / "tfds"
    assert len(B.load_benchmark("math500", jsonl_path=source, data_dir=data_dir)) == 1
    source.write_text("\n".join(lines) + "\n")
    assert len(B.load_benchmark("math500", jsonl_path=source, data_dir=data_dir)) == 3


def test_missing_file_names_the_expected_path(tmp_path):
    missing = tmp_path / "gsm8k" / "test.jsonl"
    with pytest.raises(FileNotFoundError, match=f"at {missing}") as info:
        B.load_benchmark("gsm8k", jsonl_path=tmp_path / "gsm8k" / "test.jsonl", data_dir=tmp_path)
    assert "split 'test'" in str(info.value) and "question, answer" in str(info.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match=f"at {tmp_path / 'dir' / 'train.jsonl'}"):
        B.build_benchmark("gsm8k", jsonl_path=tmp_path / "dir", data_dir=tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="math500/test is not built under"):
        B.load_benchmark("math500", jsonl_path=None, data_dir=tmp_path / "empty")


def test_malformed_lines_name_file_and_line(tmp_path):
    good = (FIXTURES / "gsm8k_test.jsonl").read_text().splitlines()[0]
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text(f"{good}\n{good}\n{{\"question\": \"q\", \"answer\": \n")
    with pytest.raises(B.BenchmarkFormatError, match=f"{bad_json}:3: malformed JSON"):
        B.build_benchmark("gsm8k", jsonl_path=bad_json, data_dir=tmp_path / "tfds", split="test")
    missing_field = tmp_path / "missing_field.jsonl"
    missing_field.write_text(f'{good}\n{{"question": "What is 1+1?"}}\n')
    with pytest.raises(B.BenchmarkFormatError, match=f"{missing_field}:2: missing field 'answer'"):
        B.build_benchmark("gsm8k", jsonl_path=missing_field, data_dir=tmp_path / "tfds", split="test")
    no_marker = tmp_path / "no_marker.jsonl"
    no_marker.write_text('{"question": "q", "answer": "It is 2."}\n')
    with pytest.raises(B.BenchmarkFormatError, match=f"{no_marker}:1: .*'#### N'"):
        list(B.read_records("gsm8k", jsonl_path=no_marker, split="test"))
    wrong_type = tmp_path / "wrong_type.jsonl"
    wrong_type.write_text('{"query": "q", "response": 5, "type": "GSM_AnsAug"}\n')
    with pytest.raises(B.BenchmarkFormatError, match=f"{wrong_type}:1: field 'response' has type int"):
        list(B.read_records("metamathqa", jsonl_path=wrong_type, split="train"))
    assert not (tmp_path / "tfds" / "chrpo_gsm8k" / "test" / "1.0.0").exists()   # nothing half-built


def test_bad_names():
    with pytest.raises(ValueError, match="benchmark must be one of"):
        B.expected_path("gsm9k", jsonl_path=".", split="test")
    with pytest.raises(ValueError, match=r"split for math500 must be one of \('test',\)"):
        B.expected_path("math500", jsonl_path=".", split="train")


def test_a_local_build_says_what_it_does_and_no_download(tmp_path, capsys):
    B.build_benchmark("gsm8k", jsonl_path=FIXTURES / "gsm8k_test.jsonl", data_dir=tmp_path,
                      split="test")
    out = capsys.readouterr().out
    assert "Downloading" not in out and "nothing is downloaded" in out
    B.build_benchmark("gsm8k", jsonl_path=FIXTURES / "gsm8k_test.jsonl", data_dir=tmp_path,
                      split="test")                           # reused: silent
    assert capsys.readouterr().out == ""
