"""Trains the SynthFace attribute judge.

    python -m unif2ace_jax.train.judge --config=configs/judge_synthface.py --workdir=DIR

Data parallel over the mesh of `config.mesh` (parameters laid out by the logical rules, which
replicate conv and classifier weights by default). Writes `DIR/metrics.jsonl`, Orbax checkpoints
under `DIR/checkpoints` (train state + data-iterator position: a restarted run continues exactly),
and at the end the judge itself (`DIR/judge_params.msgpack`, `DIR/judge_config.json`), which
`unif2ace_jax.evaluate.judge.load_judge(DIR)` loads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.data import images as images_lib
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.judge import AttributeJudge, judge_loss, make_judge
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train.optim import make_optimizer
from unif2ace_jax.train.progress import MetricsLogger, format_duration


def init_state(model: AttributeJudge, tx: optax.GradientTransformation, mesh: Mesh,
               rules: rules_lib.Rules, image_shape: tuple[int, ...], rng: jax.Array
               ) -> tuple[dict, Any]:
    """The train state {"step", "params", "opt_state"} laid out on `mesh`, and its shardings.

    Shapes come from `jax.eval_shape` (nothing is materialised twice); the jitted init writes
    each array directly in its sharding.
    """
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)

    def boxed_init(key):
        params = model.init(key, dummy)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(boxed_init, rng)
    shardings = rules_lib.logical_shardings(abstract, mesh, rules)
    state = jax.jit(lambda key: nn.meta.unbox(boxed_init(key)), out_shardings=shardings)(rng)
    return state, shardings


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by its own random (dy, dx) in [-max_shift, max_shift]^2.

    images: [B, H, W, C]; borders are filled by repeating the edge pixels. Returns [B, H, W, C].
    """
    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    m = int(max_shift)
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * m + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)


def make_train_step(model: AttributeJudge, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, state_shardings: Any, batch_shardings: Any,
                    *, augment_shift: int = 0, seed: int = 0):
    """jit(state, batch) -> (state, metrics); the input state's buffers are donated.

    With `augment_shift` > 0 every image is randomly translated by up to that many pixels
    (the randomness depends only on (seed, step), so a resumed run repeats it exactly).
    """

    def step_fn(state, batch):
        images = batch["image"]
        if augment_shift:
            key = jax.random.fold_in(jax.random.key(seed), state["step"])
            images = random_shift(images, key, augment_shift)

        def loss_fn(params):
            logits = model.apply({"params": params}, images)
            return judge_loss(logits, batch["labels"])

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "acc": aux["accuracy"], "lr": schedule(state["step"]),
                   "grad_norm": optax.global_norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    replicated = NamedSharding(next(iter(jax.tree.leaves(state_shardings))).mesh,
                               jax.sharding.PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def _global_batch(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in local.items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
          ) -> dict | None:
    """Trains (or resumes) the judge in `workdir`; returns the final eval metrics.

    `stop_at` ends the run after that step with a checkpoint, as a preemption would (returns
    None; running again resumes).
    """
    from unif2ace_jax.evaluate import judge as judge_eval  # the saved-judge format lives there

    steps = int(config.train.steps)
    global_batch = int(config.train.batch_size)
    if steps <= 0 or global_batch <= 0:
        raise UserError(f"train.steps and train.batch_size must be positive, got "
                        f"{steps} and {global_batch}")
    mesh = mesh_lib.make_mesh(config.mesh, config.get("dcn_mesh", None))
    rules = rules_lib.get_rules(tuple(config.sharding.get("rules", ())))
    if global_batch % jax.process_count():
        raise UserError(f"train.batch_size {global_batch} is not divisible by the "
                        f"{jax.process_count()} processes")
    batch_axis = dict(rules)["batch"]
    batch_axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis or ())
    shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    if global_batch % shards:
        raise UserError(f"train.batch_size {global_batch} is not divisible by the {shards} "
                        f"data-parallel shards of the mesh")
    local_batch = global_batch // jax.process_count()

    os.makedirs(workdir, exist_ok=True)
    t_data = time.perf_counter()
    if config.data.get("cache", False):
        print(f"[judge] reading {config.data.num_examples} training faces into memory "
              f"({config.data.source})", flush=True)
    iterator = images_lib.image_batches(config.data, "train", local_batch, seed=config.seed,
                                        num_threads=int(config.data.get("num_threads", 2)))
    image_size = int(config.data.image_size)
    num_values = images_lib.num_values()
    model = make_judge(config.model, num_values)
    tx, schedule = make_optimizer(config.optim, steps)
    state, state_shardings = init_state(model, tx, mesh, rules, (image_size, image_size, 3),
                                        jax.random.key(config.seed))
    batch_shardings = {"image": rules_lib.batch_sharding(mesh, rules, 4),
                       "labels": rules_lib.batch_sharding(mesh, rules, 2)}
    train_step = make_train_step(model, tx, schedule, state_shardings, batch_shardings,
                                 augment_shift=int(config.train.get("augment_shift", 0)),
                                 seed=int(config.seed))

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                save_interval_steps=int(config.train.checkpoint_every))
    first_step = 0
    if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
        state = checkpointer.restore(abstract, iterator)
        first_step = int(state["step"])
        print(f"[judge] resumed from step {first_step} in {workdir}", flush=True)
    print(f"[judge] data ready in {format_duration(time.perf_counter() - t_data)}; "
          f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters; "
          f"mesh {dict(mesh.shape)}", flush=True)

    logger = MetricsLogger(workdir, steps, name="judge", items_name="img", first_step=first_step)
    t_train = time.perf_counter()
    log_every = max(int(config.train.log_every), 1)
    step = first_step
    last = steps if stop_at is None else min(steps, int(stop_at))
    while step < last:
        batch = _global_batch(next(iterator), batch_shardings)
        state, metrics = train_step(state, batch)
        step += 1
        logger.count(global_batch)
        if step % log_every == 0 or step == last:
            logger.log(step, jax.device_get(metrics))
        checkpointer.save(step, state, iterator, force=step == last)
    checkpointer.close()
    train_seconds = time.perf_counter() - t_train
    if step < steps:
        print(f"[judge] stopped at step {step}; run again to resume", flush=True)
        return None

    params = jax.device_get(state["params"])
    judge_eval.save_judge(workdir, config, params)
    judge = judge_eval.load_judge(workdir)
    data = images_lib.image_batches(
        _eval_data_config(config), config.train.eval_split, 256, shuffle=False, repeat=False,
        drop_remainder=False, process_index=0, process_count=1)
    result = judge.score_batches(data)
    record = {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    record["train_seconds"] = train_seconds
    logger.log(step, record, print_line=False)
    print(f"[judge] {config.train.eval_split} mean attribute accuracy {result['mean']:.4f} "
          f"({result['num_images']} faces); trained {steps - first_step} steps in "
          f"{format_duration(train_seconds)}", flush=True)
    return result


def _eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.num_examples = int(config.train.eval_examples)
    data.cache = False
    return data


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from unif2ace_jax.errors import config_value

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_value(_CONFIG)
    if config is None:
        raise UserError("--config is required (e.g. --config=configs/judge_synthface.py)")
    workdir = flags.FLAGS.workdir
    if not workdir:
        raise UserError("--workdir is required")
    train(config, workdir)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the judge.")
    return config_flags.DEFINE_config_file("config", None, "Judge config file.",
                                           lock_config=True)


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _CONFIG = _define_flags()
    run_cli(main)
