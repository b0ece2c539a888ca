"""The SynthFace attribute judge: model, loss, scoring, trainer (+ resume) and CLI errors."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unif2ace_jax.data import synthface
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate import judge as judge_eval
from unif2ace_jax.models.judge import AttributeJudge, judge_loss, value_mask

NUM_VALUES = (3, 5, 2)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def _model(**kw) -> AttributeJudge:
    return AttributeJudge(num_values=NUM_VALUES, resolution=32, widths=(8, 16), blocks_per_stage=2,
                          hidden=16, **kw)


def test_value_mask_matches_a_loop():
    mask = value_mask(NUM_VALUES)
    assert mask.shape == (3, 5)
    for a, n in enumerate(NUM_VALUES):
        for k in range(5):
            assert mask[a, k] == (k < n)


@pytest.fixture(scope="module")
def boxed_params():
    """Initialised once per module (random initialisers compile slowly on a busy CPU)."""
    return jax.jit(_model().init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))["params"]


@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes_and_padding(size, boxed_params):
    model = _model()
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    logits = model.apply({"params": nn.meta.unbox(boxed_params)}, images)
    assert logits.shape == (2, 3, 5) and logits.dtype == jnp.float32
    assert np.all(np.asarray(logits)[:, ~value_mask(NUM_VALUES)] <= -1e8)
    assert np.all(np.isfinite(np.asarray(logits)[:, value_mask(NUM_VALUES)]))


def test_every_parameter_has_logical_names(boxed_params):
    leaves = jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert any(n is not None for n in leaf.names)


def test_judge_loss_matches_numpy():
    rng = np.random.default_rng(1)
    mask = value_mask(NUM_VALUES)
    logits = np.where(mask, rng.normal(size=(4, 3, 5)), -1e9).astype(np.float32)
    labels = np.array([[0, 4, 1], [2, -1, 0], [-1, -1, -1], [1, 2, -1]], np.int32)
    loss, aux = judge_loss(jnp.asarray(logits), jnp.asarray(labels))
    nll, hits, counts = [], np.zeros(3), np.zeros(3)
    for b in range(4):
        for a, n in enumerate(NUM_VALUES):
            if labels[b, a] < 0:
                continue
            z = logits[b, a, :n].astype(np.float64)
            nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[b, a]])
            hits[a] += int(np.argmax(z) == labels[b, a])
            counts[a] += 1
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), hits.sum() / counts.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["attribute_accuracy"]), hits / counts, rtol=1e-6)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(boxed_params):
    model = _model()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.stack([rng.integers(0, n, 8) for n in NUM_VALUES], axis=1).astype(np.int32)
    params = nn.meta.unbox(boxed_params)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(
            lambda p: judge_loss(model.apply({"params": p}, images), labels)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(30):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_random_shift_is_an_edge_padded_translation():
    from unif2ace_jax.train.judge import random_shift

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    shifted = np.asarray(random_shift(jnp.asarray(images), jax.random.key(1), 2))
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    offsets = []
    for im, out in zip(images, shifted):
        padded = np.pad(im, ((2, 2), (2, 2), (0, 0)), mode="edge")
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(padded[dy:dy + 10, dx:dx + 12], out)]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # each image gets its own shift
    np.testing.assert_array_equal(np.asarray(random_shift(jnp.asarray(images), None, 0)), images)


# --------------------------------------------------------------------------- scoring


def test_score_labels_matches_a_direct_comparison():
    rng = np.random.default_rng(3)
    names = list(synthface.ATTRIBUTES)
    n, a = 50, len(names)
    targets = np.stack([rng.integers(-1, len(v), n) for v in synthface.ATTRIBUTES.values()], 1)
    targets[:, 4] = -1  # one attribute never mentioned
    predicted = np.where(rng.random((n, a)) < 0.7, targets, 0)
    result = judge_eval.score_labels(predicted, targets)
    per = {}
    for j, name in enumerate(names):
        pairs = [(predicted[i, j], targets[i, j]) for i in range(n) if targets[i, j] >= 0]
        if pairs:
            per[name] = sum(p == t for p, t in pairs) / len(pairs)
            assert result[name] == pytest.approx(per[name])
    assert names[4] not in result
    assert result["mean"] == pytest.approx(np.mean(list(per.values())))
    scored = targets >= 0
    assert result["micro"] == pytest.approx((predicted == targets)[scored].mean())
    assert result["num_images"] == n and result["num_scored"] == scored.sum()


class _FixedJudge(judge_eval.Judge):
    """A judge whose predictions are given (to test scoring without a trained model)."""

    def __init__(self, predictions: np.ndarray):
        self.names = tuple(synthface.ATTRIBUTES)
        self.values = tuple(synthface.ATTRIBUTES.values())
        self._predictions = predictions

    def predict_labels(self, images):
        return self._predictions[: len(images)]


def test_judge_score_with_partial_attribute_dicts():
    names = list(synthface.ATTRIBUTES)
    values = list(synthface.ATTRIBUTES.values())
    predictions = np.zeros((3, len(names)), np.int32)
    predictions[1, 0] = 1
    judge = _FixedJudge(predictions)
    attributes = [{names[0]: values[0][0], names[1]: values[1][1]},  # right, wrong
                  {names[0]: values[0][0]},  # wrong (predicted index 1)
                  {names[1]: values[1][0], names[2]: values[2][0]}]  # right, right
    result = judge.score(np.zeros((3, 8, 8, 3), np.uint8), attributes)
    assert result[names[0]] == pytest.approx(0.5)
    assert result[names[1]] == pytest.approx(0.5)
    assert result[names[2]] == pytest.approx(1.0)
    assert set(names[3:]).isdisjoint(result)
    assert result["mean"] == pytest.approx(2 / 3)
    assert result["micro"] == pytest.approx(3 / 5)
    predicted = judge.predict(np.zeros((3, 8, 8, 3), np.uint8))
    assert predicted[names[0]] == [values[0][0], values[0][1], values[0][0]]
    with pytest.raises(UserError, match="unknown value"):
        judge.score(np.zeros((1, 8, 8, 3), np.uint8), [{names[0]: "plaid"}])
    with pytest.raises(UserError, match="unknown attribute"):
        judge.score(np.zeros((1, 8, 8, 3), np.uint8), [{"tail": "long"}])
    with pytest.raises(UserError, match="2 images but 1"):
        judge.score(np.zeros((2, 8, 8, 3), np.uint8), [{}])


# --------------------------------------------------------------------------- trainer + CLI


def _tiny_config():
    sys.path.insert(0, CONFIGS)
    try:
        import judge_synthface
    finally:
        sys.path.pop(0)
    return judge_synthface.get_config("tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny judge trained 6 steps in one go, and one stopped at step 3 then resumed."""
    from unif2ace_jax.train import judge as judge_train
    from unif2ace_jax.train.progress import read_metrics

    root = tmp_path_factory.mktemp("judge")
    full, split = str(root / "full"), str(root / "split")
    judge_train.train(_tiny_config(), full)
    judge_train.train(_tiny_config(), split, stop_at=3)
    first_half = json.loads(json.dumps(read_metrics(split)))
    result = judge_train.train(_tiny_config(), split)
    return full, split, first_half, result


