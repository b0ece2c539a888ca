"""`generate` and `ask` on a converted Show-o workdir, end to end, with Show-o's prompts.

Pairing: the fixture Show-o expects 8192 image codes on a 4x4 grid, while the fixture MAGVIT-v2
makes 64 codes on 8x8. The test therefore writes a random MAGVIT-v2 in Show-o's safetensors
layout with the fixture's network shape but 13 bits (8192 codes) and a 16 px input (two
downsampling levels -> 4x4), converts it with `convert.magvit2`, and names it to
`convert.showo --tokenizer_workdir`. The text tokenizer is a tiny GPT-2 byte-level BPE padded to
Phi-1.5's id layout (``<|endoftext|>`` = 50256, 38 added whitespace tokens -> 50295 text ids),
as the converter requires of ``--text_tokenizer``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.convert import magvit2 as conv_magvit2
from unif2ace_jax.convert import showo as conv_showo
from unif2ace_jax.models.masks import showo_t2i_attention_mask
from unif2ace_jax.models.tokenizer import lfq
from unif2ace_jax.sampling.t2i import showo_max_text_len, showo_step_logits, showo_t2i_tokens
from unif2ace_jax.sampling.vqa import showo_answer_ids
from unif2ace_jax.utils.image_grid import make_image_grid

import showo_fixtures

tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = showo_fixtures.ROOT
FIXTURES = showo_fixtures.SHOWO
EOT, TEXT_SIZE, N, K = 50256, 50295, 16, 8192
MAX_SEQ_LENGTH = 12  # the fixture's: text part 13 ids wide
PROMPT = "a woman with red hair"
CORPUS = ["a woman with red hair and blue eyes", "a man with a black beard and glasses",
          "what color is the hair? the person is smiling"]


def _phi_like_bpe(path: str) -> str:
    """A tiny GPT-2 BPE in vocab.json + merges.txt layout with Phi-1.5's ids: the trained
    vocabulary, unused fillers up to 50256 = ``<|endoftext|>``, then 38 whitespace tokens."""
    tk = tokenizers
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, tk.trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(path)
    bpe.model.save(path)
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), EOT)})
    vocab["<|endoftext|>"] = EOT
    spaces = [" " * n for n in range(2, 26)] + ["\t" * n for n in range(2, 16)]
    assert len(vocab) + len(spaces) == TEXT_SIZE
    for name, obj in (("vocab.json", vocab),
                      ("added_tokens.json", {t: EOT + 1 + i for i, t in enumerate(spaces)}),
                      ("special_tokens_map.json",
                       {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")})):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
    return path


def _magvit2_13_bits(path: str) -> str:
    """The fixture MAGVIT-v2's network with 13 bits: its tensors where the shapes agree, random
    ones where the bit count changes them, and the 13-bit LFQ buffers."""
    sd = conv_magvit2.read_checkpoint(os.path.join(FIXTURES, "magvit2"))
    geometry = conv_magvit2.infer_geometry(sd)
    geometry = type(geometry)(**{**geometry.__dict__, "bits": 13})
    config = conv_magvit2.model_config(geometry, 16)
    rng = np.random.default_rng(0)
    out = {}
    for fpath, shape in conv_magvit2._expected_params(config).items():
        name = conv_magvit2._torch_name(fpath)
        shape = conv_magvit2._torch_shape(shape)
        if name in sd and tuple(sd[name].shape) == shape:
            out[name] = np.asarray(sd[name], np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    out["quantize.embedding"] = np.asarray(lfq.codebook(13), np.float32)
    out["quantize.power_vals"] = lfq.bit_weights(13).astype(np.float32)
    os.makedirs(path)
    safetensors_numpy.save_file(out, os.path.join(path, conv_magvit2.WEIGHTS_FILE))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "MAGVITv2"}, f)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    showo_fixtures.require(FIXTURES)
    root = tmp_path_factory.mktemp("showo_e2e")
    text_tok = _phi_like_bpe(str(root / "bpe"))
    image_tok = str(root / "magvit2")
    conv_magvit2.convert_directory(_magvit2_13_bits(str(root / "magvit2_src")), image_tok,
                                   image_size=16)
    out = str(root / "run")
    conv_showo.convert_directory(os.path.join(FIXTURES, "showo"), out, text_tokenizer=text_tok,
                                 tokenizer_workdir=image_tok, max_seq_length=MAX_SEQ_LENGTH)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 20, 3), np.uint8)).save(
        str(root / "face.png"))
    return {"root": root, "workdir": out, "face": str(root / "face.png")}


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_workdir_records_showo_inference(run):
    trained = load_trained(run["workdir"])
    assert trained.config.sampling.prompt_format == "showo"
    assert trained.config.sampling.temperature_annealing == "showo_compound"
    assert showo_max_text_len(trained.config) == MAX_SEQ_LENGTH + 1
    tok = trained.image_tokenizer
    assert (tok.codebook_size, tok.grid_size) == (K, 4)


def test_generate_first_step_logits_are_showo_logits(run):
    """The generate path's prompt and first sampler step equal the parity API's logits on the
    same rows (hand-built here), guided as Show-o does."""
    trained = load_trained(run["workdir"])
    vocab, tok = trained.model.vocab, trained.text_tokenizer
    rows, uncond = showo_t2i_tokens(tok, [PROMPT], vocab, max_text_len=MAX_SEQ_LENGTH + 1,
                                    num_image_tokens=N)
    text = [vocab.t2i_id, EOT] + tok.encode(PROMPT) + [EOT]
    image = [vocab.soi_id] + [vocab.mask_id] * N + [vocab.eoi_id]
    want_cond = [vocab.pad_id] * (MAX_SEQ_LENGTH + 1 - len(text)) + text + image
    want_uncond = [vocab.pad_id] * (MAX_SEQ_LENGTH - 2) + [vocab.t2i_id, EOT, EOT] + image
    assert rows.tolist() == [want_cond] and uncond.tolist() == want_uncond
    s = 1.75
    got = np.asarray(showo_step_logits(trained.params, rows, uncond, np.full((1, N), K, np.int32),
                                       np.float32(s), model=trained.model, use_guidance=True))
    ids = np.asarray([want_cond, want_uncond])
    attend = np.asarray(showo_t2i_attention_mask(ids, pad_id=vocab.pad_id, soi_id=vocab.soi_id,
                                                 eoi_id=vocab.eoi_id))
    full = conv_showo.load_showo(run["workdir"]).logits(ids, attend)[:, -(N + 1):-1,
                                                                      vocab.image_offset:-1]
    want = (1 + s) * full[:1] - s * full[1:]
    assert got.shape == (1, N, K)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_ask_path_matches_showo_greedy_tokens(run):
    golden = showo_fixtures.golden("showo")
    trained = load_trained(run["workdir"])
    ids = golden["mmu_ids"]
    codes = ids[:, 2:2 + N] - trained.model.vocab.image_offset
    questions = [r[N + 4:].tolist() for r in ids]
    got = showo_answer_ids(trained.model, trained.params, codes, questions,
                           max_new_tokens=golden["mmu_greedy"].shape[1])
    assert got == golden["mmu_greedy"].tolist()


def test_generate_and_ask_commands(run):
    png = str(run["root"] / "x.png")
    gen = _cli("unif2ace_jax.generate", f"--workdir={run['workdir']}", f"--prompt={PROMPT}",
               f"--out={png}", "--num=1", "--steps=3", "--upscale=1")
    assert gen.returncode == 0, gen.stderr[-2000:]
    expected = make_image_grid(np.zeros((1, 16, 16, 3), np.uint8)).shape
    assert np.asarray(Image.open(png).convert("RGB")).shape == expected
    ask = _cli("unif2ace_jax.ask", f"--workdir={run['workdir']}", f"--image={run['face']}",
               "--question=What color is the hair?", "--max_tokens=4")
    assert ask.returncode == 0, ask.stderr[-2000:]
    # One answer line (greedy over the whole vocabulary: a random model may answer with image
    # ids only, which decode to nothing, as Show-o's skip_special_tokens decode does).
    assert ask.stdout.endswith("\n") and len(ask.stdout.splitlines()) == 1
