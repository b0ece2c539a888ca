"""Model-level T2I / VQA sampling and the generate / ask CLIs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import unified_env
from unif2ace_jax.models.backbone import default_config as default_model_config
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.sequences import build_t2i_prompt
from unif2ace_jax.models.unified import build_model
from unif2ace_jax.sampling.guidance import paired_forward
from unif2ace_jax.sampling.t2i import sample_codes
from unif2ace_jax.utils.image_grid import make_image_grid

K, GRID, TEXT = 12, 3, 40


@pytest.fixture(scope="module")
def tiny():
    cfg = default_model_config()
    cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn.hidden = 16, 2, 2, 32
    cfg.init_std = 0.5
    model = build_model(cfg, text_vocab_size=TEXT, num_image_codes=K, image_grid=GRID)
    params = nn.unbox(jax.jit(lambda k: model.init(k))(jax.random.key(0)))["params"]
    rng = np.random.default_rng(0)
    caption = rng.integers(0, TEXT, (3, 7)).astype(np.int32)
    caption_len = np.array([7, 3, 5], np.int32)
    return model, params, caption, caption_len


def _full_logits(model, params, prompt):
    return np.asarray(model.backbone.apply(
        {"params": params}, prompt["tokens"],
        mask=omni_attention_mask(prompt["is_pad"], prompt["image_span"]),
        positions=prompt["positions"], group=prompt["group"], valid=prompt["valid"]))


def test_code_logits_are_the_image_columns_of_the_full_forward(tiny):
    model, params, caption, caption_len = tiny
    n = GRID * GRID
    codes = np.random.default_rng(1).integers(0, K + 1, (3, n)).astype(np.int32)  # K = mask
    prompt = build_t2i_prompt(caption, caption_len, model.vocab, num_image_tokens=n)
    got = np.asarray(model.code_logits_fn(params, prompt)(jnp.asarray(codes)))
    # Reference: the prompt built with the codes in place, full-vocabulary logits sliced.
    filled = build_t2i_prompt(caption, caption_len, model.vocab, image_codes=codes)
    full = _full_logits(model, params, filled)
    lo = model.vocab.image_offset
    width = caption.shape[1] + 3
    want = full[:, width + 1:width + 1 + n, lo:lo + K]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_guidance_pair_runs_cond_and_uncond_in_one_pass(tiny):
    model, params, caption, caption_len = tiny
    n = GRID * GRID
    b = caption.shape[0]
    codes = jnp.full((b, n), K, jnp.int32)
    both = build_t2i_prompt(np.concatenate([caption, caption]),
                            np.concatenate([caption_len, caption_len]), model.vocab,
                            num_image_tokens=n,
                            drop_caption=np.array([False] * b + [True] * b))
    cond, uncond = paired_forward(model.code_logits_fn(params, both))(codes)
    alone = build_t2i_prompt(caption, caption_len, model.vocab, num_image_tokens=n)
    empty = build_t2i_prompt(caption, np.zeros_like(caption_len), model.vocab,
                             num_image_tokens=n)
    np.testing.assert_allclose(cond, model.code_logits_fn(params, alone)(codes), atol=2e-5)
    np.testing.assert_allclose(uncond, model.code_logits_fn(params, empty)(codes), atol=2e-5)
    assert np.abs(np.asarray(cond) - np.asarray(uncond)).max() > 1e-3  # the caption matters


@pytest.mark.parametrize("sampler", ["maskgit", "ancestral"])
def test_sample_codes_invariants(tiny, sampler):
    model, params, caption, caption_len = tiny
    run = lambda seed, w: np.asarray(sample_codes(  # noqa: E731
        model, params, caption, caption_len, jax.random.key(seed), sampler=sampler,
        num_steps=4, guidance=w))
    a = run(0, 1.5)
    assert a.shape == (3, GRID * GRID) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < K  # no mask left, only codes
    np.testing.assert_array_equal(a, run(0, 1.5))  # deterministic given the key
    assert not np.array_equal(a, run(1, 1.5))
    b = run(0, 0.0)  # no guidance: conditional pass only
    assert b.min() >= 0 and b.max() < K


# ------------------------------------------------------------------------------------- CLIs


def _face_png(path, index=0):
    from unif2ace_jax.data.synthface import example

    Image.fromarray(example(0, index)["image"]).save(path)
    return str(path)


@pytest.mark.slow
def test_generate_cli_writes_grid(tmp_path):
    workdir = unified_env.trained_run()
    out = tmp_path / "faces.png"
    proc = unified_env.run_module("unif2ace_jax.generate", f"--workdir={workdir}",
                                  "--prompt=A person with red hair and blue eyes.",
                                  "--prompt=A smiling person.", "--num=3", "--steps=3",
                                  "--guidance=1.0", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = 16  # the environment's tokenizer works at 16 px
    upscale = 8  # generate zooms faces to >= 128 px
    want = make_image_grid(np.zeros((6, size, size, 3), np.uint8), ncols=3, upscale=upscale)
    with Image.open(out) as im:
        assert im.size == (want.shape[1], want.shape[0])
    for sampler in ("ancestral",):
        proc = unified_env.run_module("unif2ace_jax.generate", f"--workdir={workdir}",
                                      "--prompt=A face.", "--num=1", f"--sampler={sampler}",
                                      f"--out={tmp_path / 'a.png'}")
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ask_cli_answers(tmp_path):
    """The CLI prints the in-process `ask.ask` answers: the bare answer for one question,
    ``question -> answer`` lines (in order) for several."""
    from unif2ace_jax import ask
    from unif2ace_jax.checkpoint.trained import load_trained

    workdir = unified_env.trained_run()
    image = _face_png(tmp_path / "face.png")
    questions = ["What color is the person's hair?", "What color are the person's eyes?"]
    trained = load_trained(workdir)
    want_one = ask.ask(trained, str(image), questions[:1])
    want_two = ask.ask(trained, str(image), questions)
    assert len(want_one) == 1 and len(want_two) == 2
    assert all(isinstance(a, str) for a in want_one + want_two)

    proc = unified_env.run_module("unif2ace_jax.ask", f"--workdir={workdir}", f"--image={image}",
                                  f"--question={questions[0]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == want_one[0] + "\n"
    args = [f"--workdir={workdir}", f"--image={image}", *[f"--question={q}" for q in questions]]
    proc = unified_env.run_module("unif2ace_jax.ask", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"{q} -> {a}" for q, a in zip(questions, want_two)]
    again = unified_env.run_module("unif2ace_jax.ask", *args)  # greedy: the same answers
    assert again.returncode == 0 and again.stdout == proc.stdout


def test_cli_bad_inputs(tmp_path):
    missing = tmp_path / "nowhere"
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.generate", f"--workdir={missing}", "--prompt=a face",
        f"--out={tmp_path / 'x.png'}"), "does not exist")
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.generate", f"--workdir={tmp_path}", f"--out={tmp_path / 'x.png'}"),
        "--prompt")
    # A workdir that has its run file but no checkpoint yet.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"config": {}}))
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.generate", f"--workdir={empty}", "--prompt=a face",
        f"--out={tmp_path / 'x.png'}"), "checkpoint")
    # Unreadable / missing images for ask.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.ask", f"--workdir={empty}", f"--image={bad}", "--question=Hair?"),
        "corrupt image")
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.ask", f"--workdir={empty}", f"--image={tmp_path / 'none.png'}",
        "--question=Hair?"), "does not exist")
    good = _face_png(tmp_path / "face.png")
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.ask", f"--workdir={missing}", f"--image={good}", "--question=Hair?"),
        "does not exist")
