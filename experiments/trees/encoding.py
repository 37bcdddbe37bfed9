"""Input layouts, targets and splits for the tree path-finding lab (numpy only).

Two layouts of one problem (``experiments.trees.problems.PathProblem``):

``tokens``  the project's token layout (``experiments/trees/tokens.py``): every edge is
            ``p c [,]``, one token per position; ``aux`` is all PAD.
``paired``  one position per edge and one per output token, each carrying two
            ids, ``tok`` and ``aux``; the model embeds ``E[tok] + F[aux]``
            (``F[PAD] = 0``)::

                position  BOS  edge_1 .. edge_E  QUERY root goal TASK  y_1   y_2  ..  EOS
                tok       BOS  c_1    .. c_E     QUERY root goal TASK  y_1   y_2  ..  EOS
                aux       -    p_1    .. p_E     -     -    -    -     TASK  y_1  ..  y_n

            An edge is "child c, whose parent is p"; an output token carries
            the token before it. Why: a one-layer model sees each key position
            through its own embedding only, so with one token per position it
            cannot find "the p written just before c" (that is an induction
            circuit, two layers). Pairing puts the parent-child fact, and each
            chain-of-thought step, into one key, as the theory of Yang et al.
            (2025) assumes one column per edge.

Positions (``positions=``): ``sequential`` 0, 1, 2, ... over real tokens (the
decoder's default); ``edge_set`` every edge at the same positions (1 for a
paired edge; 1, 2[, 3] for the tokens of a ``p c ,`` edge), later tokens
continuing from there, so the edge list is a set to RoPE; ``none`` all 0
(RoPE is the identity: no positional information).

Tasks: the three of ``experiments/trees/tokens.py`` (``backward``, ``forward_cot``,
``forward``) and a second two-stage operation, ``sort_cot`` (filter the tree to
the goal-root chain, then write the chain's labels in ascending order:
``chain | sorted EOS``) and its no-chain-of-thought twin ``sort``. The two sort
task tokens get ids after the labels (``lab_vocab_size``).

Compression levels (mixed-level training, as Extra-CoT's mixed-ratio SFT): with
``level=k`` the chain keeps every k-th node and the task position carries the
control token ``<k>`` as its aux (``TASK<k>``), so one model can be asked for
any level. Level ids follow the sort task ids (``lab_vocab_size(levels=True)``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from experiments.trees import problems as T

__all__ = ["LAB_TASKS", "LAYOUTS", "POSITIONS", "MAX_LEVEL", "lab_vocab_size", "lab_task_id",
           "level_id", "target_ids", "stage_length", "lab_batch", "make_splits", "keep_fn",
           "max_seq_len"]

LAB_TASKS = ("backward", "forward_cot", "forward", "sort_cot", "sort")
LAYOUTS = ("paired", "tokens")
POSITIONS = ("edge_set", "sequential", "none")
_SORT_TASKS = ("sort_cot", "sort")
MAX_LEVEL = 8


def lab_vocab_size(vocab: T.TreeVocab, *, levels: bool = False) -> int:
    """TreeVocab ids plus the two sort task tokens (plus ``MAX_LEVEL`` level tokens)."""
    return vocab.size + len(_SORT_TASKS) + (MAX_LEVEL if levels else 0)


def level_id(vocab: T.TreeVocab, level: int) -> int:
    """Id of the control token of compression level k (keep every k-th node)."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must lie in [1, {MAX_LEVEL}], got {level}")
    return vocab.size + len(_SORT_TASKS) + level - 1


def lab_task_id(vocab: T.TreeVocab, task: str) -> int:
    if task in _SORT_TASKS:
        return vocab.size + _SORT_TASKS.index(task)
    if task not in LAB_TASKS:
        raise ValueError(f"task must be one of {LAB_TASKS}, got {task!r}")
    return vocab.task_id(task)


def keep_fn(*, keep_every: int = 1, keep_ratio: float = 1.0
            ) -> Callable[[np.ndarray], np.ndarray] | None:
    """The chain compression hook: ``keep_every_k`` (k > 1), else ``keep_ratio``
    (< 1), else None (full chain). Setting both is an error."""
    if keep_every < 1 or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"need keep_every >= 1 and keep_ratio in (0, 1], got {keep_every}, "
                         f"{keep_ratio}")
    if keep_every > 1 and keep_ratio < 1.0:
        raise ValueError("set keep_every or keep_ratio, not both")
    if keep_every > 1:
        return lambda chain: T.keep_every_k(chain, k=keep_every)
    if keep_ratio < 1.0:
        return lambda chain: T.keep_ratio(chain, ratio=keep_ratio)
    return None


