"""Chat template, control tokens and <think> spans (docs/contributing.md).

This module owns the special-token strings. The chat layout (Qwen style) is one
string; the line break after ``assistant\\n`` below is the ``\\n`` itself::

    <|im_start|>user\\n{question}{ctrl}<|im_end|>\\n<|im_start|>assistant\\n
    {ctrl}<think>\\n{cot}\\n</think>\\n\\n{answer}<|im_end|>

``{ctrl}`` is empty (base mode), ``<COMP_xx>`` (level mode: the same token ends
the user turn and starts the response) or, in the prompt only,
``<COMP_POLICY>`` (policy mode: the model chooses the level it emits).

Responses are built from token ids, not text, because a compressed chain of
thought is a subsequence of the full chain's ids and need not re-tokenize to
itself. The think span of a built response is
``<think> NL cot_ids NL </think>`` where ``NL = tokenizer.encode("\\n")``;
its think length, by contract, counts every token strictly between the tags,
so it is ``len(cot_ids) + 2 * len(NL)``.

A tokenizer here is anything with the interface of ``data.tokenizers``:
``encode``, ``decode``, ``token_to_id`` and ``vocab_size``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SEP = "[SEP]"
LEVELS = (20, 40, 60, 80, 100)
COMP_POLICY = "<COMP_POLICY>"
CONTROL_TOKENS = tuple(f"<COMP_{level}>" for level in LEVELS) + (COMP_POLICY,)
SPECIAL_TOKENS = (PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE) + CONTROL_TOKENS + (SEP,)
POLICY = "policy"

Control = int | str | None  # a level in LEVELS, POLICY, or None (base mode)


def control_token(level: int) -> str:
    """The control token string for a compression level, e.g. 20 -> '<COMP_20>'."""
    if isinstance(level, bool) or level not in LEVELS:
        raise ValueError(f"unknown compression level {level!r}; expected one of {LEVELS}")
    return f"<COMP_{level}>"


def level_of_token(token: str) -> int | None:
    """Inverse of :func:`control_token`; None for any other string (incl. <COMP_POLICY>)."""
    for level in LEVELS:
        if token == f"<COMP_{level}>":
            return level
    return None


def _control_text(control: Control, *, allow_policy: bool) -> str:
    if control is None:
        return ""
    if control == POLICY and isinstance(control, str):
        if not allow_policy:
            raise ValueError("control 'policy' is only valid in a prompt; a response carries a level")
        return COMP_POLICY
    if isinstance(control, str) or isinstance(control, bool):
        raise ValueError(f"unknown control {control!r}; expected None, {POLICY!r} or a level in {LEVELS}")
    return control_token(int(control))


def prompt_text(question: str, *, control: Control = None) -> str:
    """The user turn and the assistant header: everything before the response."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    ctrl = _control_text(control, allow_policy=True)
    return f"{IM_START}user\n{question}{ctrl}{IM_END}\n{IM_START}assistant\n"


def response_text(cot: str, answer: str, *, level: int | None = None) -> str:
    """The assistant response as text: ``{ctrl}<think>\\n{cot}\\n</think>\\n\\n{answer}<|im_end|>``."""
    ctrl = _control_text(level, allow_policy=False)
    return f"{ctrl}{THINK_OPEN}\n{cot}\n{THINK_CLOSE}\n\n{answer}{IM_END}"


def build_prompt(tokenizer: Any, question: str, *, control: Control = None) -> list[int]:
    """Prompt ids in base (control=None), level (control=20..100) or policy ('policy') mode."""
    return list(tokenizer.encode(prompt_text(question, control=control)))


