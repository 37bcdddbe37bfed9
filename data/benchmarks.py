"""GSM8K, MATH-500, AMC 2023 and MetaMathQA from LOCAL files, as tfds datasets.

Nothing here downloads: each builder reads a JSONL file you already have,
writes ``array_record`` shards under ``data_dir`` and is read back through
``tfds.data_source`` and grain (TensorFlow is never imported). Published
schemas accepted (one JSON object per line):

==========  =======================================  ==============================================
name        source (Hugging Face dataset)            fields read
==========  =======================================  ==============================================
gsm8k       openai/gsm8k (``main``)                  question, answer (ends with ``#### N``)
math500     HuggingFaceH4/MATH-500                   problem, solution, answer, subject, level, unique_id
amc2023     math-ai/amc23 (40 problems)              id, question, answer (a number, often float)
            AI-MO/aimo-validation-amc (variant)      id, problem, answer, url
metamathqa  meta-math/MetaMathQA                     query, response (ends ``The answer is: N``), type
==========  =======================================  ==============================================

Sources of the schemas: the Hugging Face dataset cards above. math-ai/amc23
ships one ``test`` parquet file of 40 rows (id, question, answer stored as
float64, e.g. 27.0), consistent with mirrors such as FlippyDora/amc23 whose card
lists id, problem, answer (float64), url, question; convert parquet to JSONL
first (``pandas.read_parquet(f).to_json(out, orient="records", lines=True)``).
GSM8K's JSONL is also the original grade-school-math repository's
``{train,test}.jsonl``. MetaMathQA is published as one JSON array
(``MetaMathQA-395K.json``): a ``.json`` array file is accepted too (read into
memory at once; JSONL streams).

Every example becomes one common record of strings: question, answer, cot
(the worked solution without its final-answer line; GSM8K ``<<...>>``
calculator notes removed), solution (the published text), id (MATH-500's
unique_id, ``amc2023/<id>``, else ``<name>/<split>/<row index>``), source (the
benchmark name) and category (MATH subject or MetaMathQA type, else "").

``jsonl_path`` is a file, or a directory holding ``<split>.jsonl``. Each split
is its own builder config: ``<data_dir>/chrpo_<name>/<split>/1.0.0/``. The
source file's SHA-256 is stored with the data, and a changed file is rebuilt.
On several hosts, build once (one process) before everyone loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from typing import Any, Iterator

import grain
import tensorflow_datasets as tfds

from data.answers import extract_answer_is, extract_gsm8k_answer

__all__ = [
    "BENCHMARKS", "SPLITS", "RECORD_FIELDS", "BenchmarkFormatError", "expected_path",
    "read_records", "build_benchmark", "load_benchmark", "benchmark_loader",
]

BENCHMARKS = ("gsm8k", "math500", "amc2023", "metamathqa")
SPLITS = {"gsm8k": ("train", "test"), "math500": ("test",), "amc2023": ("test",),
          "metamathqa": ("train",)}
RECORD_FIELDS = ("question", "answer", "cot", "solution", "id", "source", "category")
_SCHEMAS = {
    "gsm8k": "question, answer (ending in '#### N'); from openai/gsm8k",
    "math500": "problem, solution, answer, subject, level, unique_id; from HuggingFaceH4/MATH-500",
    "amc2023": "id, question (or problem), answer; from math-ai/amc23",
    "metamathqa": "query, response (ending in 'The answer is: N'), type; from meta-math/MetaMathQA",
}
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")


class BenchmarkFormatError(ValueError):
    """A line of a benchmark file is not valid JSON or lacks a field; names file and line."""


def _check_name(name: str, split: str | None = None) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")
    if split is not None and split not in SPLITS[name]:
        raise ValueError(f"split for {name} must be one of {SPLITS[name]}, got {split!r}")


def expected_path(name: str, *, jsonl_path: str | os.PathLike, split: str) -> str:
    """The file read for (name, split): ``jsonl_path`` itself, or ``<dir>/<split>.jsonl``."""
    _check_name(name, split)
    path = os.fspath(jsonl_path)
    return os.path.join(path, f"{split}.jsonl") if os.path.isdir(path) else path


def _require_file(name: str, path: str, split: str) -> None:
    """FileNotFoundError saying where the file should go (a missing directory included)."""
    if os.path.isfile(path):
        return
    fields = f"(fields: {_SCHEMAS[name]})"
    if not path:
        where = f"no jsonl_path was given; put the {split} file {fields} at <dir>/{split}.jsonl"
    elif not path.endswith((".jsonl", ".json")):
        where = (f"the directory {path} does not exist; put the file {fields} at "
                 f"{os.path.join(path, f'{split}.jsonl')}")
    else:
        where = f"expects a local JSONL file at {path} {fields}; no such file"
    raise FileNotFoundError(
        f"{name} split {split!r}: {where}. Pass jsonl_path=<that file> or a "
        f"directory containing {split}.jsonl. Nothing is downloaded.")


def _rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed row) for each non-blank JSONL line, or each item of a JSON array."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise BenchmarkFormatError(f"{path}: expected a JSON array of objects")
        for i, item in enumerate(items):
            yield f"{path} item {i}", item
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(
                    f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None


def _field(row: Any, where: str, *keys: str, kinds=(str,)) -> Any:
    """First present key of ``keys``; raises naming the location if absent or mistyped."""
    if not isinstance(row, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key in row:
            if not isinstance(row[key], kinds) or isinstance(row[key], bool):
                raise BenchmarkFormatError(f"{where}: field {key!r} has type "
                                           f"{type(row[key]).__name__}")
            return row[key]
    raise BenchmarkFormatError(f"{where}: missing field {' or '.join(map(repr, keys))}")


def _number_text(x: Any) -> str:
    """AMC answers are stored as floats (27.0): integral values print as integers."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _metamath_cot(response: str) -> str:
    """Response minus its final 'The answer is: N' line and a preceding '#### N' line."""
    lines = response.rstrip().split("\n")
    if lines and "the answer is" in lines[-1].lower():
        lines.pop()
    if lines and lines[-1].lstrip().startswith("####"):
        lines.pop()
    return "\n".join(lines).strip()


