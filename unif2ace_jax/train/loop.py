"""The training skeleton shared by the project's small trainers (judge, encoders, tokenizer).

A trainer supplies an ``init_fn(key) -> params`` (boxed, with logical axis names), a
``loss_fn(params, batch, step) -> (loss, metrics)`` and a checkpointable data iterator of host
batches; this module does the rest:

* `setup_mesh`: mesh and rules from ``config.mesh`` / ``config.sharding``, batch-size checks;
* `init_state`: the train state ``{"step", "params", "opt_state"}`` laid out on the mesh;
* `make_train_step`: ``jit(state, batch) -> (state, metrics)``, data parallel, state donated;
* `fit`: resume from the latest Orbax checkpoint (state + iterator position, `resume`), run the
  steps with a progress line and ``metrics.jsonl``, checkpoint every ``checkpoint_every`` steps;
* `train_model`: all of the above after `setup_mesh`, for a trainer with one model.

The image tokenizer (two models with a GAN) runs its own loop on `batch_shards` and `resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.errors import UserError
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train.progress import MetricsLogger, format_duration

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Mesh, logical rules and batch sizes of one run."""

    mesh: Mesh
    rules: Any
    global_batch: int
    local_batch: int

    def batch_shardings(self, ndims: dict[str, int]) -> dict[str, NamedSharding]:
        """name -> sharding of a host batch array with that many dimensions."""
        return {k: rules_lib.batch_sharding(self.mesh, self.rules, n) for k, n in ndims.items()}


def check_same_model(saved_config_path: str, config: ml_collections.ConfigDict,
                     what: str) -> None:
    """A resumed run must build the same model: UserError when the JSON file at
    `saved_config_path` (``{"config": {...}}``, written by an earlier run) holds another
    ``config.model``. Nothing to check when the file does not exist (a new run)."""
    if not os.path.isfile(saved_config_path):
        return
    with open(saved_config_path) as f:
        saved = json.load(f)["config"].get("model", {})
    current = json.loads(config.model.to_json_best_effort())
    if saved != current:
        raise UserError(f"{os.path.dirname(saved_config_path)} holds {what} with a different "
                        f"model config; use a new --workdir (saved: {saved}, now: {current})")


