"""Text tokenizers: a small protocol, SentencePiece behind it, and a registry by name.

The text tokenizer maps text to *text ids only*, in `[0, vocab_size)`. It adds no BOS/EOS/PAD:
the model's special tokens (`<t2i> <mmu> <soi> <eoi> <bos> <eos> <pad> [MASK]`) are appended
after the text vocabulary by the sequence builder (docs/DESIGN.md §2), so a tokenizer must never emit an
id >= `vocab_size`. Id 0 is `<unk>` for SentencePiece models trained here.

`gpt2_bpe` is GPT-2 byte-level BPE read from a local tokenizer directory (Phi-1.5's, for converted
Show-o weights). Show-o appends its own tokens after the text vocabulary (`SHOWO_ADDED_TOKENS`,
ids from `showo_added_token_ids`); the tokenizer never emits them.

Examples::

    train_sentencepiece(captions, vocab_size=512, out_path="text.model")
    tok = TEXT_TOKENIZERS.get("sentencepiece")("text.model")
    ids = tok.encode("a woman with red hair")     # list[int], each in [0, tok.vocab_size)

    tok = TEXT_TOKENIZERS.get("gpt2_bpe")("phi-1_5/")   # tokenizer.json, or vocab.json + merges.txt
    tok.vocab_size, tok.eos_id                     # 50295, 50256 for Phi-1.5
    tok.added_token_id("<|t2i|>")                  # 50300
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Iterator, Protocol, runtime_checkable

import sentencepiece as spm
import tokenizers

from unif2ace_jax.errors import UserError
from unif2ace_jax.registry import Registry
from unif2ace_jax.utils.files import read_json, read_json_object, write_atomically

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


# Show-o's tokens, appended in this order right after the text vocabulary (its UniversalPrompting
# adds `[PAD]` first, then the nine task/segment tokens): with Phi-1.5, [PAD] = 50295 .. <|lvg|> =
# 50304, and image code c is 50305 + c.
SHOWO_ADDED_TOKENS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>",
                      "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
ENDOFTEXT = "<|endoftext|>"


def showo_added_token_ids(text_vocab_size: int) -> dict[str, int]:
    """Show-o's added tokens → ids, for a text vocabulary of `text_vocab_size` ids."""
    return {name: text_vocab_size + i for i, name in enumerate(SHOWO_ADDED_TOKENS)}


def _one_line(e: BaseException, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit]