def build_response(tokenizer: Any, cot_ids: Sequence[int], answer: str, *,
                   level: int | None = None) -> list[int]:
    """Response ids ``[ctrl] <think> NL cot_ids NL </think> enc('\\n\\n'+answer) <|im_end|>``.

    ``cot_ids`` are used verbatim (a compressed chain is a subsequence of ids).
    """
    cot = [int(i) for i in cot_ids]
    vocab = int(tokenizer.vocab_size)
    bad = [i for i in cot if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"cot_ids contain ids outside [0, {vocab}): {bad[:5]}")
    ids = [tokenizer.token_to_id(control_token(level))] if level is not None else []
    newline = list(tokenizer.encode("\n"))
    ids += [tokenizer.token_to_id(THINK_OPEN), *newline, *cot, *newline,
            tokenizer.token_to_id(THINK_CLOSE)]
    ids += list(tokenizer.encode("\n\n" + answer))
    ids.append(tokenizer.token_to_id(IM_END))
    return ids


class SFTExample(NamedTuple):
    """One training sequence; ``loss_mask`` is True exactly on response tokens
    (float32 per-token loss weights after :func:`weight_equations`)."""

    ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T], or float32 [T] weights


EQUATION_TEXT = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
"""An equation as the chains of thought write it: ``36+09=45`` (groups x, op, a, y)."""


def equation_token_mask(tokenizer: Any, ids: Sequence[int], *,
                        pieces: Sequence[str] | None = None) -> np.ndarray:
    """bool [len(ids)]: the tokens whose text lies inside an equation ``a op b = c``.

    Each id is decoded on its own (``pieces``: the decoded text of every id,
    ``tokenizer.decode([i])`` by default, to reuse across many calls) and the
    equations are found in the concatenated text, so any CoT, reference or
    generated, can be marked without its annotation.
    """
    ids = [int(i) for i in ids]
    texts = [pieces[i] if pieces is not None else tokenizer.decode([i]) for i in ids]
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - np.array([len(t) for t in texts], dtype=ends.dtype) if ids else ends
    mask = np.zeros(len(ids), dtype=bool)
    for m in EQUATION_TEXT.finditer("".join(texts)):
        mask |= (starts < m.end()) & (ends > m.start())
    return mask


