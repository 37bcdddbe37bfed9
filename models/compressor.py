"""The compress API, model side: keep-scores for batches of (question ids, CoT ids).

Two scorers share one interface, so the pipeline can swap the formula-aware
compressor for the generic baseline:

- ``keep_scorer(classifier, sep_id=...)``: the formula-aware compressor
  (Extra-CoT stage 1): the keep logit of ``models.encoder.TokenClassifier`` on
  ``question [SEP] cot``.
- ``surprisal_scorer(lm, sep_id=...)``: the generic baseline (LLMLingua's
  token-level / Selective-Context importance): a token's surprisal under a
  causal LM, ``s_t = -log p(c_t | prefix, c_<t)``, with prefix ``question [SEP]``
  (``sep_id=None``: the prefix is the question ids as given, e.g. a chat prompt
  ending in ``<think>\\n`` for the base model itself).

Usage::

    scorer = keep_scorer(model, sep_id=tokenizer.token_to_id("[SEP]"))
    scorer = load_scorer(run_dir)              # or the model a compressor run exported
    scores = scorer(question_rows, cot_rows)   # list of float32 [N_b], one forward pass
    # then any ratio: data.compression.keep_mask(scores[b], ratio)

Rows are Python/numpy int sequences of any lengths. Each row is packed as one
contiguous sequence ``question [suffix] cot`` (right padding), rows are sorted
by length and scored in chunks of ``batch_size``; widths round up to a multiple
of ``bucket`` and short chunks are filled with dummy rows, so a run compiles
only a few shapes. A row's scores do not depend on the other rows of its chunk.
For arrays already padded inside a jitted function, use the pure
``models.encoder.cot_keep_logits`` or ``models.sampling.completion_logprobs``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import model_dir
from models.encoder import TokenClassifier
from models.qwen3 import Qwen3, Qwen3Config
from models.training import next_token_logprobs

__all__ = ["Scorer", "keep_scorer", "surprisal_scorer", "pad_rows", "COMPRESSOR_FILE",
           "save_compressor", "load_compressor_model", "make_scorer", "load_scorer"]

COMPRESSOR_FILE = "compressor.json"
"""The description beside an exported compressor's parameters (models.model_dir)."""


