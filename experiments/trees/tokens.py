"""Token layout, teacher-forcing batches and exact-match scoring for the tree task.

Used through ``experiments.trees.problems`` (which re-exports everything here). A problem is
any object with ``edges`` (int [E, 2] parent/child labels), ``root``, ``goal``
and ``path`` (labels root -> goal), i.e. a ``experiments.trees.problems.PathProblem``.

Layout of one example (``,`` is ``EDGE_SEP``, left out when
``edge_separator=False``)::

    BOS  p1 c1 ,  p2 c2 ,  ...  pE cE ,  QUERY root goal TASK | target ... EOS  PAD ...

``TASK`` is ``BACKWARD``, ``FORWARD_COT`` or ``FORWARD``; targets are

    backward      goal -> root                       e.g. 8 1 2 4
    forward_cot   goal -> root, STAGE, root -> goal  e.g. 8 1 2 4 | 4 2 1 8
    forward       root -> goal                       e.g. 4 2 1 8

each followed by ``EOS``; the loss covers every target token and ``EOS``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

__all__ = ["TASKS", "TreeVocab", "prompt_tokens", "target_tokens", "build_batch", "prompt_batch",
           "reference_targets", "teacher_forced_spans", "score"]

TASKS = ("backward", "forward_cot", "forward")


@dataclasses.dataclass(frozen=True)
class TreeVocab:
    """Token ids: nine special tokens, then label ``x`` at id ``NUM_SPECIAL + x``."""

    num_labels: int
    edge_separator: bool = True
    PAD: ClassVar[int] = 0
    BOS: ClassVar[int] = 1
    EOS: ClassVar[int] = 2
    EDGE_SEP: ClassVar[int] = 3
    QUERY: ClassVar[int] = 4
    STAGE: ClassVar[int] = 5       # the '|' between the backward chain and the forward path
    BACKWARD: ClassVar[int] = 6
    FORWARD_COT: ClassVar[int] = 7
    FORWARD: ClassVar[int] = 8
    NUM_SPECIAL: ClassVar[int] = 9

    def __post_init__(self):
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")

    @property
    def size(self) -> int:
        return self.NUM_SPECIAL + self.num_labels

    def label_ids(self, labels) -> np.ndarray:
        return np.asarray(labels, np.int64) + self.NUM_SPECIAL

    def task_id(self, task: str) -> int:
        _check_task(task)
        return {"backward": self.BACKWARD, "forward_cot": self.FORWARD_COT, "forward": self.FORWARD}[task]

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text, e.g. ``'<bos> 3 7 , <q> 3 7 <bwd> 7 3 <eos>'`` (pads dropped)."""
        names = ["", "<bos>", "<eos>", ",", "<q>", "|", "<bwd>", "<fwd_cot>", "<fwd>"]
        return " ".join(names[i] if i < self.NUM_SPECIAL else str(i - self.NUM_SPECIAL)
                        for i in map(int, ids) if i != self.PAD)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# --------------------------------------------------------------------- tokens
def prompt_tokens(problem: Any, *, vocab: TreeVocab, task: str) -> np.ndarray:
    """``BOS (p c [SEP])* QUERY root goal TASK`` as int32 ids."""
    edges = vocab.label_ids(problem.edges)
    if vocab.edge_separator:
        edges = np.concatenate([edges, np.full((len(edges), 1), vocab.EDGE_SEP)], 1)
    return np.concatenate([[vocab.BOS], edges.reshape(-1), [vocab.QUERY],
                           vocab.label_ids([problem.root, problem.goal]),
                           [vocab.task_id(task)]]).astype(np.int32)