def weight_equations(example: SFTExample, mask: np.ndarray, weight: float) -> SFTExample:
    """``example`` whose loss weighs the masked response tokens ``weight`` times the rest.

    The loss stays a weighted mean (``models.training.masked_lm_loss`` divides by the
    sum of the weights), so ``weight=1`` is plain SFT. Up-weighting the equations
    spends more of each step's gradient on the tokens that carry the arithmetic, as
    token-selective training does (Lin et al. 2024, "Rho-1", arXiv 2404.07965).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != example.ids.shape:
        raise ValueError(f"mask of shape {mask.shape} for an example of shape {example.ids.shape}")
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"equation weight must be a finite number > 0, got {weight!r}")
    w = example.loss_mask.astype(np.float32)
    w[mask & example.loss_mask.astype(bool)] *= np.float32(weight)
    return SFTExample(example.ids, w)


def weight_level_token(example: SFTExample, weight: float) -> SFTExample:
    """``example`` whose first response token (a policy example's chosen ``<COMP_xx>``)
    weighs ``weight`` times each other response token in the loss (a weighted mean, as
    in :func:`weight_equations`)."""
    loss = np.asarray(example.loss_mask)
    if not loss.any():
        raise ValueError("weight_level_token: the example has no response token")
    mask = np.zeros(loss.shape, dtype=bool)
    mask[int(np.argmax(loss > 0))] = True
    return weight_equations(example, mask, weight)


def _example(prompt: list[int], response: list[int]) -> SFTExample:
    ids = np.asarray(prompt + response, dtype=np.int32)
    mask = np.zeros(ids.shape, dtype=bool)
    mask[len(prompt):] = True
    return SFTExample(ids, mask)


def build_sft_example(tokenizer: Any, question: str, cot_ids: Sequence[int], answer: str, *,
                      control: int | None = None) -> SFTExample:
    """Prompt + response in base (control=None) or level mode (control=level in both turns).

    The loss covers the response only: from the first token after the
    ``<|im_start|>assistant\\n`` header through the final ``<|im_end|>``.
    """
    if control is not None and (isinstance(control, (str, bool)) or control not in LEVELS):
        raise ValueError(f"control must be None or a level in {LEVELS}, got {control!r}")
    prompt = build_prompt(tokenizer, question, control=control)
    return _example(prompt, build_response(tokenizer, cot_ids, answer, level=control))


def build_policy_example(tokenizer: Any, question: str, cot_ids: Sequence[int], answer: str, *,
                         target_level: int) -> SFTExample:
    """Policy warm start: a <COMP_POLICY> prompt, a response opening with <COMP_{target_level}>."""
    prompt = build_prompt(tokenizer, question, control=POLICY)
    return _example(prompt, build_response(tokenizer, cot_ids, answer, level=target_level))


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """What a generated response contains.

    level: level of the first ``<COMP_xx>`` before ``<think>`` (anywhere if no
        ``<think>``); None if there is none.
    control_first: the response's first token is a level control token.
    think_ids: ids strictly between ``<think>`` and ``</think>`` (to the end of
        the response when the span is not closed; empty without ``<think>``).
    think_length: ``len(think_ids)``, the contract's think length in tokens.
    cot_ids: ``think_ids`` less the template's leading and trailing newline ids.
    think_closed: a ``</think>`` follows the first ``<think>``.
    answer: last balanced ``\\boxed{...}`` in the text after ``</think>``.
    ended: the response contains ``<|im_end|>`` (it is cut there).
    valid: (control_first, if a control token is expected) and think_closed
        and answer is not None.
    """

    level: int | None
    control_first: bool
    think_ids: tuple[int, ...]
    think_length: int
    cot_ids: tuple[int, ...]
    think_closed: bool
    answer: str | None
    ended: bool
    valid: bool


def _default_extract(text: str) -> str | None:
    from data.answers import extract_boxed  # lazy: written by another module owner
    return extract_boxed(text)


def _strip(seq: list[int], affix: list[int]) -> list[int]:
    k = len(affix)
    if k and len(seq) >= k and seq[:k] == affix:
        seq = seq[k:]
    if k and len(seq) >= k and seq[-k:] == affix:
        seq = seq[:-k]
    return seq


def parse_response(tokenizer: Any, ids: Sequence[int], *, expect_control: bool = True,
                   extract_answer: Callable[[str], str | None] | None = None) -> ParsedResponse:
    """Parse generated response ids (possibly truncated or garbage); never raises.

    The response is cut at the first ``<|im_end|>``. Ids outside
    ``[0, vocab_size)`` are dropped before parsing. ``extract_answer`` defaults
    to ``data.answers.extract_boxed``.
    """
    extract = extract_answer or _default_extract
    vocab = int(tokenizer.vocab_size)
    seq = []
    for i in ids:
        try:
            i = int(i)
        except (TypeError, ValueError, OverflowError):
            continue
        if 0 <= i < vocab:
            seq.append(i)
    im_end = tokenizer.token_to_id(IM_END)
    ended = im_end in seq
    if ended:
        seq = seq[:seq.index(im_end)]
    t_open, t_close = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
    level_ids = {tokenizer.token_to_id(control_token(lv)): lv for lv in LEVELS}
    open_at = seq.index(t_open) if t_open in seq else None
    head = seq if open_at is None else seq[:open_at]
    level = next((level_ids[i] for i in head if i in level_ids), None)
    control_first = bool(seq) and seq[0] in level_ids
    think: list[int] = []
    closed, tail = False, []
    if open_at is not None:
        rest = seq[open_at + 1:]
        closed = t_close in rest
        think = rest[:rest.index(t_close)] if closed else rest
        tail = rest[rest.index(t_close) + 1:] if closed else []
    answer = None
    if closed:
        try:
            answer = extract(tokenizer.decode(tail))
        except Exception:  # noqa: BLE001 - a parser of model output must not raise
            answer = None
    cot = _strip(list(think), list(tokenizer.encode("\n")))
    valid = (control_first or not expect_control) and closed and answer is not None
    return ParsedResponse(level=level, control_first=control_first, think_ids=tuple(think),
                          think_length=len(think), cot_ids=tuple(cot), think_closed=closed,
                          answer=answer, ended=ended, valid=valid)
