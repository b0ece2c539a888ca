"""A sharded train step on 8 fake CPU devices equals the single-device step.

Meshes: ``fsdp=4, tensor=2`` (parameters split two ways, batch four ways) and ``data=8``. The
same model, initial parameters, batch and step key go through `train.make_train_step` on each
mesh; loss, metrics and the updated parameters must agree to float tolerance after two steps.
"""

import json

import pytest

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np, ml_collections
from unif2ace_jax.models.backbone import default_config as default_model_config
from unif2ace_jax.models.unified import build_model
from unif2ace_jax.parallel.mesh import make_mesh
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.losses.unified import default_config as default_loss_config
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.train.train import make_train_step, to_global

assert jax.device_count() == 8
cfg = default_model_config()
cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn.hidden = 32, 4, 2, 64
cfg.vocab_pad_to_multiple = 8
model = build_model(cfg, text_vocab_size=50, num_image_codes=16, image_grid=3)
optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, weight_decay=0.01, grad_clip=1.0))
tx, schedule = make_optimizer(optim, 10)
loss_cfg = default_loss_config()
loss_cfg.cond_dropout = 0.5

rng = np.random.default_rng(0)
B, LT, LA = 8, 6, 2
batches = []
for _ in range(2):
    batches.append({
        "task": np.array([0, 1, 2, 0, 1, 0, 2, 1], np.int32),
        "text": rng.integers(0, 50, (B, LT)).astype(np.int32),
        "text_len": rng.integers(1, LT + 1, (B,)).astype(np.int32),
        "answer": rng.integers(0, 50, (B, LA)).astype(np.int32),
        "answer_len": rng.integers(1, LA + 1, (B,)).astype(np.int32),
        "image_codes": rng.integers(0, 16, (B, 9)).astype(np.int32),
        "valid": np.ones((B,), bool),
    })

def run(mesh_cfg, devices):
    mesh = make_mesh(mesh_cfg, devices=devices)
    rules = rules_lib.get_rules()
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, jax.random.key(3))
    bs = {k: rules_lib.batch_sharding(mesh, rules, v.ndim) for k, v in batches[0].items()}
    step = make_train_step(model, tx, schedule, loss_cfg, shardings, bs, mesh, rules, seed=7)
    out = []
    for b in batches:
        state, metrics = step(state, to_global(b, bs))
        out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    spec = {"/".join(str(p) for p in path): str(s.spec)
            for path, s in jax.tree_util.tree_leaves_with_path(shardings["params"])}
    params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    return out, params, spec

ref_metrics, ref_params, _ = run({}, jax.devices()[:1])
result = {}
for name, mesh_cfg in (("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}), ("data8", {"data": 8})):
    metrics, params, spec = run(mesh_cfg, jax.devices())
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         params, ref_params))
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(ref_params))
    moved = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), params,
        jax.tree.map(np.zeros_like, params))))
    result[name] = {"metrics": metrics, "max_param_diff": max(diffs), "scale": scale,
                    "specs": spec}
result["ref"] = ref_metrics
print("RESULT" + json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_step_matches_single_device(multidevice):
    out = multidevice(CODE)
    result = json.loads(out.split("RESULT", 1)[1])
    ref = result["ref"]
    assert len(ref) == 2 and ref[0]["loss"] > 0
    for name in ("fsdp4_tensor2", "data8"):
        got = result[name]
        for step_ref, step_got in zip(ref, got["metrics"]):
            for key in ("loss", "mask_ce", "score_entropy", "mmu_loss", "lm_loss", "grad_norm"):
                assert step_got[key] == pytest.approx(step_ref[key], rel=2e-5, abs=1e-6), (
                    name, key)
        assert got["max_param_diff"] < 1e-5 * max(1.0, got["scale"]), name
    # The fsdp/tensor mesh really splits parameters (else the comparison would be vacuous).
    specs = result["fsdp4_tensor2"]["specs"]
    assert any("tensor" in s for s in specs.values())
    assert any("fsdp" in s for s in specs.values())