def target_tokens(problem: Any, *, vocab: TreeVocab, task: str,
                  keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Target ids plus ``EOS``. ``keep`` (e.g. ``functools.partial(keep_ratio,
    ratio=.5)``) compresses the backward chain: the whole backward target, or the
    chain-of-thought part of forward_cot (its answer stays the full path)."""
    chain = np.asarray(problem.path)[::-1]
    if keep is not None:
        chain = np.asarray(keep(chain))
    if task == "backward":
        body = vocab.label_ids(chain)
    elif task == "forward_cot":
        body = np.concatenate([vocab.label_ids(chain), [vocab.STAGE], vocab.label_ids(problem.path)])
    else:
        _check_task(task)
        body = vocab.label_ids(problem.path)
    return np.concatenate([body, [vocab.EOS]]).astype(np.int32)


# -------------------------------------------------------------------- batches
def build_batch(problems: Sequence[Any], *, vocab: TreeVocab, task: str, seq_len: int,
                keep: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Teacher-forcing batch, right-padded to ``seq_len``.

    tokens, targets (tokens shifted left by one, PAD at the end), positions
    (0.. over real tokens, 0 on pads): int32 [B, T]; attention_mask: bool
    [B, T]; loss_mask: float32 [B, T], 1 where ``targets`` is a target token
    or EOS; target_start (index of the first target token in ``tokens``),
    target_len (with EOS): int32 [B].
    """
    b = len(problems)
    out = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "targets", "positions")}
    out["attention_mask"] = np.zeros((b, seq_len), bool)
    out["loss_mask"] = np.zeros((b, seq_len), np.float32)
    out["target_start"] = np.zeros(b, np.int32)
    out["target_len"] = np.zeros(b, np.int32)
    for i, problem in enumerate(problems):
        prompt = prompt_tokens(problem, vocab=vocab, task=task)
        target = target_tokens(problem, vocab=vocab, task=task, keep=keep)
        n, p = len(prompt) + len(target), len(prompt)
        if n > seq_len:
            raise ValueError(f"example {i} needs {n} tokens ({p} prompt + {len(target)} target) "
                             f"> seq_len={seq_len}")
        out["tokens"][i, :n] = np.concatenate([prompt, target])
        out["targets"][i, :n - 1] = out["tokens"][i, 1:n]
        out["positions"][i, :n] = np.arange(n)
        out["attention_mask"][i, :n] = True
        out["loss_mask"][i, p - 1:n - 1] = 1.0
        out["target_start"][i], out["target_len"][i] = p, len(target)
    return out


def prompt_batch(problems: Sequence[Any], *, vocab: TreeVocab, task: str,
                 seq_len: int) -> dict[str, np.ndarray]:
    """Prompts only, LEFT-padded for generation: tokens, positions (0 at the first
    real token) int32 [B, T]; attention_mask bool [B, T]."""
    b = len(problems)
    out = {"tokens": np.zeros((b, seq_len), np.int32), "positions": np.zeros((b, seq_len), np.int32),
           "attention_mask": np.zeros((b, seq_len), bool)}
    for i, problem in enumerate(problems):
        prompt = prompt_tokens(problem, vocab=vocab, task=task)
        if len(prompt) > seq_len:
            raise ValueError(f"example {i}: prompt of {len(prompt)} tokens > seq_len={seq_len}")
        out["tokens"][i, seq_len - len(prompt):] = prompt
        out["positions"][i, seq_len - len(prompt):] = np.arange(len(prompt))
        out["attention_mask"][i, seq_len - len(prompt):] = True
    return out


def reference_targets(problems: Sequence[Any], *, vocab: TreeVocab, task: str, length: int,
                      keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Target ids (with EOS) of each problem, PAD-padded: int32 [B, length]."""
    out = np.full((len(problems), length), vocab.PAD, np.int32)
    for i, problem in enumerate(problems):
        target = target_tokens(problem, vocab=vocab, task=task, keep=keep)
        if len(target) > length:
            raise ValueError(f"example {i}: target of {len(target)} tokens > length={length}")
        out[i, :len(target)] = target
    return out


def teacher_forced_spans(predictions: np.ndarray, batch: dict[str, np.ndarray], *,
                         length: int, pad_id: int = 0) -> np.ndarray:
    """Cut the target spans out of next-token predictions (argmax ids) [B, T]:
    ``predictions[b, target_start-1 : target_start-1+target_len]`` -> [B, length]."""
    predictions = np.asarray(predictions)
    if predictions.shape != batch["tokens"].shape:
        raise ValueError(f"predictions shape {predictions.shape} != tokens {batch['tokens'].shape}")
    out = np.full((len(predictions), length), pad_id, np.int32)
    for i, (start, n) in enumerate(zip(batch["target_start"], batch["target_len"])):
        span = predictions[i, start - 1:start - 1 + min(n, length)]
        out[i, :len(span)] = span
    return out


def score(predicted: np.ndarray, reference: np.ndarray, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Exact match of target spans: both int [B, L] (``predicted`` may be longer
    or shorter; missing tokens count as wrong). Positions where ``reference``
    is ``pad_id`` are ignored, so text after the reference EOS does not matter.

    exact_match: bool [B]; position_accuracy: float [L] (NaN where no example
    has a token); position_count: int [L].
    """
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.ndim != 2 or reference.ndim != 2 or len(predicted) != len(reference):
        raise ValueError(f"predicted {predicted.shape} and reference {reference.shape} must be [B, L]")
    b, length = reference.shape
    pred = np.full((b, length), -1, np.int64)
    pred[:, :min(length, predicted.shape[1])] = predicted[:, :length]
    valid = reference != pad_id
    correct = (pred == reference) & valid
    count = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, correct.sum(0) / count, np.nan)
    return {"exact_match": (correct == valid).all(1), "position_accuracy": accuracy,
            "position_count": count}