def _token_content(value) -> str | None:
    """A special_tokens_map.json entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bpe_from_tokenizer_json(path: str):
    """A `tokenizers.Tokenizer` from tokenizer.json, with Show-o's added tokens left out.

    Returns (tokenizer, {stripped token: its id in the file}).
    """
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"not a tokenizers file (no 'model'): {path}")
    if model.get("type", "BPE") != "BPE":
        raise UserError(f"{path}: model type {model.get('type')!r} is not BPE")
    added = data.get("added_tokens") or []
    stripped = {t["content"]: t["id"] for t in added
                if isinstance(t, dict) and t.get("content") in SHOWO_ADDED_TOKENS}
    data["added_tokens"] = [t for t in added
                            if not (isinstance(t, dict) and t.get("content") in stripped)]
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(data)), stripped
    except Exception as e:  # tokenizers raises a bare Exception
        raise UserError(f"not a tokenizers file: {path} ({_one_line(e)})") from None


def _bpe_from_vocab_merges(tokenizer_dir: str, specials: set[str]):
    """GPT-2's slow layout: vocab.json + merges.txt (+ added_tokens.json), byte-level BPE.

    Returns (tokenizer, {stripped Show-o token: its id in added_tokens.json}).
    """
    vocab_path = os.path.join(tokenizer_dir, "vocab.json")
    merges_path = os.path.join(tokenizer_dir, "merges.txt")
    vocab = read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise UserError(f"{vocab_path}: expected a JSON object token → integer id")
    try:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab_path, merges_path))
    except Exception as e:  # tokenizers raises a bare Exception
        raise UserError(f"cannot read BPE merges {merges_path} ({_one_line(e)})") from None
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in sorted(specials | {ENDOFTEXT}) if t in vocab])

    added_path = os.path.join(tokenizer_dir, "added_tokens.json")
    added = read_json(added_path) if os.path.isfile(added_path) else {}
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise UserError(f"{added_path}: expected a JSON object token → integer id")
    stripped = {}
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        if content in SHOWO_ADDED_TOKENS:
            stripped[content] = want
            continue
        if content not in vocab:
            tok.add_tokens([tokenizers.AddedToken(content, special=content in specials)])
        if tok.token_to_id(content) != want:
            raise UserError(f"{added_path}: token {content!r} has id {want}, but "
                            f"{tok.token_to_id(content)} when added after the vocabulary")
    return tok, stripped


@TEXT_TOKENIZERS.register("gpt2_bpe")
class GPT2BPETokenizer:
    """GPT-2 byte-level BPE (Phi-1.5's tokenizer) from a local directory, as a `TextTokenizer`.

    The directory holds `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt` (with
    `added_tokens.json` for tokens added after the BPE vocabulary, as Phi-1.5's 50257..50294).
    `special_tokens_map.json`, if present, names BOS/EOS (default `<|endoftext|>`). Show-o's own
    tokens (`SHOWO_ADDED_TOKENS`), if the files carry them, are left out, so `encode` emits only
    text ids, each < `vocab_size`, and adds no BOS/EOS; ids for Show-o's tokens come from
    `added_token_id`.

    Args:
      tokenizer_dir: the directory (e.g. a copy of microsoft/phi-1_5's tokenizer files).
    """

    def __init__(self, tokenizer_dir: str | os.PathLike):
        tokenizer_dir = os.fspath(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise UserError(f"BPE tokenizer directory not found: {tokenizer_dir}")
        self.model_path = tokenizer_dir
        self._tok = self._load(tokenizer_dir)

    def _load(self, tokenizer_dir: str):
        names_path = os.path.join(tokenizer_dir, "special_tokens_map.json")
        names = read_json_object(names_path) if os.path.isfile(names_path) else {}
        bos = _token_content(names.get("bos_token")) or ENDOFTEXT
        eos = _token_content(names.get("eos_token")) or ENDOFTEXT
        json_path = os.path.join(tokenizer_dir, "tokenizer.json")
        if os.path.isfile(json_path):
            tok, stripped = _bpe_from_tokenizer_json(json_path)
        elif all(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in ("vocab.json", "merges.txt")):
            tok, stripped = _bpe_from_vocab_merges(tokenizer_dir, {bos, eos})
        else:
            raise UserError(f"no tokenizer.json, nor vocab.json + merges.txt, in {tokenizer_dir}")

        ids = tok.get_vocab(with_added_tokens=True).values()
        self._vocab_size = max(ids, default=-1) + 1
        if self._vocab_size != len(ids):
            raise UserError(f"{tokenizer_dir}: token ids are not contiguous from 0 "
                            f"({len(ids)} tokens, largest id {self._vocab_size - 1})")
        expected = showo_added_token_ids(self._vocab_size)
        for name, i in stripped.items():
            if i != expected[name]:
                raise UserError(f"{tokenizer_dir}: Show-o token {name} has id {i}; "
                                f"expected {expected[name]} after {self._vocab_size} text ids")
        self._bos_id, self._eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        if self._bos_id is None or self._eos_id is None:
            missing = bos if self._bos_id is None else eos
            raise UserError(f"{tokenizer_dir}: the tokenizer has no {missing} token (BOS/EOS)")
        return tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def added_token_id(self, name: str) -> int:
        """Id of one of Show-o's added tokens (`[PAD]`, `<|soi|>`, ..., `<|lvg|>`)."""
        ids = showo_added_token_ids(self._vocab_size)
        if name not in ids:
            raise UserError(f"unknown Show-o token {name!r}; known: {', '.join(SHOWO_ADDED_TOKENS)}")
        return ids[name]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self._vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self._vocab_size}): {bad[:5]}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "json": self._tok.to_str(),
                "ids": (self._vocab_size, self._bos_id, self._eos_id)}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._tok = tokenizers.Tokenizer.from_str(state["json"])
        self._vocab_size, self._bos_id, self._eos_id = state["ids"]


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
    _check_training_args(model_type, vocab_size, out_path)
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
    write_atomically(out_path, model.getvalue())
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


