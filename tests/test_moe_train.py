"""The MoE ablation settings train end to end; aux losses reach the objective; routing diagnostics.

`configs/synthface_tiny.py:tiny,moe=both` needs records with the seq-MoE's "clip" / "face"
features; the test derives them from the tiny environment's dataset (an 8x8 grey thumbnail and
per-channel statistics stand in for the frozen encoders' embeddings).
"""

import functools
import json
import os

import numpy as np
import pytest

import unified_env
from unif2ace_jax.evaluate import routing
from unif2ace_jax.train.progress import read_metrics

FEATURE_DIM = 64  # configs/synthface_tiny.py TINY_FEATURE_DIM


@functools.lru_cache(maxsize=None)
def feature_dataset() -> str:
    """``synthface_codes_feats``: the env's code records + float32 ``clip`` / ``face`` [64]."""
    import tensorflow_datasets as tfds

    from unif2ace_jax.data import records
    from unif2ace_jax.data.derive import derive_dataset
    from unif2ace_jax.data.images import resize_image

    env = unified_env.build_env()

    def compute(batch):
        images = np.asarray(batch["image"], np.float32) / 255.0
        thumbs = np.stack([resize_image(im, 8) for im in batch["image"]]).astype(np.float32)
        clip = thumbs.mean(-1).reshape(len(images), -1) / 255.0
        stats = np.concatenate([images.mean((1, 2)), images.std((1, 2))], -1)  # [B, 6]
        face = np.tile(stats, (1, FEATURE_DIM // 6 + 1))[:, :FEATURE_DIM]
        return {"clip": clip.astype(np.float32), "face": face.astype(np.float32)}

    feature = tfds.features.Tensor(shape=(FEATURE_DIM,), dtype=np.float32)
    derive_dataset(records.load_builder(env["data_dir"], "synthface_codes"), env["data_dir"],
                   "synthface_codes_feats", {"clip": feature, "face": feature}, compute,
                   batch_size=8, progress=False)
    return env["data_dir"]


def _cli_args(variant: str, workdir: str, dataset: str) -> list[str]:
    env = unified_env.build_env()
    return [f"--config=configs/synthface_tiny.py:{variant}", f"--workdir={workdir}",
            f"--config.data.data_dir={env['data_dir']}", f"--config.data.dataset={dataset}",
            f"--config.data.tokenizer.model_path={env['text_model']}",
            f"--config.tokenizer_workdir={env['tok_dir']}",
            f"--config.judge_workdir={env['judge_dir']}",
            f"--config.model.num_image_codes={env['num_codes']}",
            f"--config.model.image_grid={env['grid']}", "--config.total_steps=2",
            "--config.log_every=1", "--config.ckpt_every=2"]


@functools.lru_cache(maxsize=None)
def moe_both_run() -> str:
    feature_dataset()
    workdir = os.path.join(unified_env.build_env()["root"], "run_moe_both")
    proc = unified_env.run_module("unif2ace_jax.train",
                                  *_cli_args("tiny,moe=both", workdir, "synthface_codes_feats"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_cli_trains_moe_both_and_aux_losses_reach_the_objective():
    workdir = moe_both_run()
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    parts = ("aux/balance_und", "aux/balance_gen", "aux/router_z", "aux/seq_moe_balance")
    for r in records:
        for key in parts:
            assert r[key] > 0, (key, r)
        # Top-k balance losses lie in [k, E] times their weight (0.01; k = 4, E = 8), summed
        # over the 2 layers.
        for key in ("aux/balance_gen", "aux/balance_und"):
            assert 2 * 0.01 * 4 * 0.999 <= r[key] <= 2 * 0.01 * 8 * 1.001, (key, r[key])
        assert r["aux_loss"] == pytest.approx(sum(r[k] for k in parts), rel=1e-5)
        data_loss = r["t2i_loss"] + r["mmu_loss"] + 0.1 * r["lm_loss"]
        assert r["loss"] == pytest.approx(data_loss + r["aux_loss"], rel=1e-5, abs=1e-6)
    with open(os.path.join(workdir, "run.json")) as f:
        run = json.load(f)
    assert run["config"]["model"]["ffn"]["name"] == "token_moe"
    assert run["feature_shapes"]["clip"]["shape"] == [1, FEATURE_DIM]


@pytest.mark.slow
def test_routing_diagnostics_of_a_trained_moe_run(tmp_path):
    from unif2ace_jax.checkpoint.trained import load_trained

    trained = load_trained(moe_both_run())
    assert routing.has_moe(trained.model)
    path = str(tmp_path / "routing.png")
    stats = routing.routing_diagnostics(trained, "test", max_sequences=6, batch_size=4,
                                        figure_path=path)
    layers = trained.config.model.num_layers
    assert stats["num_sequences"] == {"und": 6, "gen": 6}
    token = stats["token_moe"]
    assert token["experts_per_group"] == 8
    for g in ("und", "gen"):
        fractions = np.asarray(token[g])
        assert fractions.shape == (layers, 8)
        np.testing.assert_allclose(fractions.sum(1), 1.0, rtol=1e-6)
        assert token[f"{g}_copies"] % 4 == 0  # top-4 copies of every valid token
        picks = np.asarray(stats["seq_moe"][g]["pick_fraction"])
        assert picks.shape == (layers, 4)
        np.testing.assert_allclose(picks.sum(1), 2.0, rtol=1e-6)  # top-2 per sequence
    assert stats["seq_moe"]["und"]["experts"] == ["copy", "copy", "clip", "face"]
    from PIL import Image

    with Image.open(stats["figure"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    json.dumps(stats)  # JSON-ready


@pytest.mark.slow
def test_evaluate_reports_routing_for_moe_models(tmp_path):
    """moe=both with the clip / face experts off: needs no feature records."""
    from unif2ace_jax.evaluate.unified import evaluate

    workdir = str(tmp_path / "run")
    proc = unified_env.run_module("unif2ace_jax.train", *_cli_args(
        "tiny,moe=both,off=clip+face", workdir, "synthface_codes"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = evaluate(workdir, "test", num_generate=0, max_questions=4, max_nelbo_images=4,
                      batch_size=4)
    assert 0.0 <= result["vqa_accuracy"] <= 1.0
    r = result["routing"]
    assert os.path.isfile(r["figure"]) and os.path.dirname(r["figure"]) == workdir
    assert r["seq_moe"]["und"]["experts"] == ["copy", "copy", "zero", "zero"]
    # zero experts of the und group: their columns can still be picked, each sequence picks 2.
    np.testing.assert_allclose(np.asarray(r["seq_moe"]["gen"]["pick_fraction"]).sum(1), 2.0)


def test_routing_counter_matches_hand_counts():
    """Per-layer fractions from sown counts of two batches, against a hand computation."""
    import jax.numpy as jnp

    from unif2ace_jax.models.backbone import default_config as default_model_config
    from unif2ace_jax.models.unified import build_model

    cfg = default_model_config()
    cfg.ffn = dict(name="token_moe", num_routed=2, top_k=1, routed_hidden=4, shared_hidden=4)
    cfg.seq_moe = dict(name="grouped_seq_moe", groups=dict(und=["copy", "zero"],
                                                           gen=["copy", "zero", "copy"]),
                       experts={}, top_k=1)
    model = build_model(cfg, text_vocab_size=10, num_image_codes=4, image_grid=1)
    counter = routing.RoutingCounter(model)
    # Scanned layout: leaves [layers=2, ...]; und experts 0-1, gen 2-3; seq columns 2 + 3.
    batch1 = {"layers": {"mlp": {"expert_counts": (jnp.array([[3, 1, 0, 4], [2, 2, 1, 3]]),)},
                         "seq_moe": {"seq_moe_usage": (jnp.array([[1., 0, 1, 0, 0],
                                                                  [0., 1, 0, 0, 1]]),)}}}
    counter.add(batch1, np.array([0, 1, 1]), np.array([True, True, False]))
    counter.add(batch1, np.array([0]), np.array([True]))
    out = counter.result()
    assert out["num_sequences"] == {"und": 2, "gen": 1}
    np.testing.assert_allclose(out["token_moe"]["und"], [[6 / 8, 2 / 8], [4 / 8, 4 / 8]])
    np.testing.assert_allclose(out["token_moe"]["gen"], [[0, 1], [2 / 8, 6 / 8]])
    np.testing.assert_allclose(out["seq_moe"]["und"]["pick_fraction"], [[1, 0], [0, 1]])
    np.testing.assert_allclose(out["seq_moe"]["gen"]["pick_fraction"], [[2, 0, 0], [0, 0, 2]])
    assert out["seq_moe"]["gen"]["experts"] == ["copy", "zero", "copy"]
    path = routing.draw_routing_figure(out, os.path.join(unified_env.ROOT, ".pytest_routing.png"))
    try:
        assert os.path.getsize(path) > 0
    finally:
        os.remove(path)
