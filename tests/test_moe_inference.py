"""Inference with a sequence-level MoE: features in evaluate, T2I sampling and `ask`.

* LM rows never see the records' image features (`losses.unified.record_features`);
* every T2I sampler step feeds the noise expert the row's true mask ratio, and a caption alone
  (no image) gets absent clip / face features;
* `evaluate` passes the records' features to VQA decoding and the NELBO (slow);
* `ask` computes the features of a new image with the run's frozen encoders, equal to the
  precomputed record fields (slow).
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import unified_env
from unif2ace_jax.models.backbone import default_config as default_model_config
from unif2ace_jax.models.sequences import TASK_LM, TASK_MMU, TASK_T2I
from unif2ace_jax.models.unified import UnifiedModel, build_model, masked_fraction
from unif2ace_jax.sampling.t2i import absent_features, sample_codes
from unif2ace_jax.losses.unified import record_features

K, GRID, TEXT, FDIM = 12, 3, 40, 8


# ------------------------------------------------------------------------------ pure functions

def test_record_features_hide_image_features_from_lm_rows():
    rng = np.random.default_rng(0)
    task = np.array([TASK_T2I, TASK_MMU, TASK_LM, TASK_MMU, TASK_LM])
    batch = {"clip": rng.normal(size=(5, 4)), "face": rng.normal(size=(5, 3)),
             "face_present": np.array([True, False, True, True, False])}
    out = record_features(batch, ("clip", "face", "missing"), jnp.asarray(task))
    assert set(out) == {"clip", "clip_present", "face", "face_present"}
    np.testing.assert_array_equal(out["clip"], batch["clip"])
    want_clip = [t != TASK_LM for t in task]
    want_face = [p and t != TASK_LM for p, t in zip(batch["face_present"], task)]
    np.testing.assert_array_equal(np.asarray(out["clip_present"]), want_clip)
    np.testing.assert_array_equal(np.asarray(out["face_present"]), want_face)


def test_masked_fraction_counts_mask_ids():
    codes = np.random.default_rng(1).integers(0, K + 1, (6, 10))
    want = [sum(int(c == K) for c in row) / 10 for row in codes]
    np.testing.assert_allclose(np.asarray(masked_fraction(jnp.asarray(codes), K)), want,
                               rtol=1e-7)


# ----------------------------------------------------------------------------- T2I sampling

def _seq_moe_config():
    cfg = default_model_config()
    cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn.hidden = 16, 2, 1, 32
    cfg.init_std = 0.5
    feature = dict(kind="feature", resampler="mlp", resampler_hidden=16, feature_norm=True,
                   encoder_config=dict())
    cfg.seq_moe = ml_collections.ConfigDict(dict(
        name="grouped_seq_moe",
        groups=dict(und=["copy", "copy", "clip", "face"], gen=["copy", "copy", "zero", "noise"]),
        experts=dict(
            clip=dict(feature, feature_key="clip", feature_dim=FDIM, encoder="precomputed"),
            face=dict(feature, feature_key="face", feature_dim=FDIM, encoder="precomputed"),
            noise=dict(feature, feature_key="mask_ratio", feature_dim=16, encoder="noise",
                       encoder_config=dict(dim=16))),
        top_k=2))
    return cfg


# Calls seen by `_SpyModel.forward`: (mask_ratio [B], tokens [B, L]) per backbone pass.
_CALLS: list = []


@dataclasses.dataclass(frozen=True)
class _SpyModel(UnifiedModel):
    def forward(self, params, seqs, *, features=None, **kwargs):
        jax.debug.callback(lambda r, t: _CALLS.append((np.asarray(r), np.asarray(t))),
                           features["mask_ratio"], seqs["tokens"])
        return super().forward(params, seqs, features=features, **kwargs)


@pytest.fixture(scope="module")
def spy():
    model = build_model(_seq_moe_config(), text_vocab_size=TEXT, num_image_codes=K,
                        image_grid=GRID)
    feats = {"task": jnp.zeros((1,), jnp.int32), "mask_ratio": jnp.zeros((1,)),
             "clip": jnp.zeros((1, FDIM)), "face": jnp.zeros((1, FDIM))}
    params = nn.unbox(jax.jit(lambda k: model.init(k, features=feats))(jax.random.key(0)))
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    return _SpyModel(**fields), params["params"]


def test_absent_features_for_captions():
    model = build_model(_seq_moe_config(), text_vocab_size=TEXT, num_image_codes=K,
                        image_grid=GRID)
    out = absent_features(model, 3)
    assert set(out) == {"clip", "clip_present", "face", "face_present"}
    assert out["clip"].shape == (3, FDIM) and not np.asarray(out["clip"]).any()
    assert not np.asarray(out["face_present"]).any()
    dense = build_model(default_model_config(), text_vocab_size=TEXT, num_image_codes=K,
                        image_grid=GRID)
    assert absent_features(dense, 3) == {}


@pytest.mark.parametrize("sampler,guidance", [("maskgit", 1.5), ("ancestral", 0.0)])
def test_t2i_sampler_feeds_each_steps_mask_ratio(spy, sampler, guidance):
    """Every backbone pass sees, per row, the fraction of image tokens still masked."""
    model, params = spy
    steps, n = 4, GRID * GRID
    rng = np.random.default_rng(2)
    caption = rng.integers(0, TEXT, (2, 5)).astype(np.int32)
    _CALLS.clear()
    codes = sample_codes(model, params, caption, np.array([5, 3], np.int32), jax.random.key(3),
                         sampler=sampler, num_steps=steps, guidance=guidance)
    jax.block_until_ready(codes)
    jax.effects_barrier()
    assert np.asarray(codes).max() < K  # the sampler ran to the end (no mask left)
    assert len(_CALLS) == steps
    rows = 4 if guidance else 2
    seen = []
    for ratio, tokens in _CALLS:
        want = (tokens == model.vocab.mask_id).sum(axis=1) / n
        assert ratio.shape == (rows,)
        np.testing.assert_allclose(ratio, want, rtol=1e-6)
        seen.append(ratio)
    seen = np.sort(np.concatenate(seen))[::-1]
    assert seen[0] == 1.0  # the first step starts from a fully masked canvas
    assert seen[-1] < 1.0  # ... and later steps see fewer masks (not a constant 1)


# ------------------------------------------------------------------------------------- VQA

def test_answer_ids_give_each_row_its_features_across_chunks(spy):
    """Chunked (and padded) decoding with per-row features equals one decode of all rows."""
    from unif2ace_jax.errors import UserError
    from unif2ace_jax.models.sequences import build_mmu_prefix
    from unif2ace_jax.models.unified import default_features
    from unif2ace_jax.sampling.mmu import mmu_decode
    from unif2ace_jax.sampling.vqa import answer_ids

    model, params = spy
    rng = np.random.default_rng(4)
    codes = rng.integers(0, K, (3, GRID * GRID)).astype(np.int32)
    question = rng.integers(0, TEXT, (3, 5)).astype(np.int32)
    qlen = np.array([5, 2, 4], np.int32)
    feats = {"clip": rng.normal(size=(3, FDIM)).astype(np.float32),
             "face": rng.normal(size=(3, FDIM)).astype(np.float32),
             "clip_present": np.array([True, False, True])}
    got = answer_ids(model, params, codes, question, qlen, max_new_tokens=3, chunk=2,
                     features=feats)
    prefix = build_mmu_prefix(codes, question, qlen, model.vocab, pad_side="left")
    ref = mmu_decode(model.backbone, {"params": params}, prefix, vocab=model.vocab,
                     max_new_tokens=3, features=default_features(
                         jnp.full((3,), TASK_MMU), jnp.zeros((3,)), feats))
    want = [row[:n].tolist() for row, n in zip(np.asarray(ref["tokens"]),
                                                np.asarray(ref["length"]))]
    assert got == want
    with pytest.raises(UserError, match="clip"):  # the model cannot decode without them
        answer_ids(model, params, codes, question, qlen, max_new_tokens=3, chunk=2)


# ------------------------------------------------------------------------ evaluate and ask


@pytest.mark.slow
def test_evaluate_with_clip_and_face_features_returns_every_metric():
    """tiny,moe=both with the clip / face experts on: the records' features reach VQA decoding
    and the NELBO; generation (caption only) runs with them absent."""
    import test_moe_train
    from unif2ace_jax.evaluate.unified import evaluate

    result = evaluate(test_moe_train.moe_both_run(), "test", num_generate=2, max_questions=4,
                      max_nelbo_images=4, batch_size=4)
    assert result["num_questions"] == 4 and 0.0 <= result["vqa_accuracy"] <= 1.0
    assert result["num_generated"] == 2 and 0.0 <= result["gen_attribute_accuracy"] <= 1.0
    assert np.isfinite(result["nelbo_bits_per_token"]) and result["nelbo_bits_per_token"] > 0
    assert result["routing"]["seq_moe"]["und"]["experts"] == ["copy", "copy", "clip", "face"]


@functools.lru_cache(maxsize=None)
def _embedded_run() -> str:
    """A tiny moe=seq run on records whose clip / face fields come from randomly initialised
    SynthFace encoders (saved as their trainer saves them, `data.embeddings` prepared)."""
    from unif2ace_jax.data.embeddings import prepare_embeddings
    from unif2ace_jax.data.images import num_values
    from unif2ace_jax.models.encoders import synthface_saved
    from unif2ace_jax.models.encoders.synthface_clip import make_clip_model
    from unif2ace_jax.models.encoders.synthface_face import make_face_model
    from unif2ace_jax.train.train import train

    env = unified_env.build_env()
    enc = unified_env.load_config_module("encoders_synthface").get_config("tiny")
    dim = 64  # configs/synthface_tiny.py FEATURE_ENCODERS
    enc.face.model.embed_dim = dim
    enc.clip.model.embed_dim = dim
    images = np.zeros((1, 64, 64, 3), np.uint8)
    dirs = {k: os.path.join(env["root"], f"enc_{k}") for k in ("face", "clip")}
    face = make_face_model(enc.face.model, num_values())
    synthface_saved.save_trained(
        dirs["face"], "face", enc.face.model.to_dict(),
        nn.meta.unbox(face.init(jax.random.key(0), images)["params"]),
        num_values=list(num_values()))
    clip = make_clip_model(enc.clip.model, 50)
    ids, lengths = np.ones((1, 8), np.int32), np.full((1,), 8, np.int32)
    synthface_saved.save_trained(
        dirs["clip"], "clip", enc.clip.model.to_dict(),
        nn.meta.unbox(clip.init(jax.random.key(1), images, ids, lengths)["params"]),
        vocab_size=50)
    prepare_embeddings(env["data_dir"], "synthface_codes", ["synthface_face", "synthface_clip"],
                       [dirs["face"], dirs["clip"]], name="synthface_codes_emb",
                       batch_size=8, progress=False)
    config = unified_env.load_config_module("synthface_tiny").get_config("tiny,moe=seq")
    base = unified_env.tiny_config()
    for key in ("data_dir", "tokenizer"):
        config.data[key] = base.data[key]
    config.tokenizer_workdir, config.judge_workdir = base.tokenizer_workdir, base.judge_workdir
    config.model.num_image_codes, config.model.image_grid = env["num_codes"], env["grid"]
    config.data.dataset = "synthface_codes_emb"
    config.update(total_steps=2, ckpt_every=2, log_every=1)
    workdir = os.path.join(env["root"], "run_emb")
    train(config, workdir)
    return workdir


@pytest.mark.slow
def test_ask_features_on_the_fly_equal_the_records(tmp_path):
    from unif2ace_jax import ask
    from unif2ace_jax.data import records
    from unif2ace_jax.data.pipeline import open_split
    from unif2ace_jax.sampling.vqa import answer_questions
    from unif2ace_jax.checkpoint.trained import feature_encoder_specs, load_trained

    trained = load_trained(_embedded_run())
    specs = feature_encoder_specs(trained.config, trained.info, strict=True)
    assert {k: v["encoder"] for k, v in specs.items()} == {"clip": "synthface_clip",
                                                           "face": "synthface_face"}
    source, _ = open_split(trained.config.data, "test")
    questions = ["What color is the hair?", "Is the person smiling?"]
    for i in range(2):
        record = source[i]
        path = str(tmp_path / f"face{i}.png")
        with open(path, "wb") as f:
            f.write(bytes(record[records.IMAGE]))
        codes, features = ask.image_inputs(trained, path)
        for key in ("clip", "face"):
            np.testing.assert_allclose(features[key][0], np.asarray(record[key]), rtol=1e-5,
                                       atol=1e-6)
            assert features[f"{key}_present"].tolist() == [True]
        stored = {k: np.repeat(np.asarray(record[k])[None], 2, 0) for k in ("clip", "face")}
        want = answer_questions(trained, np.repeat(codes, 2, 0), questions, features=stored)
        assert ask.ask(trained, path, questions) == want
