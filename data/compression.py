"""Keep-masks at a target ratio, measured ratios, level windows and re-bucketing.

Compression at ratio g keeps the ``k = num_kept(N, g)`` highest-scoring of N
chain-of-thought tokens in their original order (Extra-CoT, stage 1). Then each
compressed sample is filed under the level whose window holds its *measured*
ratio (docs/method.md, stage 2), and only questions present at every level are kept.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

LEVEL_WINDOWS: dict[int, tuple[float, float]] = {
    20: (0.10, 0.30), 40: (0.30, 0.50), 60: (0.50, 0.70), 80: (0.70, 0.90), 100: (0.90, 1.10)}
"""Level -> [low, high) window of measured ratios; the window of 100 is closed."""

_HALF_TOLERANCE = 1e-9


def _check_ratio(ratio: float) -> float:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return value


def num_kept(n: int, ratio: float) -> int:
    """``k = floor(ratio * n + 0.5)``: round half up, not Python's round-half-even.

    A tolerance of 1e-9 is added before the floor so that decimal ratios that
    binary floating point cannot hold exactly round like their decimal value
    (0.3 * 5 = 1.4999999999999998 in floats, yet 1.5 is meant: k = 2).
    """
    ratio = _check_ratio(ratio)
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return min(int(n), int(math.floor(ratio * int(n) + 0.5 + _HALF_TOLERANCE)))


def keep_mask(scores: Sequence[float] | np.ndarray, ratio: float) -> np.ndarray:
    """Bool mask of the ``num_kept(N, ratio)`` highest scores; equal scores: earlier first.

    Example: ``keep_mask([0.1, 0.9, 0.5, 0.9], 0.5)`` -> ``[F, T, F, T]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must have rank 1, got shape {s.shape}")
    return keep_mask_batch(s[None], np.asarray([s.shape[0]]), ratio)[0]


def keep_mask_batch(scores: np.ndarray, lengths: Sequence[int] | np.ndarray,
                    ratio: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Batched :func:`keep_mask` over ``scores [B, N]`` of which row b has ``lengths[b]`` tokens.

    ``ratio`` is one number or one per row. Positions ``>= lengths[b]`` are never kept.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must have rank 2 [B, N], got shape {s.shape}")
    batch, width = s.shape
    lens = np.asarray(lengths)
    if lens.shape != (batch,) or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"lengths must be ints of shape ({batch},), got {lens.dtype} {lens.shape}")
    if np.any(lens < 0) or np.any(lens > width):
        raise ValueError(f"lengths must lie in [0, {width}], got {lens.tolist()}")
    ratios = np.broadcast_to(np.asarray(ratio, dtype=object), (batch,))
    ks = np.array([num_kept(int(n), r) for n, r in zip(lens, ratios)], dtype=np.int64)
    valid = np.arange(width)[None, :] < lens[:, None]
    if np.any(np.isnan(s[valid])):
        raise ValueError("scores contain NaN at valid positions")
    key = np.where(valid, -s, np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # stable: ties keep position order
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(width)[None, :].repeat(batch, 0), axis=1)
    return valid & (ranks < ks[:, None])


PROTECT_RATIOS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _units(positions: np.ndarray, span_index: np.ndarray, is_equation: np.ndarray) -> list[list[int]]:
    """Rank units of one level in position order: an equation is one unit, other tokens one each."""
    units: list[list[int]] = []
    for t in positions.tolist():
        if is_equation[t] and units and is_equation[units[-1][-1]] \
                and span_index[units[-1][-1]] == span_index[t] and units[-1][-1] == t - 1:
            units[-1].append(t)
        else:
            units.append([t])
    return units


def annotation_order(levels: np.ndarray, span_index: np.ndarray, is_equation: np.ndarray, *,
                     sub_rank: np.ndarray | None = None,
                     protect_ratios: Sequence[float] = PROTECT_RATIOS,
                     strict_levels: bool = False) -> np.ndarray:
    """Token positions from most to least important, from span annotations.

    Units are whole equations or single non-equation tokens. Base order: level
    first (higher level earlier), then ``sub_rank`` (higher earlier; default
    0, e.g. restatements before hedges inside the filler level), then
    position, so each equation's tokens are contiguous in rank order and any
    top-k cut splits at most one equation.

    Protected cuts: for every ``r`` in ``protect_ratios`` with
    ``k = num_kept(N, r)``, when the next unit would straddle k, later units
    that fit the gap (first fit, in base order) are ranked before it so the
    cut falls between units. With ``strict_levels`` the gap may only be filled
    from the straddling unit's own level (level order is never broken, and an
    equation still straddles k when its level has too few small units left);
    otherwise lower levels may fill it, so that a few filler tokens outrank a
    deferred equation and no equation straddles k while enough single tokens
    remain below it.
    """
    levels, span_index = np.asarray(levels), np.asarray(span_index)
    is_equation = np.asarray(is_equation, dtype=bool)
    n = levels.shape[0]
    if levels.ndim != 1 or span_index.shape != (n,) or is_equation.shape != (n,):
        raise ValueError(f"levels, span_index, is_equation must be [N] arrays, got "
                         f"{levels.shape}, {span_index.shape}, {is_equation.shape}")
    sub = np.zeros(n, dtype=np.int64) if sub_rank is None else np.asarray(sub_rank)
    if sub.shape != (n,):
        raise ValueError(f"sub_rank must have shape ({n},), got {sub.shape}")
    cuts = sorted({num_kept(n, r) for r in protect_ratios})
    pending: list[list[int]] = []
    for level, rank in sorted(set(zip(levels.tolist(), sub.tolist())), reverse=True):
        pending += _units(np.flatnonzero((levels == level) & (sub == rank)), span_index, is_equation)
    order: list[int] = []
    while pending:
        count = len(order)
        cut = next((c for c in cuts if c > count), None)
        head = pending[0]
        if cut is None or count + len(head) <= cut:
            order.extend(pending.pop(0))
            continue
        gap, j = cut - count, 1
        while gap > 0 and j < len(pending):
            if strict_levels and levels[pending[j][0]] != levels[head[0]]:
                break
            if len(pending[j]) <= gap:
                gap -= len(pending[j])
                order.extend(pending.pop(j))
            else:
                j += 1
        if gap > 0:  # nothing left fills the gap: the head unit straddles the cut
            order.extend(pending.pop(0))
    return np.asarray(order, dtype=np.int64)