def target_ids(problem: Any, *, vocab: T.TreeVocab, task: str,
               keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Target ids with EOS; ``sort_cot`` is ``chain STAGE sorted(path) EOS``."""
    if task not in _SORT_TASKS:
        return T.target_tokens(problem, vocab=vocab, task=task, keep=keep)
    answer = vocab.label_ids(T.sorted_path(problem))
    if task == "sort":
        return np.concatenate([answer, [vocab.EOS]]).astype(np.int32)
    chain = T.backward_chain(problem)
    chain = chain if keep is None else np.asarray(keep(chain))
    return np.concatenate([vocab.label_ids(chain), [vocab.STAGE], answer,
                           [vocab.EOS]]).astype(np.int32)


def stage_length(targets: np.ndarray, *, vocab: T.TreeVocab) -> np.ndarray:
    """Index of STAGE in each target row (int [B]); the row length if absent."""
    targets = np.asarray(targets)
    hit = targets == vocab.STAGE
    return np.where(hit.any(1), hit.argmax(1), targets.shape[1]).astype(np.int32)


def _prompt(problem: Any, *, vocab: T.TreeVocab, task: str, layout: str
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """(tok, aux, number of edge-list positions) of the prompt."""
    tail_tok = np.concatenate([[vocab.QUERY], vocab.label_ids([problem.root, problem.goal]),
                               [lab_task_id(vocab, task)]])
    if layout == "paired":
        edges = vocab.label_ids(problem.edges)
        tok = np.concatenate([[vocab.BOS], edges[:, 1], tail_tok])
        aux = np.concatenate([[vocab.PAD], edges[:, 0],
                              [vocab.PAD, vocab.QUERY, tail_tok[-1], vocab.PAD]])
        return tok.astype(np.int32), aux.astype(np.int32), len(edges)
    if layout != "tokens":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    edges = vocab.label_ids(problem.edges)
    if vocab.edge_separator:
        edges = np.concatenate([edges, np.full((len(edges), 1), vocab.EDGE_SEP)], 1)
    tok = np.concatenate([[vocab.BOS], edges.reshape(-1), tail_tok]).astype(np.int32)
    return tok, np.zeros_like(tok), edges.size


def _positions(n: int, *, edge_tokens: int, width: int, scheme: str) -> np.ndarray:
    """Positions of n real tokens whose edge list holds ``edge_tokens`` tokens
    after BOS, ``width`` tokens per edge (see the module docstring)."""
    t = np.arange(n)
    if scheme == "sequential":
        return t
    if scheme == "none":
        return np.zeros(n, np.int64)
    if scheme != "edge_set":
        raise ValueError(f"positions must be one of {POSITIONS}, got {scheme!r}")
    in_edges = (t >= 1) & (t <= edge_tokens)
    return np.where(t < 1, t, np.where(in_edges, 1 + (t - 1) % width, t - edge_tokens + width))


def lab_batch(problems: Sequence[Any], *, vocab: T.TreeVocab, task: str, seq_len: int,
              layout: str = "paired", positions: str = "edge_set",
              keep: Callable[[np.ndarray], np.ndarray] | None = None,
              level: int | None = None) -> dict[str, np.ndarray]:
    """Teacher-forcing batch, right-padded to ``seq_len``. ``level`` (paired layout
    only) marks the task position with that level's control token; pass the
    matching ``keep`` (``keep_fn(keep_every=level)``).

    tokens, aux, targets (tokens shifted left, PAD at the end), positions: int32
    [B, T]; attention_mask bool [B, T]; loss_mask float32 [B, T] (1 where
    ``targets`` is a target token or EOS, i.e. at positions target_start-1 ..
    target_start+target_len-2); target_start, target_len (with EOS), stage
    (index of STAGE inside the target, = target_len when absent) int32 [B].
    """
    b = len(problems)
    out = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "aux", "targets", "positions")}
    out["attention_mask"] = np.zeros((b, seq_len), bool)
    out["loss_mask"] = np.zeros((b, seq_len), np.float32)
    for k in ("target_start", "target_len", "stage"):
        out[k] = np.zeros(b, np.int32)
    width = 1 if layout == "paired" else (3 if vocab.edge_separator else 2)
    if level is not None and layout != "paired":
        raise ValueError("compression levels need layout='paired'")
    for i, problem in enumerate(problems):
        tok, aux, edge_tokens = _prompt(problem, vocab=vocab, task=task, layout=layout)
        if level is not None:
            aux[-1] = level_id(vocab, level)
        target = target_ids(problem, vocab=vocab, task=task, keep=keep)
        p, n = len(tok), len(tok) + len(target)
        if n > seq_len:
            raise ValueError(f"example {i} needs {n} positions ({p} prompt + {len(target)} "
                             f"target) > seq_len={seq_len}")
        out["tokens"][i, :n] = np.concatenate([tok, target])
        if layout == "paired":   # each output token carries the token before it
            out["aux"][i, :p] = aux
            out["aux"][i, p:n] = out["tokens"][i, p - 1:n - 1]
        out["targets"][i, :n - 1] = out["tokens"][i, 1:n]
        out["positions"][i, :n] = _positions(n, edge_tokens=edge_tokens, width=width,
                                             scheme=positions)
        out["attention_mask"][i, :n] = True
        out["loss_mask"][i, p - 1:n - 1] = 1.0
        out["target_start"][i], out["target_len"][i] = p, len(target)
        out["stage"][i] = stage_length(target[None], vocab=vocab)[0]
    return out


def max_seq_len(problems: Sequence[Any], *, vocab: T.TreeVocab, task: str, layout: str,
                keep: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Longest prompt + target over ``problems``."""
    return max(len(_prompt(p, vocab=vocab, task=task, layout=layout)[0])
               + len(target_ids(p, vocab=vocab, task=task, keep=keep)) for p in problems)


def make_splits(*, seed: int, train_size: int, test_size: int,
                train_sampler: Callable, test_samplers: dict[str, Callable]
                ) -> tuple[list, dict[str, list]]:
    """Unseen-tree splits: every test set is drawn first (unique canonical forms),
    then the training problems exclude the keys of all test sets.

    Returns (train problems, {test name: problems}). Deterministic in ``seed``.
    """
    rngs = np.random.default_rng(seed).spawn(len(test_samplers) + 1)
    tests, excluded = {}, set()
    for rng, (name, sampler) in zip(rngs[1:], sorted(test_samplers.items())):
        tests[name], keys = T.sample_problems(rng, test_size, sampler=sampler, unique=True)
        excluded |= keys
    train, _ = T.sample_problems(rngs[0], train_size, sampler=train_sampler,
                                 exclude=frozenset(excluded))
    return train, tests