def setup_mesh(config: ml_collections.ConfigDict, global_batch: int, steps: int) -> Layout:
    """The run's `Layout`; UserError when the batch does not split over processes and shards."""
    if steps <= 0 or global_batch <= 0:
        raise UserError(f"train.steps and train.batch_size must be positive, got "
                        f"{steps} and {global_batch}")
    mesh = mesh_lib.make_mesh(config.mesh, config.get("dcn_mesh", None))
    rules = rules_lib.get_rules(tuple(config.sharding.get("rules", ())))
    if global_batch % jax.process_count():
        raise UserError(f"train.batch_size {global_batch} is not divisible by the "
                        f"{jax.process_count()} processes")
    shards = batch_shards(mesh, rules)
    if global_batch % shards:
        raise UserError(f"train.batch_size {global_batch} is not divisible by the {shards} "
                        f"data-parallel shards of the mesh")
    return Layout(mesh, rules, global_batch, global_batch // jax.process_count())


def batch_shards(mesh: Mesh, rules: Any) -> int:
    """How many ways the logical "batch" axis of `rules` splits a batch over `mesh`."""
    batch_axis = dict(rules)["batch"]
    axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def init_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               layout: Layout, rng: jax.Array) -> tuple[dict, Any]:
    """The train state {"step", "params", "opt_state"} laid out on the mesh, and its shardings.

    Shapes come from `jax.eval_shape` (nothing is materialised twice); the jitted init writes
    each array directly in its sharding. `init_fn(key)` returns the (boxed) params.
    """

    def boxed_init(key):
        params = init_fn(key)
        return {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params,
                "opt_state": tx.init(params)}

    abstract = jax.eval_shape(boxed_init, rng)
    shardings = rules_lib.logical_shardings(abstract, layout.mesh, layout.rules)
    state = jax.jit(lambda key: nn.meta.unbox(boxed_init(key)), out_shardings=shardings)(rng)
    return state, shardings


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any, batch_shardings: Any):
    """jit(state, batch) -> (state, metrics); the input state's buffers are donated.

    `loss_fn(params, batch, step)` returns ``(loss, metrics)``; the step adds ``lr`` and
    ``grad_norm`` to the metrics (``loss`` is added when `metrics` lacks it).
    """

    def step_fn(state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **aux, "lr": schedule(state["step"]),
                   "grad_norm": optax.global_norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    replicated = NamedSharding(next(iter(jax.tree.leaves(state_shardings))).mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def global_batch(local: dict, shardings: dict) -> dict:
    """Host-local numpy batch -> global jax arrays laid out by `shardings` (same keys)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
            for k in shardings}


@dataclasses.dataclass
class FitResult:
    state: Any
    step: int  # the last step run
    first_step: int  # where this run started (> 0 after a resume)
    train_seconds: float
    finished: bool  # step == total steps
    logger: MetricsLogger


def resume(name: str, workdir: str, checkpointer: Checkpointer, state: Any,
           state_shardings: Any, iterator: Iterator) -> tuple[Any, int]:
    """``(state, first step)``: the latest checkpoint's state (laid out by `state_shardings`,
    `iterator` moved to its position) when there is one, else ``(state, 0)`` unchanged."""
    if checkpointer.latest_step() is None:
        return state, 0
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
    state = checkpointer.restore(abstract, iterator)
    first_step = int(state["step"])
    print(f"[{name}] resumed from step {first_step} in {workdir}", flush=True)
    return state, first_step


def fit(name: str, workdir: str, *, state: Any, state_shardings: Any, train_step: Callable,
        iterator: Iterator, batch_shardings: dict, steps: int, log_every: int,
        checkpoint_every: int, stop_at: int | None = None, items_name: str = "img",
        on_start: Callable[[int], None] | None = None) -> FitResult:
    """Resumes from ``workdir/checkpoints`` if possible, then runs the steps up to `steps`.

    `stop_at` ends the run after that step with a checkpoint, as a preemption would (running
    again resumes). `on_start(first_step)` is called once the state is final (e.g. to print).
    """
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                save_interval_steps=int(checkpoint_every))
    state, first_step = resume(name, workdir, checkpointer, state, state_shardings, iterator)
    if on_start is not None:
        on_start(first_step)
    logger = MetricsLogger(workdir, steps, name=name, items_name=items_name, first_step=first_step)
    t_train = time.perf_counter()
    log_every = max(int(log_every), 1)
    step = first_step
    last = steps if stop_at is None else min(steps, int(stop_at))
    batch_items = None
    while step < last:
        local = next(iterator)
        batch = global_batch(local, batch_shardings)
        if batch_items is None:
            batch_items = int(next(iter(batch.values())).shape[0])
        state, metrics = train_step(state, batch)
        step += 1
        logger.count(batch_items)
        if step % log_every == 0 or step == last:
            logger.log(step, jax.device_get(metrics))
        checkpointer.save(step, state, iterator, force=step == last)
    checkpointer.close()
    seconds = time.perf_counter() - t_train
    if step < steps:
        print(f"[{name}] stopped at step {step}; run again to resume", flush=True)
    return FitResult(state, step, first_step, seconds, step >= steps, logger)


def describe_start(name: str, state: dict, layout: Layout, t_data: float) -> Callable[[int], None]:
    """An `on_start` callback printing data time, parameter count and mesh."""

    def show(first_step: int) -> None:
        del first_step
        count = sum(x.size for x in jax.tree.leaves(state["params"]))
        print(f"[{name}] data ready in {format_duration(time.perf_counter() - t_data)}; "
              f"{count:,} parameters; mesh {dict(layout.mesh.shape)}", flush=True)

    return show


def train_model(name: str, workdir: str, *, init_fn: Callable[[jax.Array], Any], loss_fn: LossFn,
                tx: optax.GradientTransformation, schedule: optax.Schedule, layout: Layout,
                seed: int, iterator: Iterator, batch_ndims: dict[str, int],
                train_config: ml_collections.ConfigDict, t_data: float,
                stop_at: int | None = None) -> FitResult:
    """The whole loop of a single-model trainer: `init_state` (key ``jax.random.key(seed)``),
    `make_train_step`, then `fit` for ``train_config.steps`` steps (``log_every``,
    ``checkpoint_every`` from `train_config`), printing `describe_start` on start.

    `batch_ndims`: name -> dimensions of each host batch array (e.g. ``{"image": 4}`` for
    ``[B, H, W, 3]``).
    """
    state, state_shardings = init_state(init_fn, tx, layout, jax.random.key(seed))
    batch_shardings = layout.batch_shardings(batch_ndims)
    train_step = make_train_step(loss_fn, tx, schedule, state_shardings, batch_shardings)
    return fit(name, workdir, state=state, state_shardings=state_shardings,
               train_step=train_step, iterator=iterator, batch_shardings=batch_shardings,
               steps=int(train_config.steps), log_every=int(train_config.log_every),
               checkpoint_every=int(train_config.checkpoint_every), stop_at=stop_at,
               on_start=describe_start(name, state, layout, t_data))
