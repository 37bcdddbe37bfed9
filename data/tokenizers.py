"""Tokenizers behind one interface: a trained SentencePiece model or a Qwen tokenizer.json.

Both backends encode every special token of ``data.formats.SPECIAL_TOKENS`` as
exactly one id, also when the special string appears inside ordinary text
(templates are written as text), and ``decode`` writes it back.

Interface (:class:`Tokenizer`): ``vocab_size``, ``encode(text)``,
``encode_with_offsets(text) -> (ids, [(start, end)])`` with character offsets
into ``text``, ``decode(ids)``, ``token_to_id``, ``id_to_token``, ``pad_id``,
``eos_id`` (``<|im_end|>``), ``special_ids``, ``save(path)`` and
``load_tokenizer(path)`` (``.json`` -> Hugging Face, anything else ->
SentencePiece).

SentencePiece (:func:`train_sentencepiece`): identity normalisation, no
whitespace collapsing, no dummy prefix, digits split, byte fallback, so
``decode(encode(text)) == text`` for any text without U+2581 (the character
SentencePiece uses for a space). The wrapper cuts text at special tokens and at
newlines before SentencePiece sees it (``"\\n"`` is a user-defined symbol, one
id each), both in training and in encoding, so a template's pieces tokenize the
same alone as inside a longer text.
"""
from __future__ import annotations

import abc
import io
import os
import re
from typing import Iterable, Sequence

from data.formats import IM_END, LEVELS, PAD, SPECIAL_TOKENS, control_token

NEWLINE = "\n"
_SP_SPLIT_TOKENS = tuple(t for t in SPECIAL_TOKENS if t != PAD)


class Tokenizer(abc.ABC):
    """Common interface; subclasses implement the five abstract members."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (added/special tokens included)."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and, per id, the ``[start, end)`` character span it covers."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are written as their strings."""

    @abc.abstractmethod
    def _lookup(self, token: str) -> int | None:
        """Id of ``token`` or None."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Vocabulary string of ``token_id``."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer so that :func:`load_tokenizer` restores it."""

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS is added)."""
        return self.encode_with_offsets(text)[0]

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary string; KeyError naming ``token`` if absent."""
        found = self._lookup(token)
        if found is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return found

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside [0, {self.vocab_size})")
        return token_id

    @property
    def pad_id(self) -> int:
        return self.token_to_id(PAD)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(IM_END)

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special token of docs/contributing.md -> its id."""
        return {t: self.token_to_id(t) for t in SPECIAL_TOKENS}

    @property
    def control_ids(self) -> dict[int, int]:
        """Compression level -> id of ``<COMP_level>``."""
        return {lv: self.token_to_id(control_token(lv)) for lv in LEVELS}


# ----------------------------------------------------------------------------- SentencePiece

def _split_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    ordered = sorted(set(tokens), key=len, reverse=True)  # longest first
    return re.compile("|".join(re.escape(t) for t in ordered))


def _segments(text: str, pattern: re.Pattern[str]) -> list[tuple[int, int, bool]]:
    """Cut ``text`` into (start, end, is_special) pieces at matches of ``pattern``."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((pos, m.start(), False))
        out.append((m.start(), m.end(), True))
        pos = m.end()
    if pos < len(text):
        out.append((pos, len(text), False))
    return out