def importance_scores(levels: np.ndarray, span_index: np.ndarray, is_equation: np.ndarray, *,
                      sub_rank: np.ndarray | None = None,
                      protect_ratios: Sequence[float] = PROTECT_RATIOS,
                      strict_levels: bool = False) -> np.ndarray:
    """float32 scores in (0, 1], all distinct: the token ranked r-th gets ``(N - r) / N``.

    The ranking is :func:`annotation_order`, so ``keep_mask(scores, r)`` keeps
    exactly its first ``num_kept(N, r)`` tokens.
    """
    order = annotation_order(levels, span_index, is_equation, sub_rank=sub_rank,
                             protect_ratios=protect_ratios, strict_levels=strict_levels)
    n = order.shape[0]
    scores = np.empty(n, dtype=np.float32)
    scores[order] = (n - np.arange(n, dtype=np.float64)) / max(n, 1)
    return scores


SENTENCE_ENDS = (".", "?", "!")


def sentence_units(pieces: Sequence[str]) -> np.ndarray:
    """Unit id (0, 1, ...) of each token of a chain, from the tokens' text ``pieces``.

    A unit starts at a token whose text begins with a line break, and after a
    token whose text ends a sentence (:data:`SENTENCE_ENDS`, trailing spaces
    aside). So ``"\\n05-03=02"`` (an equation line with its line break),
    ``"\\nHe gives away 3 beads."`` and ``" So I subtract."`` are three units.

    Example: ``sentence_units(["He", " buys", " 3", ".", " So", " I", " add", ".", "\\n", "0", "5"])``
    -> ``[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]``.
    """
    out = np.zeros(len(pieces), dtype=np.int64)
    unit, ended = 0, False
    for t, piece in enumerate(pieces):
        if t and (ended or piece.startswith("\n")):
            unit += 1
        out[t] = unit
        ended = piece.rstrip(" ").endswith(SENTENCE_ENDS)
    return out


