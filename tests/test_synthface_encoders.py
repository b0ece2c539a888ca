"""SynthFace expert encoders: models, losses, trainer, registry loading, embeddings prepare."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders.contrastive import info_nce_loss, margin_attribute_loss
from unif2ace_jax.models.judge import value_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import encoders_synthface
    finally:
        sys.path.pop(0)
    return encoders_synthface.get_config("tiny")


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- pure losses


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_info_nce_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    log_scale = 1.3
    loss, aux = info_nce_loss(jnp.asarray(a), jnp.asarray(b), log_scale)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    total_ab = total_ba = 0.0
    for i in range(5):
        row = [np.exp(log_scale) * an[i] @ bn[j] for j in range(5)]
        total_ab += -(row[i] - np.log(np.sum(np.exp(row))))
        col = [np.exp(log_scale) * an[j] @ bn[i] for j in range(5)]
        total_ba += -(col[i] - np.log(np.sum(np.exp(col))))
    np.testing.assert_allclose(float(loss), 0.5 * (total_ab + total_ba) / 5, rtol=1e-5)
    sims = an @ bn.T
    assert float(aux["a_to_b_top1"]) == np.mean(sims.argmax(1) == np.arange(5))
    assert float(aux["b_to_a_top1"]) == np.mean(sims.argmax(0) == np.arange(5))


def test_margin_loss_equals_numpy_and_ignores_padding_and_unknown_labels():
    rng = np.random.default_rng(1)
    num_values = (3, 2)
    valid = value_mask(num_values)
    cos = rng.uniform(-1, 1, size=(4, 2, 3)).astype(np.float32)
    labels = np.array([[0, 1], [2, -1], [1, 0], [2, 1]], np.int32)
    s, m = 8.0, 0.3
    loss, aux = margin_attribute_loss(jnp.asarray(cos), jnp.asarray(labels), jnp.asarray(valid),
                                      scale=s, margin=m)
    nll, correct, count = [], 0, 0
    for b in range(4):
        for a in range(2):
            y = labels[b, a]
            if y < 0:
                continue
            k = num_values[a]
            logits = s * (cos[b, a, :k] - m * (np.arange(k) == y))
            nll.append(-(logits[y] - np.log(np.exp(logits).sum())))
            correct += int(np.argmax(cos[b, a, :k]) == y)
            count += 1
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), correct / count, rtol=1e-6)


def test_retrieval_metrics_against_a_loop():
    from unif2ace_jax.train.encoders import retrieval_metrics

    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    got = retrieval_metrics(img, txt)
    sims = img @ txt.T
    i2t1 = np.mean([np.argmax(sims[i]) == i for i in range(7)])
    i2t5 = np.mean([i in np.argsort(-sims[i])[:5] for i in range(7)])
    t2i1 = np.mean([np.argmax(sims[:, j]) == j for j in range(7)])
    assert got["i2t_top1"] == pytest.approx(i2t1) and got["i2t_top5"] == pytest.approx(i2t5)
    assert got["t2i_top1"] == pytest.approx(t2i1) and got["num_pairs"] == 7


# --------------------------------------------------------------------------- models


def test_face_encoder_shapes_and_unit_norm():
    from unif2ace_jax.models.encoders.synthface_face import make_face_model

    num_values = (3, 2, 4)
    model = make_face_model(dict(embed_dim=12, widths=(4, 8), blocks=(1, 2), resolution=32),
                            num_values)
    images = _images(3, size=48)  # resized to 32 inside: 32 / 4 = 8 -> 64 tokens
    variables = model.init(jax.random.key(0), images)
    params = nn.meta.unbox(variables["params"])
    pooled, cos = model.apply({"params": params}, images)
    assert pooled.shape == (3, 12) and cos.shape == (3, 3, 4)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.abs(cos) <= 1 + 1e-5)
    assert np.all(np.asarray(cos)[:, ~value_mask(num_values)] == 0)
    out = model.encoder.apply({"params": params["encoder"]}, images)
    assert out["tokens"].shape == (3, 64, 12)
    np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-6)
    # every parameter has logical axis names of its rank
    for leaf in jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim


def test_clip_towers_shapes_and_padding_is_ignored():
    from unif2ace_jax.models.encoders.synthface_clip import make_clip_model

    model = make_clip_model(dict(embed_dim=8, image=dict(widths=(4, 8), blocks=1, resolution=32),
                                 text=dict(max_len=10, width=16, num_layers=2, num_heads=2)),
                            vocab_size=30)
    images = _images(2, size=32)
    ids = np.random.default_rng(0).integers(1, 30, (2, 10)).astype(np.int32)
    lengths = np.array([4, 10], np.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), images, ids, lengths)["params"])
    img, txt, log_scale = model.apply({"params": params}, images, ids, lengths)
    assert img.shape == (2, 8) and txt.shape == (2, 8)
    np.testing.assert_allclose(float(log_scale), np.log(1 / 0.07), rtol=1e-6)
    other = ids.copy()
    other[0, 4:] = 7  # change only the padding of row 0
    _, txt2, _ = model.apply({"params": params}, images, other, lengths)
    np.testing.assert_allclose(txt2[0], txt[0], atol=1e-6)
    tok = model.apply({"params": params}, images, method=model.encode_image)
    assert tok["tokens"].shape == (2, 64, 8)


def _fixed_batch_losses(kind, steps=12):
    from unif2ace_jax.data.images import num_values
    from unif2ace_jax.models.encoders.synthface_clip import make_clip_model
    from unif2ace_jax.models.encoders.synthface_face import make_face_model
    from unif2ace_jax.train import encoders as enc_train
    from unif2ace_jax.train import loop
    from unif2ace_jax.optim import make_optimizer

    config = _tiny_config()
    section = config[kind]
    section.optim.warmup_steps = 0
    layout = loop.setup_mesh(config, 8, steps)
    rng = np.random.default_rng(3)
    images = _images(8, seed=4)
    if kind == "face":
        nv = num_values()
        model = make_face_model(section.model, nv)
        batch = {"image": images,
                 "labels": np.stack([rng.integers(0, n, 8) for n in nv], 1).astype(np.int32)}
        init = lambda key: model.init(key, images[:1])["params"]  # noqa: E731
        loss_fn = enc_train.face_loss_fn(model, section.loss, nv, 0)
    else:
        model = make_clip_model(section.model, 40)
        batch = {"image": images, "text": rng.integers(1, 40, (8, 12)).astype(np.int32),
                 "text_len": rng.integers(4, 13, 8).astype(np.int32)}
        init = lambda key: model.init(key, images[:1], batch["text"][:1],  # noqa: E731
                                      batch["text_len"][:1])["params"]
        loss_fn = enc_train.clip_loss_fn(model)
    tx, schedule = make_optimizer(section.optim, steps)
    state, shardings = loop.init_state(init, tx, layout, jax.random.key(0))
    bs = layout.batch_shardings({k: v.ndim for k, v in batch.items()})
    step = loop.make_train_step(loss_fn, tx, schedule, shardings, bs)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, loop.to_global(batch, bs))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("kind", ["face", "clip"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind):
    losses = _fixed_batch_losses(kind)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


# --------------------------------------------------------------------------- trainer, prepare


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny prepared SynthFace dataset and a SentencePiece model on its captions."""
    from unif2ace_jax.data import records
    from unif2ace_jax.data.build import build_dataset
    from unif2ace_jax.data.text_tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("enc_data")
    data_dir = str(root / "data")
    build_dataset("synthface", data_dir, num_train=24, num_test=8, num_heldout=2)
    source = records.encoded_source(records.load_builder(data_dir, "synthface"), "train")
    text_model = str(root / "text.model")
    train_sentencepiece([records.as_str(source[i]["caption"]) for i in range(len(source))],
                        vocab_size=120, out_path=text_model, model_type="bpe")
    config = _tiny_config()
    config.data.data_dir = data_dir
    config.data.config = ""
    config.data.num_examples = 0
    config.data.eval_examples = 0
    config.data.tokenizer.model_path = text_model
    return data_dir, config


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """Both tiny encoders, randomly initialised and saved as the trainer saves them."""
    from unif2ace_jax.data.images import num_values
    from unif2ace_jax.models.encoders import synthface_saved
    from unif2ace_jax.models.encoders.synthface_clip import make_clip_model
    from unif2ace_jax.models.encoders.synthface_face import make_face_model

    _, config = data
    root = tmp_path_factory.mktemp("enc_export")
    images = _images(1)
    face = make_face_model(config.face.model, num_values())
    clip = make_clip_model(config.clip.model, 50)
    dirs = {"face": str(root / "face"), "clip": str(root / "clip")}
    params = nn.meta.unbox(face.init(jax.random.key(0), images)["params"])
    synthface_saved.save_trained(dirs["face"], "face", config.face.model.to_dict(), params,
                                 num_values=list(num_values()))
    ids, lengths = np.ones((1, 8), np.int32), np.full((1,), 8, np.int32)
    params = nn.meta.unbox(clip.init(jax.random.key(1), images, ids, lengths)["params"])
    synthface_saved.save_trained(dirs["clip"], "clip", config.clip.model.to_dict(), params,
                                 vocab_size=50)
    return dirs


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Both tiny encoders trained by the trainer (6 steps each)."""
    from unif2ace_jax.train import encoders as enc_train

    data_dir, config = data
    root = tmp_path_factory.mktemp("enc_trained")
    dirs = {}
    for kind in ("face", "clip"):
        dirs[kind] = str(root / kind)
        assert enc_train.train(config, dirs[kind], kind) is not None
    return data_dir, dirs, config


@pytest.mark.slow
def test_trainers_write_loadable_encoders_and_metrics(trained):
    from unif2ace_jax.models.encoders import ENCODERS, load_encoder
    from unif2ace_jax.train.progress import read_metrics

    _, dirs, config = trained
    face_eval = json.load(open(os.path.join(dirs["face"], "eval.json")))
    assert 0.0 <= face_eval["attribute_accuracy"] <= 1.0 and face_eval["num_images"] == 8
    clip_eval = json.load(open(os.path.join(dirs["clip"], "eval.json")))
    assert clip_eval["num_pairs"] == 8 and 0.0 <= clip_eval["i2t_top1"] <= 1.0
    for kind in ("face", "clip"):
        records_ = read_metrics(dirs[kind])
        steps = [r["step"] for r in records_ if "loss" in r]
        assert steps == [2, 4, 6]
        name = f"synthface_{kind}"
        dim = config[kind].model.embed_dim
        assert ENCODERS.get(name).output_dim({"workdir": dirs[kind]}) == dim
        images = _images(3)
        pooled = load_encoder(name, {"workdir": dirs[kind]}).encode(images)
        tokens = load_encoder(name, {"workdir": dirs[kind], "output": "tokens"}).encode(images)
        # tiny image encoders: two stride-2 stages on 64 px -> a 16 x 16 grid of tokens
        assert pooled.shape == (3, dim) and tokens.shape == (3, 16 * 16, dim)


@pytest.mark.slow
def test_trainer_resumes_exactly(trained, tmp_path):
    from unif2ace_jax.models.encoders import synthface_saved
    from unif2ace_jax.train import encoders as enc_train

    _, dirs, config = trained
    assert enc_train.train(config, str(tmp_path), "face", stop_at=3) is None
    enc_train.train(config, str(tmp_path), "face")
    _, full, _ = synthface_saved.load_trained(dirs["face"])
    _, resumed, _ = synthface_saved.load_trained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full, resumed)


def test_prepare_matches_on_the_fly_features_and_resumes(data, exported, tmp_path, monkeypatch):
    from unif2ace_jax.data import records
    from unif2ace_jax.data.embeddings import compute_features, load_encoders, prepare_embeddings
    from unif2ace_jax.models.encoders.registry import LoadedEncoder

    data_dir, dirs = data[0], exported
    names, workdirs = ["synthface_face", "synthface_clip"], [dirs["face"], dirs["clip"]]
    before = sorted(os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs)
    out = str(tmp_path / "out")
    calls = {"n": 0}
    original = LoadedEncoder.encode

    def flaky(self, images):
        calls["n"] += isinstance(images, np.ndarray)  # not the shape probe (jax.eval_shape)
        if calls["n"] > 2:  # two encoders per batch: the second batch (of two) fails
            raise KeyboardInterrupt
        return original(self, images)

    monkeypatch.setattr(LoadedEncoder, "encode", flaky)
    kw = dict(out_data_dir=out, batch_size=4, chunk_batches=1, progress=False, splits=["test"])
    with pytest.raises(KeyboardInterrupt):
        prepare_embeddings(data_dir, "synthface", names, workdirs, **kw)
    work = os.path.join(out, ".derive_work", "synthface_emb")
    assert len([f for _, _, fs in os.walk(work) for f in fs if f.startswith("chunk_")]) == 1
    assert not os.path.exists(os.path.join(out, "synthface_emb"))
    monkeypatch.setattr(LoadedEncoder, "encode", original)
    path = prepare_embeddings(data_dir, "synthface", names, workdirs, **kw)
    assert sorted(os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs) == before
    src = records.load_builder(data_dir, "synthface").as_data_source("test")
    got = records.load_builder(out, "synthface_emb").as_data_source("test")
    images = np.stack([src[i]["image"] for i in range(len(src))])
    expected = compute_features(load_encoders(names, workdirs), images)
    assert set(expected) == {"face", "clip"}
    for i in range(len(src)):
        assert got[i]["caption"] == src[i]["caption"]
        np.testing.assert_array_equal(got[i]["image"], src[i]["image"])
        for field in ("face", "clip"):
            assert got[i][field].dtype == np.float32
            np.testing.assert_allclose(got[i][field], expected[field][i], rtol=1e-5, atol=1e-6)
    meta = json.load(open(os.path.join(path, "metadata.json")))["embeddings"]
    assert meta["fields"]["face"]["encoder"] == "synthface_face"


def test_bad_encoder_input_gives_user_errors(exported, tmp_path):
    from unif2ace_jax.data.embeddings import compute_features, load_encoders
    from unif2ace_jax.models.encoders import load_encoder

    dirs = exported
    with pytest.raises(UserError, match="unknown encoder 'nope'"):
        load_encoders(["nope"], [dirs["face"]])
    with pytest.raises(UserError, match="not found"):
        load_encoders(["synthface_face"], [str(tmp_path / "missing")])
    with pytest.raises(UserError, match="not a trained SynthFace encoder"):
        load_encoder("synthface_face", {"workdir": str(tmp_path)})
    with pytest.raises(UserError, match="not synthface_face"):
        load_encoder("synthface_face", {"workdir": dirs["clip"]})
    with pytest.raises(UserError, match="1 encoders but 2"):
        load_encoders(["synthface_face"], [dirs["face"], dirs["clip"]])
    with pytest.raises(UserError, match="uint8"):
        compute_features(load_encoders(["synthface_face"], [dirs["face"]]),
                         np.zeros((1, 64, 64, 3), np.float32))


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, message", [
    (("unif2ace_jax.train.encoders", "--kind=face"), "--workdir is required"),
    (("unif2ace_jax.train.encoders", "--kind=eyes", "--workdir=/tmp/x"), "unknown encoder kind"),
    (("unif2ace_jax.data.embeddings", "--data_dir=/tmp", "--dataset=synthface",
      "--encoders=nope", "--encoder_workdirs=/tmp"), "unknown encoder 'nope'"),
])
def test_cli_errors_are_one_line(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