@pytest.mark.slow
def test_trainer_resumes_exactly(trained):
    from unif2ace_jax.train.progress import read_metrics

    full, split, first_half, result = trained
    assert max(r["step"] for r in first_half) == 3
    a, b = judge_eval.load_judge(full), judge_eval.load_judge(split)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    losses_full = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    losses_split = {r["step"]: r["loss"] for r in read_metrics(split) if "loss" in r}
    assert sorted(losses_full) == [2, 4, 6]
    for step in (2, 4, 6):
        assert losses_split[step] == pytest.approx(losses_full[step], rel=1e-5)
    assert 0.0 <= result["mean"] <= 1.0 and result["num_images"] == 16


@pytest.mark.slow
def test_loaded_judge_predicts_on_other_sizes(trained):
    judge = judge_eval.load_judge(trained[0])
    exs = list(synthface.generate(0, 3, image_size=128, split="test"))
    images = np.stack([e["image"] for e in exs])
    predicted = judge.predict(images)
    assert set(predicted) == set(synthface.ATTRIBUTES)
    for name, values in predicted.items():
        assert len(values) == 3 and all(v in synthface.ATTRIBUTES[name] for v in values)
    result = judge.score(images, [e["attributes"] for e in exs])
    direct = judge.predict_attributes(images)
    for name in synthface.ATTRIBUTES:
        want = np.mean([direct[i][name] == exs[i]["attributes"][name] for i in range(3)])
        assert result[name] == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.multidevice
