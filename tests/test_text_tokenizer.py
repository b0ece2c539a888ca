"""SentencePiece text tokenizer: training, determinism, id range, errors, registry."""

from __future__ import annotations

import os
import pickle

import pytest

from unif2ace_jax.data.text_tokenizer import (
    TEXT_TOKENIZERS,
    SentencePieceTokenizer,
    TextTokenizer,
    make_text_tokenizer,
    train_sentencepiece,
)
from unif2ace_jax.errors import UserError

WORDS = ("red", "blond", "black", "hair", "blue", "green", "eyes", "glasses", "beard", "hat",
         "smiling", "frowning", "round", "square", "face", "with", "and", "a", "the", "person")


def _corpus(n: int = 300) -> list[str]:
    # A deterministic pseudo-random corpus built without the code under test.
    out, x = [], 12345
    for i in range(n):
        words = []
        for _ in range(4 + i % 7):
            x = (x * 1103515245 + 12345) % 2**31
            words.append(WORDS[x % len(WORDS)])
        out.append(" ".join(words) + ("." if i % 3 else f" {i % 10}"))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = _corpus()
    paths = {}
    for model_type in ("unigram", "bpe"):
        paths[model_type] = train_sentencepiece(corpus, 40, d / f"{model_type}.model",
                                                model_type=model_type)
    return corpus, paths, d


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_ids_in_range_and_round_trip(models, model_type):
    corpus, paths, _ = models
    tok = SentencePieceTokenizer(paths[model_type])
    assert tok.vocab_size == 40
    assert isinstance(tok, TextTokenizer)
    for text in corpus[:50]:
        ids = tok.encode(text)
        assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        # Plain lower-case ASCII with single spaces survives normalisation unchanged.
        assert tok.decode(ids) == text
    batch = tok.encode_batch(corpus[:5])
    assert batch == [tok.encode(t) for t in corpus[:5]]


def test_no_bos_eos_and_unknown_characters_stay_in_range(models):
    _, paths, _ = models
    tok = SentencePieceTokenizer(paths["unigram"])
    assert tok.encode("") == []
    ids = tok.encode("Zebra ☃ qx")  # characters never seen in training
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert 0 in ids  # <unk>


def test_training_is_deterministic(models, tmp_path):
    corpus, paths, _ = models
    again = train_sentencepiece(iter(corpus), 40, tmp_path / "again.model", model_type="unigram")
    assert open(again, "rb").read() == open(paths["unigram"], "rb").read()


def test_vocab_too_large_is_a_user_error_and_writes_nothing(tmp_path):
    out = tmp_path / "big.model"
    with pytest.raises(UserError, match=r"too large .* use at most \d+"):
        train_sentencepiece(_corpus(50), 5000, out)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="empty corpus"):
        train_sentencepiece(["", "  "], 30, tmp_path / "x.model")


def test_failed_training_keeps_previous_model(models, tmp_path):
    _, paths, _ = models
    out = tmp_path / "keep.model"
    out.write_bytes(open(paths["bpe"], "rb").read())
    with pytest.raises(UserError):
        train_sentencepiece(_corpus(20), 9000, out)
    assert out.read_bytes() == open(paths["bpe"], "rb").read()


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bad)


def test_decode_rejects_out_of_range(models):
    _, paths, _ = models
    tok = SentencePieceTokenizer(paths["bpe"])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_registry_and_pickle(models):
    _, paths, _ = models
    assert "sentencepiece" in TEXT_TOKENIZERS
    tok = make_text_tokenizer("sentencepiece", paths["bpe"])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("red hair and blue eyes") == tok.encode("red hair and blue eyes")
    with pytest.raises(UserError, match="unknown text tokenizer 'gpt3'.*sentencepiece"):
        make_text_tokenizer("gpt3", paths["bpe"])


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="model type"):
        train_sentencepiece(_corpus(10), 30, tmp_path / "x.model", model_type="wordpiece")
    with pytest.raises(UserError, match="output directory"):
        train_sentencepiece(_corpus(10), 30, tmp_path / "missing" / "x.model")