def _record(name: str, row: Any, where: str, index: int, split: str) -> dict[str, str]:
    blank = dict.fromkeys(RECORD_FIELDS, "")
    blank.update(source=name, id=f"{name}/{split}/{index}")
    if name == "gsm8k":
        question, solution = _field(row, where, "question"), _field(row, where, "answer")
        answer = extract_gsm8k_answer(solution)
        if answer is None:
            raise BenchmarkFormatError(f"{where}: field 'answer' has no '#### N' final line")
        cot = _CALCULATOR.sub("", solution.rsplit("####", 1)[0]).strip()
        return {**blank, "question": question, "answer": answer, "cot": cot, "solution": solution}
    if name == "math500":
        _field(row, where, "level", kinds=(int, str))
        solution = _field(row, where, "solution")
        return {**blank, "question": _field(row, where, "problem"),
                "answer": _field(row, where, "answer"), "cot": solution.strip(),
                "solution": solution, "id": _field(row, where, "unique_id"),
                "category": _field(row, where, "subject")}
    if name == "amc2023":
        return {**blank, "question": _field(row, where, "question", "problem"),
                "answer": _number_text(_field(row, where, "answer", kinds=(str, int, float))),
                "id": f"amc2023/{_number_text(_field(row, where, 'id', kinds=(str, int)))}"}
    response = _field(row, where, "response")
    answer = extract_answer_is(response)
    if answer is None:
        raise BenchmarkFormatError(f"{where}: field 'response' has no 'The answer is: N' ending")
    return {**blank, "question": _field(row, where, "query"), "answer": answer,
            "cot": _metamath_cot(response), "solution": response,
            "category": _field(row, where, "type")}


def read_records(name: str, *, jsonl_path: str | os.PathLike, split: str) -> Iterator[dict[str, str]]:
    """Common records of a local benchmark file, in file order (no tfds involved)."""
    path = expected_path(name, jsonl_path=jsonl_path, split=split)
    _require_file(name, path, split)
    for index, (where, row) in enumerate(_rows(path)):
        yield _record(name, row, where, index, split)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ tfds builders
class _LocalBenchmark(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds one split (the builder config's name) from a local file; no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local JSONL import into the common record."}
    BENCHMARK = ""
    # tfds looks for a checksums file next to a builder's code through
    # importlib_resources (not a dependency here); these builders fetch no URLs.
    code_path = None

    def __init__(self, *, jsonl_path: str | os.PathLike | None = None, **kwargs):
        self._jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f"{self.BENCHMARK}: {_SCHEMAS[self.BENCHMARK]}",
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in RECORD_FIELDS}),
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager   # never used: nothing is downloaded
        split = self.builder_config.name
        if self._jsonl_path is None:
            raise ValueError(f"{self.name}/{split} is not built under {self.data_dir}; building "
                             f"it needs jsonl_path (fields: {_SCHEMAS[self.BENCHMARK]})")
        path = expected_path(self.BENCHMARK, jsonl_path=self._jsonl_path, split=split)
        _require_file(self.BENCHMARK, path, split)
        self.info.metadata["source_sha256"] = _sha256(path)
        return {split: self._generate_examples(split)}

    def _generate_examples(self, split):
        records = read_records(self.BENCHMARK, jsonl_path=self._jsonl_path, split=split)
        yield from enumerate(records)


def _configs(name: str) -> list:
    return [tfds.core.BuilderConfig(name=s, description=f"{name} {s} split") for s in SPLITS[name]]