def test_data_parallel_training_matches_one_device(trained, multidevice, tmp_path):
    out = multidevice(f"""
        import os, sys
        import numpy as np, jax
        sys.path.insert(0, {CONFIGS!r})
        import judge_synthface
        from unif2ace_jax.train import judge as judge_train
        from unif2ace_jax.evaluate.judge import load_judge
        assert jax.device_count() == 8
        judge_train.train(judge_synthface.get_config("tiny"), {str(tmp_path / "dp")!r})
        params = load_judge({str(tmp_path / "dp")!r}).params
        np.savez({str(tmp_path / "dp.npz")!r}, *[np.asarray(x) for x in jax.tree.leaves(params)])
        print("mesh-ok")
    """)
    assert "mesh-ok" in out and "'data': 8" in out
    single = jax.tree.leaves(judge_eval.load_judge(trained[0]).params)
    with np.load(tmp_path / "dp.npz") as sharded:
        for i, x in enumerate(single):
            np.testing.assert_allclose(sharded[f"arr_{i}"], np.asarray(x), rtol=1e-4, atol=1e-5)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          cwd=os.path.join(os.path.dirname(__file__), ".."), timeout=300)


@pytest.mark.slow
def test_evaluate_cli_scores_a_split(trained, tmp_path):
    proc = _cli("unif2ace_jax.evaluate.judge", f"--workdir={trained[0]}",
                "--split=test_heldout_combos", "--num=8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_images"] == 8 and result["split"] == "test_heldout_combos"
    assert set(synthface.ATTRIBUTES) <= set(result)

    exs = list(synthface.generate(1, 4, image_size=64, split="test"))
    np.savez(tmp_path / "faces.npz", images=np.stack([e["image"] for e in exs]))
    (tmp_path / "attrs.json").write_text(json.dumps([{"hair_color": e["attributes"]["hair_color"]}
                                                     for e in exs]))
    proc = _cli("unif2ace_jax.evaluate.judge", f"--workdir={trained[0]}",
                f"--images={tmp_path / 'faces.npz'}", f"--attributes={tmp_path / 'attrs.json'}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_scored"] == 4 and set(result) & set(synthface.ATTRIBUTES) == {"hair_color"}


@pytest.mark.parametrize("args, message", [
    (("unif2ace_jax.evaluate.judge", "--workdir=/nonexistent/judge"), "does not exist"),
    (("unif2ace_jax.evaluate.judge",), "--workdir is required"),
    (("unif2ace_jax.train.judge", "--config=configs/judge_synthface.py"), "--workdir is required"),
    (("unif2ace_jax.train.judge", "--config=configs/judge_synthface.py", "--workdir=/tmp/x",
      "--config.train.nope=1"), "nope"),
])
def test_cli_errors_are_one_line(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_evaluate_cli_without_a_trained_judge(tmp_path):
    proc = _cli("unif2ace_jax.evaluate.judge", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and "no trained judge" in proc.stderr
