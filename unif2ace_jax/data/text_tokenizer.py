"""Text tokenizers: a small protocol, SentencePiece behind it, and a registry by name.

The text tokenizer maps text to *text ids only*, in `[0, vocab_size)`. It adds no BOS/EOS/PAD:
the model's special tokens (`<t2i> <mmu> <soi> <eoi> <bos> <eos> <pad> [MASK]`) are appended
after the text vocabulary by the sequence builder (DESIGN §2), so a tokenizer must never emit an
id >= `vocab_size`. Id 0 is `<unk>` for SentencePiece models trained here.

A GPT-2 / Phi BPE tokenizer (for converted Show-o weights) can be added later by implementing
`TextTokenizer` and registering it in `TEXT_TOKENIZERS`.

Example::

    train_sentencepiece(captions, vocab_size=512, out_path="text.model")
    tok = TEXT_TOKENIZERS.get("sentencepiece")("text.model")
    ids = tok.encode("a woman with red hair")     # list[int], each in [0, tok.vocab_size)
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from typing import Iterable, Iterator, Protocol, runtime_checkable

import sentencepiece as spm

from unif2ace_jax.errors import UserError
from unif2ace_jax.registry import Registry

TEXT_TOKENIZERS: Registry = Registry("text tokenizer")

MODEL_TYPES = ("unigram", "bpe")


@runtime_checkable
class TextTokenizer(Protocol):
    """What the input pipeline and samplers need from a text tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of text ids; every id returned by `encode` is < vocab_size."""
        ...

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: list[int]) -> str:
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ...


@TEXT_TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer:
    """A SentencePiece model file behind the `TextTokenizer` protocol.

    Args:
      model_path: a `.model` file written by `train_sentencepiece` (or any SentencePiece model).
        Its BOS/EOS are never emitted: encoding uses the plain piece ids.
    """

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise UserError(
                f"SentencePiece model file not found: {model_path} "
                "(train one with `python -m unif2ace_jax.data train_tokenizer`)"
            )
        proto = open(model_path, "rb").read()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise UserError(f"not a SentencePiece model: {model_path} ({e})") from None
        self.model_path = model_path
        self._proto = proto

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # SentencePieceProcessor is a SWIG object; pickle the model bytes instead (grain workers).
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._proto = state["proto"]
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._proto)


def make_text_tokenizer(name: str, model_path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer registered as `name`, loaded from `model_path`."""
    return TEXT_TOKENIZERS.get(name)(model_path)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    split_digits: bool = True,
    byte_fallback: bool = False,
    seed: int = 0,
    max_sentence_length: int = 16384,
) -> str:
    """Trains a SentencePiece model on an in-memory stream of texts; writes `out_path` atomically.

    The model has `<unk>` = 0 and no BOS/EOS/PAD pieces (see module docstring). Training is
    deterministic for the same texts in the same order (one thread, no input sampling, fixed
    seed). `vocab_size` is a hard limit: a corpus too small for it gives a UserError naming the
    largest size it supports.

    Returns:
      out_path as a string.
    """
    out_dir = _check_training_args(model_type, vocab_size, out_path)
    counter = {"n": 0}

    def sentences() -> Iterator[str]:
        for t in texts:
            t = t.strip()
            if t:
                counter["n"] += 1
                yield t

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            split_digits=split_digits,
            byte_fallback=byte_fallback,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), counter["n"]) from None
    out_path = os.fspath(out_path)
    _write_atomically(out_path, out_dir, model.getvalue())
    return out_path


def _check_training_args(model_type: str, vocab_size: int, out_path: str | os.PathLike) -> str:
    """UserError for a bad model type, vocabulary size or output directory; returns the latter."""
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"unknown SentencePiece model type {model_type!r}; known: {', '.join(MODEL_TYPES)}"
        )
    if vocab_size < 2:
        raise UserError(f"vocab_size must be >= 2, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(os.fspath(out_path)))
    if not os.path.isdir(out_dir):
        raise UserError(f"output directory does not exist: {out_dir}")
    return out_dir


def _training_error(msg: str, num_texts: int) -> UserError:
    """The UserError for SentencePiece's training error `msg` on `num_texts` texts."""
    if num_texts == 0:
        return UserError("no text to train the SentencePiece model on (empty corpus)")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return UserError(
            f"vocab_size {m.group(1)} is too large for this corpus "
            f"({num_texts} texts); use at most {m.group(2)}"
        )
    return UserError(f"SentencePiece training failed: {' '.join(msg.split())[:300]}")


def _write_atomically(out_path: str, out_dir: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".model", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