class ChrpoGsm8k(_LocalBenchmark):
    """GSM8K (openai/gsm8k) from local JSONL."""
    name, BENCHMARK, BUILDER_CONFIGS = "chrpo_gsm8k", "gsm8k", _configs("gsm8k")


class ChrpoMath500(_LocalBenchmark):
    """MATH-500 (HuggingFaceH4/MATH-500) from local JSONL."""
    name, BENCHMARK, BUILDER_CONFIGS = "chrpo_math500", "math500", _configs("math500")


class ChrpoAmc2023(_LocalBenchmark):
    """AMC 2023 (math-ai/amc23, or AI-MO/aimo-validation-amc) from local JSONL."""
    name, BENCHMARK, BUILDER_CONFIGS = "chrpo_amc2023", "amc2023", _configs("amc2023")


class ChrpoMetaMathQA(_LocalBenchmark):
    """MetaMathQA (meta-math/MetaMathQA) from local JSONL or its JSON array."""
    name, BENCHMARK, BUILDER_CONFIGS = "chrpo_metamathqa", "metamathqa", _configs("metamathqa")


_BUILDERS = {c.BENCHMARK: c for c in (ChrpoGsm8k, ChrpoMath500, ChrpoAmc2023, ChrpoMetaMathQA)}


def build_benchmark(name: str, *, jsonl_path: str | os.PathLike, data_dir: str | os.PathLike,
                    split: str) -> tfds.core.DatasetBuilder:
    """Write ``<data_dir>/chrpo_<name>/<split>/1.0.0`` (array_record) from the local file.

    Reuses a prepared copy whose stored source SHA-256 matches the file, else
    (re)builds. Raises FileNotFoundError naming the expected file, or
    :class:`BenchmarkFormatError` naming file and line.
    """
    _check_name(name, split)
    path = expected_path(name, jsonl_path=jsonl_path, split=split)
    _require_file(name, path, split)
    builder = _BUILDERS[name](jsonl_path=jsonl_path, config=split, data_dir=os.fspath(data_dir),
                              file_format="array_record")
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if builder.is_prepared() and builder.info.metadata.get("source_sha256") != _sha256(path):
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    if mode == tfds.download.GenerateMode.FORCE_REDOWNLOAD or not builder.is_prepared():
        print(f"[data] {name}/{split}: converting the local file {path} to array_record under "
              f"{os.fspath(data_dir)} (nothing is downloaded)", flush=True)
    # tfds prints "Downloading and preparing dataset ..." for any build and draws progress
    # bars; here nothing is downloaded, so its stdout is dropped (errors still raise)
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


def _data_source(name: str, *, data_dir: str | os.PathLike, split: str):
    _check_name(name, split)
    if not _BUILDERS[name](config=split, data_dir=os.fspath(data_dir)).is_prepared():
        raise FileNotFoundError(f"{name}/{split} is not built under {data_dir}; call "
                                f"build_benchmark({name!r}, jsonl_path=..., data_dir=..., split={split!r})")
    return tfds.data_source(f"chrpo_{name}/{split}", split=split, data_dir=os.fspath(data_dir),
                            download=False)


def _decode(example: dict) -> dict[str, str]:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in example.items()}


class _Decode(grain.transforms.Map):
    def map(self, element):
        return _decode(element)


def load_benchmark(name: str, *, jsonl_path: str | os.PathLike | None, data_dir: str | os.PathLike,
                   split: str = "test", shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Records (dicts of str, fields ``RECORD_FIELDS``) of one split, in file order.

    Builds first when ``jsonl_path`` is given (see :func:`build_benchmark`);
    with None the split must already be built. ``shard_index``/``shard_count``
    keep records ``shard_index, shard_index + shard_count, ...`` (multi-host
    evaluation; e.g. ``jax.process_index()``, ``jax.process_count()``).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if jsonl_path is not None:
        build_benchmark(name, jsonl_path=jsonl_path, data_dir=data_dir, split=split)
    dataset = grain.MapDataset.source(_data_source(name, data_dir=data_dir, split=split))
    if shard_count > 1:
        dataset = dataset[shard_index::shard_count]
    return dataset.map(_decode)


def benchmark_loader(name: str, *, data_dir: str | os.PathLike, split: str = "test",
                     batch_size: int | None = None, shard_options: Any = None,
                     shuffle: bool = False, seed: int = 0, num_epochs: int = 1,
                     worker_count: int = 0) -> grain.DataLoader:
    """grain.DataLoader over a built split with an IndexSampler.

    ``shard_options``: a ``grain.sharding.ShardOptions`` such as
    ``ShardOptions(shard_index=i, shard_count=n)`` or, built by the caller,
    ``grain.sharding.ShardByJaxProcess()`` (this module never imports jax).
    With ``batch_size`` each element is a dict of string arrays [batch].
    """
    source = _data_source(name, data_dir=data_dir, split=split)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options or grain.sharding.NoSharding(),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    operations = [_Decode()]
    if batch_size:
        operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=False))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