def pad_rows(rows: Sequence[Sequence[int]], *, width: int, pad_id: int = 0,
             left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, width], mask bool [B, width]), each row flush left (right
    padding), or flush right with ``left=True`` (the prompt layout of
    ``models.sampling.generate``)."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        n = len(row)
        if n > width:
            raise ValueError(f"row {b} has {n} tokens, more than width={width}")
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols] = np.asarray(row, np.int32).reshape(n)
        mask[b, cols] = True
    return ids, mask


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _keep_logits(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state).keep_logits(tokens, attention_mask=mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _surprisal(graphdef, state, tokens, mask):
    """Slot t: -log p(tokens[t] | tokens[:t]) of a right-padded row; slot 0: +inf."""
    logits = nnx.merge(graphdef, state)(tokens, attention_mask=mask)
    nll = -next_token_logprobs(logits, tokens)
    return jnp.concatenate([jnp.full((tokens.shape[0], 1), jnp.inf), nll], axis=1)


class Scorer:
    """Batched, bucketed scoring of CoT tokens; see the module docstring.

    ``forward(graphdef, state, tokens, mask) -> [B, T]`` is a jitted function that
    scores every slot of right-padded rows ``question + suffix + cot``.
    """

    def __init__(self, model: nnx.Module, forward: Callable, *, kind: str,
                 suffix: Sequence[int] = (), batch_size: int = 32, bucket: int = 128):
        for name, value in (("batch_size", batch_size), ("bucket", bucket)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.graphdef, self.state = nnx.split(model)
        self.forward, self.kind = forward, kind
        self.suffix = [int(i) for i in suffix]
        self.batch_size, self.bucket = batch_size, bucket

    def padded(self, question_ids: Sequence[Sequence[int]], cot_ids: Sequence[Sequence[int]]
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [B, N_max], -inf beyond each row's length; lengths int64 [B])."""
        if len(question_ids) != len(cot_ids):
            raise ValueError(f"{len(question_ids)} question rows but {len(cot_ids)} CoT rows")
        prefixes = [[int(i) for i in q] + self.suffix for q in question_ids]
        cots = [[int(i) for i in c] for c in cot_ids]
        empty = [b for b, q in enumerate(prefixes) if not q]
        if empty and self.kind == "surprisal":
            raise ValueError(f"question rows {empty[:5]} are empty; the LM needs a prefix")
        lengths = np.array([len(c) for c in cots], np.int64)
        out = np.full((len(cots), int(lengths.max(initial=0))), -np.inf, np.float32)
        rows = [p + c for p, c in zip(prefixes, cots)]
        order = sorted(range(len(rows)), key=lambda b: len(rows[b]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = [rows[b] for b in chunk] + [[0]] * (self.batch_size - len(chunk))
            ids, mask = pad_rows(batch, width=_round_up(max(map(len, batch)), self.bucket))
            scores = np.asarray(self.forward(self.graphdef, self.state, ids, mask))
            for row, b in enumerate(chunk):
                at = len(prefixes[b])
                out[b, :lengths[b]] = scores[row, at:at + lengths[b]]
        return out, lengths

    def __call__(self, question_ids: Sequence[Sequence[int]],
                 cot_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One float32 array of scores per row (length = that row's CoT length)."""
        scores, lengths = self.padded(question_ids, cot_ids)
        return [scores[b, :n].copy() for b, n in enumerate(lengths)]


def keep_scorer(model: TokenClassifier, *, sep_id: int, batch_size: int = 32,
                bucket: int = 128) -> Scorer:
    """Formula-aware scores: the classifier's keep logits on ``question [SEP] cot``."""
    if not isinstance(model, TokenClassifier):
        raise TypeError(f"keep_scorer needs a TokenClassifier, got {type(model).__name__}")
    return Scorer(model, _keep_logits, kind="keep", suffix=(int(sep_id),),
                  batch_size=batch_size, bucket=bucket)


def surprisal_scorer(lm: Qwen3, *, sep_id: int | None, batch_size: int = 32,
                     bucket: int = 128) -> Scorer:
    """Generic scores: ``-log p(c_t | question [SEP], c_<t)`` under the causal LM ``lm``
    (``sep_id=None``: no separator; the question rows are the whole prefix)."""
    if not isinstance(lm, Qwen3):
        raise TypeError(f"surprisal_scorer needs a Qwen3 LM, got {type(lm).__name__}")
    return Scorer(lm, _surprisal, kind="surprisal", suffix=() if sep_id is None else (sep_id,),
                  batch_size=batch_size, bucket=bucket)


# ----------------------------------------------------------------------------- export / load

def save_compressor(model: nnx.Module, directory: str, description: dict, *,
                    step: int = 0) -> None:
    """Write a trained compressor to ``<directory>/model`` and ``description`` to
    ``compressor.json`` (``models.model_dir.save_model``). ``description`` holds
    ``kind`` ('formula' | 'surprisal'), ``architecture`` (the Qwen3Config fields),
    ``sep_id`` and, for a classifier, ``num_grades`` and ``keep_grade``."""
    model_dir.save_model(model, directory, description=description,
                         description_file=COMPRESSOR_FILE, step=step)


def _make_compressor(description: dict) -> nnx.Module:
    arch = Qwen3Config(**description["architecture"])
    if description["kind"] == "surprisal":
        return Qwen3(arch, rngs=nnx.Rngs(0))
    return TokenClassifier(arch, num_grades=description["num_grades"],
                           keep_grade=description["keep_grade"], rngs=nnx.Rngs(0))


def load_compressor_model(directory: str) -> tuple[nnx.Module, dict]:
    """The compressor exported by :func:`save_compressor` and its description."""
    return model_dir.load_model(directory, _make_compressor, description_file=COMPRESSOR_FILE)


def make_scorer(model: nnx.Module, *, sep_id: int, batch_size: int = 32) -> Scorer:
    """Keep-logit scorer for a TokenClassifier, surprisal scorer for a causal Qwen3 LM."""
    if isinstance(model, TokenClassifier):
        return keep_scorer(model, sep_id=sep_id, batch_size=batch_size)
    return surprisal_scorer(model, sep_id=sep_id, batch_size=batch_size)


def load_scorer(directory: str, *, batch_size: int = 32) -> tuple[Scorer, dict]:
    """(scorer, description) of the compressor exported to ``directory``:
    ``scorer(question_rows, cot_rows)`` -> scores."""
    model, description = load_compressor_model(directory)
    return make_scorer(model, sep_id=description["sep_id"], batch_size=batch_size), description
