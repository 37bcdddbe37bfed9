"""Questions of a run and the SFT batches built from them.

A *question* row (``data/<split>.jsonl``) is what every later stage needs of a
problem, whatever its source::

    {"uid", "question", "answer" (gold text), "cot" (reference chain of thought),
     "difficulty" ({name: int}, e.g. data.arithmetic.Difficulty; {} for benchmarks)}

SFT batches: :func:`sft_batch` is a pure function of ``(seed, step)`` (a resumed
run sees the same data): one random example picks the row width (its length
rounded up to a multiple of ``bucket``), then ``batch_tokens // width`` examples
of that width bucket fill the batch, so every step costs about the same and a
run compiles one step per width.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data.arithmetic import Problem
from data.formats import SFTExample
from models import sharding
from models.compressor import pad_rows
from experiments import rundir

__all__ = ["Question", "QUESTION_FIELDS", "question_row", "question_from_row", "read_questions",
           "sft_batch", "pad_left", "bucket_width"]


@dataclasses.dataclass(frozen=True)
class Question:
    """One problem as the pipeline sees it."""

    uid: str
    question: str
    answer: str
    cot: str
    difficulty: dict

    @property
    def answer_text(self) -> str:
        """The text after ``</think>``: the gold answer in ``\\boxed{}``."""
        return f"\\boxed{{{self.answer}}}"


def question_row(problem: Problem) -> dict:
    """The JSONL row of a ``data.arithmetic.Problem``."""
    return {"uid": problem.uid, "question": problem.question, "answer": str(problem.answer),
            "cot": problem.cot, "difficulty": dataclasses.asdict(problem.difficulty)}


QUESTION_FIELDS = ("uid", "question", "answer", "cot")


QUESTION_TYPES = {"uid": (str,), "question": (str,), "answer": (str, int), "cot": (str,),
                  "difficulty": (dict, type(None))}


def read_questions(path: str) -> list[Question]:
    """The questions of a JSONL file written by `question_row`; a malformed line, a
    missing field or one of the wrong type (``"question": null``) raises ValueError
    naming file:line, and so does a file without a question. An integer gold answer
    (``"answer": 7``) is read as its decimal text."""
    rows = rundir.read_jsonl(path, required=QUESTION_FIELDS, types=QUESTION_TYPES)
    if not rows:
        raise ValueError(f"{path}: holds no question (an empty file?)")
    return [question_from_row(r) for r in rows]


def question_from_row(row: dict) -> Question:
    answer = row["answer"]
    return Question(uid=row["uid"], question=row["question"],
                    answer=str(answer) if isinstance(answer, int) else answer,
                    cot=row["cot"], difficulty=dict(row.get("difficulty") or {}))


def bucket_width(n: int, bucket: int) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    return max(bucket, -(-int(n) // bucket) * bucket)


def sft_batch(examples: Sequence[SFTExample], *, step: int, seed: int, batch_tokens: int,
              bucket: int, max_length: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of an SFT run: right-padded ``tokens`` int32, ``mask`` and
    ``loss_mask`` bool, all [rows, width]; examples longer than ``max_length``
    are cut to it (their tail loses the loss). ``loss_mask`` is float32 when an
    example carries loss weights (``data.formats.weight_equations``)."""
    if not examples:
        raise ValueError("sft_batch needs at least one example")
    if max_length < bucket:
        raise ValueError(f"max_length={max_length} must be >= bucket={bucket}")
    lengths = np.array([min(len(e.ids), max_length) for e in examples])
    widths = np.array([bucket_width(n, bucket) for n in lengths])
    rng = np.random.default_rng([int(seed), int(step)])
    first = int(rng.integers(len(examples)))
    width = int(widths[first])
    rows = max(1, batch_tokens // width)
    same = np.flatnonzero(widths == width)
    chosen = np.concatenate([[first], rng.choice(same, rows - 1)]).astype(int)
    weighted = any(examples[i].loss_mask.dtype != bool for i in chosen)
    batch = {"tokens": np.zeros((rows, width), np.int32), "mask": np.zeros((rows, width), bool),
             "loss_mask": np.zeros((rows, width), np.float32 if weighted else bool)}
    for r, i in enumerate(chosen):
        n = lengths[i]
        batch["tokens"][r, :n] = examples[i].ids[:n]
        batch["mask"][r, :n] = True
        batch["loss_mask"][r, :n] = examples[i].loss_mask[:n]
    return batch


def pad_left(rows: Sequence[Sequence[int]], *, width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, width], mask bool [B, width]) with each row flush right (left padding),
    the layout of prompts for ``models.sampling.generate``."""
    return pad_rows(rows, width=width, pad_id=pad_id, left=True)


# ----------------------------------------------------------------------------- the data stage

SPLITS = ("sft", "rl", "val", "test")


def _arithmetic_config(block):
    from data.arithmetic import ArithmeticConfig  # noqa: PLC0415

    return ArithmeticConfig(**block.to_dict())


def _benchmark_rows(block, split: str, work_dir: str) -> list[dict]:
    """Question rows of one split of a local benchmark (see data/benchmarks.py).

    Several processes: process 0 builds the array_record copy under ``work_dir``
    (on the shared run directory), the others wait for it and then read it."""
    from data.benchmarks import build_benchmark, load_benchmark  # noqa: PLC0415 (tfds)

    name, path, bench_split, start, count = block[split]
    if sharding.is_main_process():
        build_benchmark(name, jsonl_path=path, data_dir=work_dir, split=bench_split)
    sharding.sync_processes(f"benchmark {name}/{bench_split} built")
    records = load_benchmark(name, jsonl_path=None, data_dir=work_dir, split=bench_split)
    rows = []
    for i in range(start, min(start + count, len(records))):
        r = records[i]
        steps = len([line for line in r["cot"].splitlines() if line.strip()])
        rows.append({"uid": r["id"], "question": r["question"], "answer": r["answer"],
                     "cot": r["cot"], "difficulty": {"n_steps": steps}})
    if not rows:
        raise ValueError(f"data.benchmarks.{split}: no record in {name}/{bench_split} "
                         f"from {path} at [{start}, {start + count})")
    return rows


def prepare_data(config, run) -> dict:
    """Tokenizer and question splits under ``run_dir/data`` (plus the compressor's problems).

    Arithmetic: each split is its own problem stream (``data.seeds``), so splits
    never share a problem. Benchmarks: slices of local files (``data.benchmarks``).
    The compressor always learns from annotated synthetic problems
    (``compressor_problems.jsonl``): real benchmarks carry no span annotations.
    Every process computes the same rows; process 0 writes the files.
    """
    from data.arithmetic import generate_problems, save_problems, tokenizer_corpus  # noqa: PLC0415
    from data.tokenizers import load_tokenizer, train_sentencepiece  # noqa: PLC0415
    from experiments.rundir import write_jsonl  # noqa: PLC0415

    d = config.data
    out = run.stage_dir("data")
    arith = _arithmetic_config(d.arithmetic)
    if d.tokenizer_path:
        tokenizer = load_tokenizer(d.tokenizer_path)
        name = "tokenizer.json" if d.tokenizer_path.endswith(".json") else "tokenizer.model"
    else:
        corpus = tokenizer_corpus(generate_problems(d.seeds.tokenizer, d.tokenizer_problems, arith))
        tokenizer, name = train_sentencepiece(corpus, vocab_size=d.vocab_size), "tokenizer.model"
    main = sharding.is_main_process()
    if main:
        tokenizer.save(f"{out}/{name}")
    sizes = {}
    for split in SPLITS:
        if d.source == "arithmetic":
            rows = [question_row(p) for p in
                    generate_problems(d.seeds[split], d.sizes[split], arith)]
        else:
            rows = _benchmark_rows(d.benchmarks, split, f"{out}/tfds")
        write_jsonl(f"{out}/{split}.jsonl", rows)
        sizes[split] = len(rows)
    if main:
        save_problems(f"{out}/compressor_problems.jsonl",
                      generate_problems(d.seeds.compressor, d.compressor_problems, arith))
        # the compressor's held-out problems: the run's task, a stream of their own
        save_problems(f"{out}/compressor_eval.jsonl",
                      generate_problems(d.seeds.compressor_eval, config.compressor.data.num_eval,
                                        arith))
    return {"vocab_size": tokenizer.vocab_size, **{f"n_{k}": v for k, v in sizes.items()}}
