"""The script both sharded train-step tests run on 8 fake CPU devices (`multidevice`).

`sharded_step_script(model, meshes)` builds it: `model` (Python lines) sets the model config
``cfg``'s fields after ``cfg = default_model_config()``; `meshes` is a Python tuple of
``(name, mesh config)``. The script runs two train steps on one device and on each mesh and
prints ``RESULT`` + JSON: per mesh ``metrics``, ``max_param_diff``, ``scale``, ``specs``; and
``ref`` (the single-device metrics).
"""

_HEAD = r"""
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
"""

_TAIL = r"""cfg.vocab_pad_to_multiple = 8
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
for name, mesh_cfg in {meshes}:
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


def sharded_step_script(model: str, meshes: str) -> str:
    return _HEAD + model + _TAIL.replace("{meshes}", meshes)