def _byte_to_char(segment: str) -> list[int]:
    """Map each UTF-8 byte offset of ``segment`` (and its end) to a character offset."""
    table = []
    for ci, ch in enumerate(segment):
        table.extend([ci] * len(ch.encode("utf-8")))
    table.append(len(segment))
    return table


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained by :func:`train_sentencepiece` (or compatible)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._split = _split_pattern(SPECIAL_TOKENS + (NEWLINE,))
        self._special = {}
        for token in SPECIAL_TOKENS + (NEWLINE,):
            tid = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(tid) != token:
                raise ValueError(f"SentencePiece model lacks the special token {token!r}")
            self._special[token] = tid
        self._special_by_id = {v: k for k, v in self._special.items()}

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def model_proto(self) -> bytes:
        """The serialized model (identical bytes for identical training)."""
        return self._proto

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, special in _segments(text, self._split):
            if special:
                ids.append(self._special[text[start:end]])
                offsets.append((start, end))
                continue
            segment = text[start:end]
            table = _byte_to_char(segment)
            pieces = self._sp.encode(segment, out_type="proto").pieces
            spans = [(table[p.begin], table[p.end]) for p in pieces]
            # Byte-fallback pieces before the last byte of a character are empty:
            # give them the span of the character they belong to.
            for k in range(len(spans) - 2, -1, -1):
                if spans[k][0] == spans[k][1]:
                    spans[k] = spans[k + 1]
            ids.extend(int(p.id) for p in pieces)
            offsets.extend((start + s, start + e) for s, e in spans)
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for start, end, special in _segments(text, self._split):
            if special:
                ids.append(self._special[text[start:end]])
            else:
                ids.extend(self._sp.encode(text[start:end]))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        parts, run = [], []
        for token_id in ids:
            token_id = self._check_id(token_id)
            if token_id in self._special_by_id:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._special_by_id[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def _lookup(self, token: str) -> int | None:
        tid = self._sp.piece_to_id(token)
        return int(tid) if self._sp.id_to_piece(tid) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_id(token_id))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self._proto)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            return cls(f.read())


def sentencepiece_training_lines(texts: Iterable[str]) -> list[str]:
    """The lines SentencePiece trains on: texts cut at special tokens and newlines.

    This is the segmentation :meth:`SentencePieceTokenizer.encode` applies, so
    no learned piece spans a special token or a line break.
    """
    pattern = _split_pattern(SPECIAL_TOKENS + (NEWLINE,))
    lines = []
    for text in texts:
        lines.extend(text[s:e] for s, e, special in _segments(text, pattern) if not special)
    return lines


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int = 768,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train a small SentencePiece model on ``texts``; deterministic for a given corpus.

    Layout: id 0 = ``<|endoftext|>`` (pad piece), 1 = ``<unk>``, then the
    special tokens and ``"\\n"`` as user-defined symbols, then 256 byte pieces.
    ``vocab_size`` is an upper bound (a small corpus may yield fewer pieces).
    """
    import sentencepiece as spm

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be an int in [300, 65536], got {vocab_size!r}")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    lines = [line for line in sentencepiece_training_lines(texts) if line]
    if not lines:
        raise ValueError("the training corpus is empty")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, user_defined_symbols=list(_SP_SPLIT_TOKENS) + [NEWLINE],
        pad_id=0, pad_piece=PAD, unk_id=1, bos_id=-1, eos_id=-1,
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentence_length=1 << 16, minloglevel=2)
    return SentencePieceTokenizer(buffer.getvalue())


# ----------------------------------------------------------------------------- Hugging Face

class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (e.g. Qwen's tokenizer.json) with the project's specials.

    Special tokens of ``data.formats`` that the file lacks (the control tokens,
    ``[SEP]``, ...) are added as special added tokens, so each is one id.
    Padding and truncation settings of the file are switched off.
    """

    def __init__(self, tokenizer):
        from tokenizers import AddedToken

        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing])
        for token in SPECIAL_TOKENS:
            if self._tok.encode(token, add_special_tokens=False).ids != [self._tok.token_to_id(token)]:
                raise ValueError(f"special token {token!r} does not encode to a single id")

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([self._check_id(i) for i in ids], skip_special_tokens=False)

    def _lookup(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(self._check_id(token_id))

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Raw

        return cls(_Raw.from_file(os.fspath(path)))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer by what the file holds, whatever it is called: a JSON text
    (``{`` first) is a Hugging Face ``tokenizer.json`` (:class:`HFTokenizer`), anything
    else a SentencePiece model. A file that neither reads raises ValueError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path!r}")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    kind = "tokenizer.json" if head.startswith(b"{") else "SentencePiece model"
    try:
        if kind == "tokenizer.json":
            return HFTokenizer.load(path)
        return SentencePieceTokenizer.load(path)
    except Exception as err:   # sentencepiece raises RuntimeError, tokenizers its own
        raise ValueError(f"{path!r} is not a valid {kind} ({type(err).__name__}: "
                         f"{str(err)[:200]}); truncated or of another format?") from None


__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "train_sentencepiece",
           "sentencepiece_training_lines", "load_tokenizer", "NEWLINE"]