def unit_keep_mask(scores: Sequence[float] | np.ndarray, units: Sequence[int] | np.ndarray,
                   ratio: float, *, priority: Sequence[int] | np.ndarray | None = None
                   ) -> np.ndarray:
    """Keep whole units: at most ``num_kept(N, ratio)`` tokens, no unit cut apart.

    ``units[t]`` is token t's unit id; a unit is a run of equal ids (e.g.
    :func:`sentence_units`). Units are taken by ``priority`` (per token, a unit
    takes its largest; default 0), then by their mean score, highest first
    (ties: the earlier unit); one that no longer fits is passed over and later,
    smaller ones may still fill the room. With the equation lines at priority 1
    (the compress stage does so) no text is kept while a step equation that
    fits is dropped. The measured ratio is therefore at most
    ``ratio`` and usually a little below it; re-bucketing by measured ratio
    (:func:`rebucket`) files the result under the level it reached.

    Example: ``unit_keep_mask([.9, .9, .1, .1, .5], [0, 0, 1, 1, 2], 0.6)`` keeps
    units 0 and 2 -> ``[T, T, F, F, T]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    u = np.asarray(units)
    if s.ndim != 1 or u.shape != s.shape:
        raise ValueError(f"scores and units must be [N] arrays of one length, got "
                         f"{s.shape} and {u.shape}")
    n = s.shape[0]
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], n]
    means = np.add.reduceat(s, starts) / (ends - starts)
    if priority is None:
        first = np.zeros(len(starts))
    else:
        p = np.asarray(priority)
        if p.shape != s.shape:
            raise ValueError(f"priority must have the shape of scores {s.shape}, got {p.shape}")
        first = np.maximum.reduceat(p, starts)
    room = num_kept(n, ratio)
    for i in sorted(range(len(starts)), key=lambda i: (-first[i], -means[i], i)):
        size = int(ends[i] - starts[i])
        if size <= room:
            keep[starts[i]:ends[i]] = True
            room -= size
            if room == 0:
                break
    return keep


def compress(ids: Sequence[int], scores: Sequence[float] | np.ndarray, ratio: float) -> list[int]:
    """Kept ids in their original order: ``[ids[t] for t if keep_mask(scores, ratio)[t]]``."""
    ids = list(ids)
    mask = keep_mask(scores, ratio)
    if len(ids) != mask.shape[0]:
        raise ValueError(f"ids ({len(ids)}) and scores ({mask.shape[0]}) differ in length")
    return [i for i, keep in zip(ids, mask) if keep]


def measured_ratio(kept: int | Sequence, full: int | Sequence) -> float:
    """``len(kept) / len(full)``; each argument is a length or a sequence."""
    k = kept if isinstance(kept, (int, np.integer)) else len(kept)
    n = full if isinstance(full, (int, np.integer)) else len(full)
    if n <= 0:
        raise ValueError(f"full length must be positive, got {n}")
    if k < 0:
        raise ValueError(f"kept length must be non-negative, got {k}")
    return int(k) / int(n)


def level_for_ratio(r: float) -> int | None:
    """The level whose window holds ``r``: [0.1,0.3)->20 ... [0.9,1.1]->100; else None."""
    r = float(r)
    for level, (low, high) in LEVEL_WINDOWS.items():
        if low <= r < high or (level == 100 and r == high):
            return level
    return None


@dataclasses.dataclass(frozen=True)
class CompressedCoT:
    """One compressed chain of thought of one question."""

    question_id: str
    target_ratio: float
    think_ids: tuple[int, ...]
    full_length: int

    @property
    def measured_ratio(self) -> float:
        return measured_ratio(len(self.think_ids), self.full_length)

    @property
    def level(self) -> int | None:
        return level_for_ratio(self.measured_ratio)


def rebucket(samples: Iterable[CompressedCoT], *, one_per_level: bool = True
             ) -> dict[int, dict[str, list[CompressedCoT]]]:
    """Level -> question id -> samples whose measured ratio falls in that level's window.

    Samples outside every window are dropped. With ``one_per_level`` a question
    keeps, per level, only the sample whose measured ratio is nearest the
    level's nominal ratio (level / 100); ties go to the earlier sample.
    """
    buckets: dict[int, dict[str, list[CompressedCoT]]] = {lv: {} for lv in LEVEL_WINDOWS}
    for sample in samples:
        level = sample.level
        if level is not None:
            buckets[level].setdefault(sample.question_id, []).append(sample)
    if one_per_level:
        for level, by_question in buckets.items():
            for qid, group in by_question.items():
                best = min(group, key=lambda s: abs(s.measured_ratio - level / 100))
                by_question[qid] = [best]
    return buckets


def complete_questions(buckets: dict[int, dict[str, list[CompressedCoT]]],
                       levels: Sequence[int] = tuple(LEVEL_WINDOWS)
                       ) -> dict[int, dict[str, list[CompressedCoT]]]:
    """Keep only questions present at every one of ``levels`` (in all returned levels)."""
    unknown = [lv for lv in levels if lv not in buckets]
    if unknown:
        raise ValueError(f"levels {unknown} are not in the buckets {sorted(buckets)}")
    common = set.intersection(*(set(buckets[lv]) for lv in levels)) if levels else set()
    return {lv: {q: g for q, g in buckets[lv].items() if q in common} for lv in levels}


def compress_batch(scorer, question_ids: Sequence[Sequence[int]],
                   cot_ids: Sequence[Sequence[int]], ratios: Sequence[float], *,
                   units: Sequence[np.ndarray] | None = None,
                   priority: Sequence[np.ndarray] | None = None
                   ) -> list[dict[float, list[int]]]:
    """Compressed CoT ids of every row at every ratio, from ONE forward pass.

    ``scorer``: a ``models.compressor.Scorer`` (anything whose
    ``padded(question_ids, cot_ids)`` gives ``(scores [B, N], lengths [B])``).

    Row b at ratio g keeps ``num_kept(N_b, g)`` tokens (top keep-scores,
    ties to the earlier token) in their original order. With ``units`` (row b's unit id
    per token, e.g. :func:`sentence_units`) whole units are kept instead,
    at most that many tokens (:func:`unit_keep_mask`, with row b's
    ``priority`` when given).
    """
    scores, lengths = scorer.padded(question_ids, cot_ids)
    if units is None:
        masks = {float(g): keep_mask_batch(scores, lengths, float(g)) for g in ratios}
    else:
        if len(units) != len(cot_ids):
            raise ValueError(f"units has {len(units)} rows for {len(cot_ids)} chains")
        masks = {float(g): [unit_keep_mask(scores[b, :lengths[b]], units[b], float(g),
                                           priority=None if priority is None else priority[b])
                            for b in range(len(cot_ids))] for g in ratios}
    return [{g: [int(t) for t, k in zip(cot_ids[b], m[b]) if k] for g, m in masks.items()}
            for b in range(len(cot_ids))]
