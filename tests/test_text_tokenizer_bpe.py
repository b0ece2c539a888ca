"""GPT-2 / Phi byte-level BPE text tokenizer: both file layouts, transformers as reference, errors.

The test writes its own tiny GPT-2-style tokenizer (trained here with `tokenizers`), in the two
layouts Phi-1.5 ships: `tokenizer.json`, and `vocab.json` + `merges.txt` + `added_tokens.json`.
Like GPT-2, `<|endoftext|>` is the last id of the BPE vocabulary and Phi-style whitespace tokens
are added after it.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest

from unif2ace_jax.data.text_tokenizer import (
    SHOWO_ADDED_TOKENS,
    TEXT_TOKENIZERS,
    GPT2BPETokenizer,
    TextTokenizer,
    make_text_tokenizer,
    showo_added_token_ids,
)
from unif2ace_jax.errors import UserError

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "a woman with red hair and blue eyes",
    "a man with a black beard, round glasses and a hat",
    "the person is smiling; the face is square.",
    "She has blond hair.   He has green eyes!",
    "def f(x):\n\treturn x * 2  # code, with tabs",
    "Numbers 0123456789 and punctuation: ?!.,;'\"()[]{}",
]
TEXTS = CORPUS + [
    "",
    " leading space and trailing space ",
    "unseen words: zebra quokka xylophone",
    "Ünïcödé café, naïve — 顔 😀",
    "two<|endoftext|>documents",
    "runs of spaces        and\t\ttabs",
    "literal Show-o tokens <|soi|> [PAD] <|t2i|> stay text",
    "line one\nline two\r\n",
]
WHITESPACE_TOKENS = ["    ", "\t\t"]  # Phi-1.5 adds whitespace runs after GPT-2's 50257 ids


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def _byte_level_tokenizer(vocab_path: str, merges_path: str):
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.BPE.from_file(vocab_path, merges_path))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([tk.AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens(WHITESPACE_TOKENS)
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tk = tokenizers
    root = tmp_path_factory.mktemp("bpe")
    trained = tk.Tokenizer(tk.models.BPE())
    trained.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(CORPUS, trainer)

    slow = str(root / "slow")
    os.makedirs(slow)
    trained.model.save(slow)  # vocab.json + merges.txt
    vocab_path = os.path.join(slow, "vocab.json")
    vocab = json.load(open(vocab_path, encoding="utf-8"))
    vocab["<|endoftext|>"] = len(vocab)
    _write_json(vocab_path, vocab)
    _write_json(os.path.join(slow, "added_tokens.json"),
                {t: len(vocab) + i for i, t in enumerate(WHITESPACE_TOKENS)})
    _write_json(os.path.join(slow, "special_tokens_map.json"),
                {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")})

    fast = str(root / "fast")
    os.makedirs(fast)
    _byte_level_tokenizer(vocab_path, os.path.join(slow, "merges.txt")).save(
        os.path.join(fast, "tokenizer.json"))

    # As saved after Show-o's UniversalPrompting: [PAD] then its nine tokens appended.
    showo = str(root / "showo")
    os.makedirs(showo)
    with_showo = _byte_level_tokenizer(vocab_path, os.path.join(slow, "merges.txt"))
    with_showo.add_special_tokens([tk.AddedToken("[PAD]", special=True)])
    with_showo.add_tokens(list(SHOWO_ADDED_TOKENS[1:]))
    with_showo.save(os.path.join(showo, "tokenizer.json"))
    return {"slow": slow, "fast": fast, "showo": showo, "eot": len(vocab) - 1,
            "n_text": len(vocab) + len(WHITESPACE_TOKENS)}


def test_both_layouts_same_ids_and_round_trip(dirs):
    slow, fast = GPT2BPETokenizer(dirs["slow"]), GPT2BPETokenizer(dirs["fast"])
    assert isinstance(fast, TextTokenizer)
    assert slow.vocab_size == fast.vocab_size == dirs["n_text"]
    assert slow.bos_id == slow.eos_id == fast.bos_id == fast.eos_id == dirs["eot"]
    for text in TEXTS:
        ids = fast.encode(text)
        assert slow.encode(text) == ids, text
        assert fast.decode(ids) == text
    assert fast.encode_batch(TEXTS) == [fast.encode(t) for t in TEXTS]
    assert slow.encode_batch(TEXTS) == fast.encode_batch(TEXTS)
    assert fast.encode("two<|endoftext|>documents").count(dirs["eot"]) == 1
    assert fast.encode("a    b").count(dirs["n_text"] - 2) == 1  # the added 4-space token


def test_matches_transformers_gpt2_tokenizers(dirs):
    transformers = pytest.importorskip("transformers")
    ref_slow = transformers.GPT2Tokenizer.from_pretrained(dirs["slow"])
    ref_fast = transformers.GPT2TokenizerFast.from_pretrained(dirs["fast"])
    ours = GPT2BPETokenizer(dirs["fast"])
    for text in TEXTS:
        ids = ours.encode(text)
        assert ref_fast(text, add_special_tokens=False)["input_ids"] == ids, text
        assert ref_slow(text, add_special_tokens=False)["input_ids"] == ids, text
        assert ours.decode(ids) == ref_fast.decode(ids, clean_up_tokenization_spaces=False)
    assert ours.eos_id == ref_fast.eos_token_id and ours.bos_id == ref_fast.bos_token_id


def test_ids_below_vocab_size_and_showo_tokens_left_out(dirs):
    plain, showo = GPT2BPETokenizer(dirs["fast"]), GPT2BPETokenizer(dirs["showo"])
    assert showo.vocab_size == plain.vocab_size
    for tok in (plain, showo):
        for ids in tok.encode_batch(TEXTS):
            assert all(0 <= i < tok.vocab_size for i in ids)
    literal = "literal Show-o tokens <|soi|> [PAD] <|t2i|> stay text"
    assert showo.encode(literal) == plain.encode(literal)
    file_ids = json.load(open(os.path.join(dirs["showo"], "tokenizer.json")))["added_tokens"]
    file_ids = {t["content"]: t["id"] for t in file_ids}
    for name in SHOWO_ADDED_TOKENS:
        assert showo.added_token_id(name) == plain.added_token_id(name) == file_ids[name]
    with pytest.raises(ValueError, match="out of range"):
        plain.decode([plain.vocab_size])
    with pytest.raises(UserError, match="unknown Show-o token"):
        plain.added_token_id("<|nope|>")


def test_showo_ids_for_phi_vocabulary():
    ids = showo_added_token_ids(50295)  # Phi-1.5: 50257 BPE ids + 38 added whitespace tokens
    assert ids["[PAD]"] == 50295 and ids["<|soi|>"] == 50296 and ids["<|eoi|>"] == 50297
    assert ids["<|t2i|>"] == 50300 and ids["<|mmu|>"] == 50301 and ids["<|lvg|>"] == 50304
    assert max(ids.values()) + 1 == 50305  # image code c is 50305 + c


def test_registry_and_pickle(dirs):
    assert "gpt2_bpe" in TEXT_TOKENIZERS
    tok = make_text_tokenizer("gpt2_bpe", dirs["fast"])
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert (back.vocab_size, back.bos_id, back.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)


def _bad_dir(tmp_path, files: dict[str, str]) -> str:
    d = tmp_path / "bad"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return str(d)


@pytest.mark.parametrize("files, message", [
    (None, "directory not found"),
    ({}, "no tokenizer.json, nor vocab.json"),
    ({"vocab.json": "{}"}, "no tokenizer.json, nor vocab.json"),
    ({"tokenizer.json": "{not json"}, "not valid JSON"),
    ({"tokenizer.json": '{"version": "1.0"}'}, "not a tokenizers file"),
    ({"tokenizer.json": '{"model": {"type": "BPE", "vocab": 3}}'}, "not a tokenizers file"),
    ({"tokenizer.json": '{"model": {"type": "WordPiece"}}'}, "is not BPE"),
    ({"vocab.json": "[1, 2", "merges.txt": ""}, "not valid JSON"),
    ({"vocab.json": '["a"]', "merges.txt": ""}, "expected a JSON object"),
    ({"vocab.json": '{"a": 0, "b": 1}', "merges.txt": "#version: 0.2\na c\n"}, "cannot read BPE"),
    ({"vocab.json": '{"a": 0, "b": 1}', "merges.txt": ""}, "no <|endoftext|> token"),
])
def test_bad_directory_is_one_line_user_error(tmp_path, files, message):
    path = str(tmp_path / "missing") if files is None else _bad_dir(tmp_path, files)
    with pytest.raises(UserError, match=message.replace("|", r"\|")) as e:
        GPT2BPETokenizer(path)
    assert "\n" not in str(e.value)
