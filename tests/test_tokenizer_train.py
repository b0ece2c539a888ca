"""Tokenizer trainer: a few steps lower the loss, the GAN step, exact resume, the exported
tokenizer and the evaluation command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax import cli
from unif2ace_jax.data import synthface
from unif2ace_jax.evaluate.tokenizer import evaluate_params
from unif2ace_jax.losses import tokenizer as tok_losses
from unif2ace_jax.models.tokenizer.pretrained import load_tokenizer
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train import tokenizer as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**loss):
    config = cli.load_config(os.path.join(ROOT, "configs", "tokenizer_synthface_64.py"), "tiny")
    config.loss.update(loss)
    return config


def _setup(config):
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules()
    parts = trainer.build(config)
    state, shardings = trainer.init_state(parts, mesh, rules, config.data.image_size,
                                          jax.random.key(0))
    image_sharding = rules_lib.batch_sharding(mesh, rules, 4)
    return parts, state, shardings, image_sharding


def _faces(n, size):
    return np.stack([ex["image"] for ex in synthface.generate(0, n, size, "train")])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    config = tiny_config()
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 1
    config.train.steps = 1000  # long cosine: the lr stays near its peak for these steps
    parts, state, shardings, image_sharding = _setup(config)
    step = trainer.make_train_step(parts, config.loss, shardings, image_sharding, with_gan=False)
    images = jnp.asarray(_faces(4, config.data.image_size))

    def loss_of(params):
        loss, (metrics, _) = trainer.tokenizer_loss(
            parts.model, params, images.astype(jnp.float32) / 127.5 - 1.0, config.loss)
        return float(loss), float(metrics["l1"])

    loss0, l1_0 = loss_of(state["params"])
    for _ in range(12):
        state, metrics = step(state, images)
        assert np.isfinite(float(metrics["loss"]))
    loss1, l1_1 = loss_of(state["params"])
    assert int(state["step"]) == 12
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert l1_1 < l1_0, (l1_0, l1_1)


def test_gan_step_trains_the_discriminator():
    config = tiny_config(gan=0.1, gan_start_step=0)
    parts, state, shardings, image_sharding = _setup(config)
    assert parts.disc is not None and "disc_params" in state
    before = jax.tree.map(np.asarray, state["disc_params"])
    step = trainer.make_train_step(parts, config.loss, shardings, image_sharding, with_gan=True)
    images = jnp.asarray(_faces(4, config.data.image_size))
    state, metrics = step(state, images)
    for key in ("d_loss", "g_loss", "logits_real", "logits_fake"):
        assert np.isfinite(float(metrics[key]))
    # hinge loss of a fresh discriminator is close to 2 (logits near 0)
    assert 1.0 < float(metrics["d_loss"]) < 3.0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                           state["disc_params"])
    assert any(jax.tree.leaves(changed))


def test_generator_loss_matches_its_parts():
    config = tiny_config(entropy=0.3, commitment=0.5, l1=2.0, l2=0.5)
    parts, state, _, _ = _setup(config)
    x = jnp.asarray(_faces(2, config.data.image_size)).astype(jnp.float32) / 127.5 - 1.0
    loss, (metrics, recon) = trainer.tokenizer_loss(parts.model, state["params"], x, config.loss)
    out = parts.model.apply({"params": state["params"]}, x)
    np.testing.assert_allclose(recon, out["recon"], rtol=1e-5, atol=1e-5)
    ent = tok_losses.lfq_entropy_loss(out["latents"])
    expected = (2.0 * np.abs(np.asarray(recon - x)).mean() + 0.5 * np.square(np.asarray(recon - x)).mean()
                + 0.3 * float(ent) + 0.5 * float(tok_losses.commitment_loss(out["latents"],
                                                                           out["quantized"])))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["sample_entropy"] - metrics["batch_entropy"]) == pytest.approx(
        float(ent), rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tokenizer trained straight through 4 steps, and one interrupted at 2 and resumed."""
    config = tiny_config()
    config.train.steps = 4
    config.train.checkpoint_every = 2
    config.train.eval_examples = 0
    straight = str(tmp_path_factory.mktemp("straight"))
    trainer.train(config, straight)
    resumed = str(tmp_path_factory.mktemp("resumed"))
    trainer.train(config, resumed, stop_at=2)
    assert load_tokenizer(resumed).step == 2
    # exported at the checkpoint, but not completed: no summary (the main job's "done" marker)
    assert not os.path.exists(os.path.join(resumed, trainer.TRAIN_SUMMARY))
    trainer.train(config, resumed)
    return config, straight, resumed


def test_resume_is_exact(trained):
    _, straight, resumed = trained
    a, b = load_tokenizer(straight), load_tokenizer(resumed)
    assert a.step == b.step == 4
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4]
    assert all(r["img_per_s"] > 0 for r in lines if "loss" in r)
    assert os.path.isfile(os.path.join(straight, "images", "recon_000004.png"))
    for workdir in (straight, resumed):
        with open(os.path.join(workdir, trainer.TRAIN_SUMMARY)) as f:
            assert json.load(f)["step"] == 4


def test_exported_tokenizer_and_evaluation(trained):
    config, workdir, _ = trained
    tok = load_tokenizer(workdir)
    images = _faces(3, config.data.image_size)
    codes, recon = tok.reconstruct(images)
    assert codes.shape == (3, tok.grid_size, tok.grid_size) and codes.dtype == np.int32
    assert recon.shape == images.shape and recon.dtype == np.uint8
    data = trainer._eval_data_config(config, 10)
    result = evaluate_params(tok.model, tok.params, data, "test", batch_size=4)
    # references computed here from the same reconstructions
    test_images = np.stack([ex["image"] for ex in synthface.generate(0, 10, 32, "test")])
    codes, recon = tok.reconstruct(test_images)
    mse = ((test_images.astype(np.float64) - recon) ** 2).reshape(10, -1).mean(-1)
    assert result["psnr"] == pytest.approx(np.mean(10 * np.log10(255.0 ** 2 / mse)), rel=1e-4)
    counts = np.bincount(codes.reshape(-1), minlength=tok.codebook_size)
    assert result["code_usage"] == pytest.approx((counts > 0).mean())
    assert result["num_images"] == 10 and result["num_tokens"] == counts.sum()


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_evaluate_cli_prints_json(trained):
    _, workdir, _ = trained
    proc = _run("unif2ace_jax.evaluate.tokenizer", f"--workdir={workdir}", "--split=test",
                "--num=6", "--batch_size=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["num_images"] == 6 and result["step"] == 4
    assert {"psnr", "code_usage", "code_perplexity"} <= set(result)


@pytest.mark.parametrize("module, args, message", [
    ("unif2ace_jax.train.tokenizer", ("--config=configs/tokenizer_synthface_64.py:tiny",),
     "--workdir is required"),
    ("unif2ace_jax.evaluate.tokenizer", ("--workdir=/nonexistent/tok",), "does not exist"),
])
def test_cli_errors_are_one_line(module, args, message):
    proc = _run(module, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


SHARDED_CODE = """
import json
import jax, numpy as np
from unif2ace_jax.cli import load_config
from unif2ace_jax.data import synthface
from unif2ace_jax.parallel import mesh as mesh_lib, rules as rules_lib
from unif2ace_jax.train import tokenizer as trainer

config = load_config(CONFIG_PATH, "tiny")
config.loss.gan = 0.1
images = np.stack([ex["image"] for ex in synthface.generate(0, 8, 32, "train")])

def run(devices):
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = rules_lib.get_rules()
    parts = trainer.build(config)
    state, shardings = trainer.init_state(parts, mesh, rules, 32, jax.random.key(0))
    sharding = rules_lib.batch_sharding(mesh, rules, 4)
    plain = trainer.make_train_step(parts, config.loss, shardings, sharding, with_gan=False)
    gan = trainer.make_train_step(parts, config.loss, shardings, sharding, with_gan=True)
    batch = jax.device_put(images, sharding)
    state, m1 = plain(state, batch)
    state, m2 = gan(state, batch)
    return (jax.tree.map(np.asarray, state), float(m1["loss"]), float(m2["d_loss"]),
            float(m1["grad_norm"]), float(m2["grad_norm"]))

one = run(jax.devices()[:1])
eight = run(jax.devices())
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(eight[0])))
print(json.dumps({"diff": diff, "loss": [one[1], eight[1]], "d_loss": [one[2], eight[2]],
                  "grad_norm": [[one[3], eight[3]], [one[4], eight[4]]]}))
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_step_matches_single_device(multidevice):
    """Data parallel over 8 devices (batch-mean entropy, GroupNorm, GAN step) == one device."""
    path = os.path.join(ROOT, "configs", "tokenizer_synthface_64.py")
    code = f"CONFIG_PATH = {path!r}\n" + SHARDED_CODE
    out = json.loads(multidevice(code).strip().splitlines()[-1])
    assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-5)
    assert out["d_loss"][0] == pytest.approx(out["d_loss"][1], rel=1e-5)
    for a, b in out["grad_norm"]:
        assert a == pytest.approx(b, rel=1e-4)
    assert out["diff"] < 1e-4  # Adam updates are ~5e-4 here; float reduction order differs
