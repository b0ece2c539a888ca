"""The one training skeleton of the project's trainers: the unified model (`train.train`), the
image tokenizer (`train.tokenizer`), the attribute judge (`train.judge`) and the expert encoders
(`train.encoders`).

A trainer keeps its model, loss and data; this module owns the rest, in the order a run goes:

* config: `fill_missing` (utils.defaults) fills the fields a trainer reads from its one
  `default_config()`;
* layout: mesh and rules from ``config.mesh`` / ``dcn_mesh`` / ``sharding.rules``, batch-size
  checks (`setup_mesh`); a resumed run must build the same model (`check_same_model`);
* train state: ``eval_shape`` -> logical shardings -> jitted init (`checkpoint.state.init_state`;
  `init_state` for one model);
* step: the single-model step (`make_train_step`); the unified model and the tokenizer jit
  their own steps with the same contract ``step(state, batch) -> (state, metrics)``;
* loop (`fit`): resume from the latest Orbax checkpoint (state + data-iterator position), the
  steps, the progress line and ``metrics.jsonl`` (`progress.MetricsLogger`), checkpoints every
  ``checkpoint_every`` steps (`checkpoint.manager.Checkpointer`), and a trainer's extras through
  `Hooks` (the tokenizer's exports and reconstruction grids, the unified model's run.json);
* `train_model`: all of it for a trainer with one model and one optimizer (judge, encoders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.errors import UserError
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train.progress import MetricsLogger, format_duration
from unif2ace_jax.utils.defaults import fill_missing

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
StepFn = Callable[[Any, Any], tuple[Any, dict]]
CHECKPOINT_DIR = "checkpoints"

# The layout fields every trainer reads, with their defaults (`fill_missing`).
LAYOUT_DEFAULTS = {"dcn_mesh": None, "sharding": {"rules": ()}}


# ============================================================================ config defaults


# ============================================================================ layout


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


def setup_mesh(config: ml_collections.ConfigDict, global_batch: int, steps: int, *,
               batch_field: str = "train.batch_size", steps_field: str = "train.steps") -> Layout:
    """The run's `Layout` (`LAYOUT_DEFAULTS` where `config` leaves a field out); UserError
    when the batch does not split over processes and shards. `*_field` name the fields in
    messages."""
    config = fill_missing(config, LAYOUT_DEFAULTS)
    if steps <= 0 or global_batch <= 0:
        raise UserError(f"{steps_field} and {batch_field} must be positive, got "
                        f"{steps} and {global_batch}")
    mesh = mesh_lib.make_mesh(config.mesh, config.dcn_mesh)
    rules = rules_lib.get_rules(tuple(config.sharding.rules or ()))
    if global_batch % jax.process_count():
        raise UserError(f"{batch_field} {global_batch} is not divisible by the "
                        f"{jax.process_count()} processes")
    shards = rules_lib.batch_shard_count(mesh, rules)
    if global_batch % shards:
        raise UserError(f"{batch_field} {global_batch} is not divisible by the {shards} "
                        f"data-parallel shards of the mesh")
    return Layout(mesh, rules, global_batch, global_batch // jax.process_count())


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


# ============================================================================ train state


def init_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               layout: Layout, rng: jax.Array) -> tuple[dict, Any]:
    """The train state ``{"step", "params", "opt_state"}`` of one model laid out on the mesh,
    and its shardings (`checkpoint.state.init_state`, plain `jax.jit`). `init_fn(key)` returns
    the (boxed) params; the unified model and the tokenizer build their own boxed state."""

    def boxed_init(key):
        params = init_fn(key)
        return {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params,
                "opt_state": tx.init(params)}

    return state_lib.init_state(boxed_init, layout.mesh, layout.rules, rng, cheap_compile=False)


# ============================================================================ step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any, batch_shardings: Any) -> StepFn:
    """jit(state, batch) -> (state, metrics) of one model; the input state's buffers are donated.

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


def to_global(local: Any, shardings: Any) -> Any:
    """Host-local numpy batch -> global jax arrays laid out by `shardings`: a dict of
    shardings takes those keys of `local`; one sharding lays out the one array `local`."""
    if isinstance(shardings, dict):
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
                for k in shardings}
    return jax.make_array_from_process_local_data(shardings, np.asarray(local))


# ============================================================================ loop


@dataclasses.dataclass(frozen=True)
class Logging:
    """When and what `fit` logs: every `every` steps and at the last step (also at a
    ``stop_at`` / ``stop_after`` step when `at_stop`).

    `average`: log the mean of every metric since the last log (`keep_last` keep the last
    step's value), printed by `line(step, mean, record)`; else the last step's metrics with the
    logger's own progress line. `items_per_step` counts throughput (default: the batch size).
    """

    every: int
    items_name: str = "img"
    items_per_step: int | None = None
    average: bool = False
    keep_last: tuple[str, ...] = ()
    at_stop: bool = True
    line: Callable[[int, dict, dict], str] | None = None


@dataclasses.dataclass
class Hooks:
    """A trainer's extras around the loop; every one optional.

    inputs(host batch) -> what the step takes (laid out by the batch shardings);
    new_run(state) -> state: on a new run only (no checkpoint to resume), replaces the initial
    state (e.g. params initialised from another run); on_start(first_step, state) once the
    state is restored; on_saved(step, state) after each checkpoint; after_step(step, state) at
    the end of every step.
    """

    inputs: Callable[[Any], Any] | None = None
    new_run: Callable[[Any], Any] | None = None
    on_start: Callable[[int, Any], None] | None = None
    on_saved: Callable[[int, Any], None] | None = None
    after_step: Callable[[int, Any], None] | None = None


@dataclasses.dataclass
class FitResult:
    state: Any
    step: int  # the last step run
    first_step: int  # where this run started (> 0 after a resume)
    train_seconds: float
    finished: bool  # step == total steps
    logger: MetricsLogger
    record: dict  # the last logged record ({} when nothing was logged)


def resume(name: str, workdir: str, checkpointer: Checkpointer, state: Any,
           state_shardings: Any, iterator: Iterator) -> tuple[Any, int]:
    """``(state, first step)``: the latest checkpoint's state (laid out by `state_shardings`,
    `iterator` moved to its position) when there is one, else ``(state, 0)`` unchanged."""
    if checkpointer.latest_step() is None:
        return state, 0
    state = checkpointer.restore(state_lib.abstract_state(state, state_shardings), iterator)
    first_step = int(state["step"])
    print(f"[{name}] resumed from step {first_step} in {workdir}", flush=True)
    return state, first_step


def fit(name: str, workdir: str, *, state: Any, state_shardings: Any,
        step_fn: Callable[[int], StepFn], iterator: Iterator, batch_shardings: Any,
        items_per_step: int, steps: int, checkpoint_every: int, keep_checkpoints: int,
        logging: Logging, hooks: Hooks = Hooks(), stop_at: int | None = None,
        stop_after: int | None = None) -> FitResult:
    """Resumes from ``workdir/checkpoints`` if possible, then runs the steps up to `steps`.

    `step_fn(step)` is the jitted step that takes the state after `step` steps. `stop_at`
    (a step) or `stop_after` (steps of this call) end the run early with a checkpoint, as a
    preemption would (running again resumes).
    """
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                max_to_keep=int(keep_checkpoints),
                                save_interval_steps=int(checkpoint_every))
    if checkpointer.latest_step() is None and hooks.new_run is not None:
        state = hooks.new_run(state)
    state, first_step = resume(name, workdir, checkpointer, state, state_shardings, iterator)
    if hooks.on_start is not None:
        hooks.on_start(first_step, state)
    last = steps if stop_at is None else min(steps, int(stop_at))
    if stop_after is not None:
        last = min(steps, first_step + int(stop_after))
    logger = MetricsLogger(workdir, steps, name=name, items_name=logging.items_name,
                           first_step=first_step)
    every = max(int(logging.every), 1)
    inputs = hooks.inputs or (lambda local: local)
    pending: list[dict] = []
    record: dict = {}
    t_train = time.perf_counter()
    step = first_step
    while step < last:
        batch = to_global(inputs(next(iterator)), batch_shardings)
        state, metrics = step_fn(step)(state, batch)
        pending.append(metrics)
        step += 1
        logger.count(items_per_step)
        if step % every == 0 or step == steps or (logging.at_stop and step == last):
            record = _log(logger, logging, step, pending)
            pending = []
        if checkpointer.save(step, state, iterator, force=step == last) and hooks.on_saved:
            hooks.on_saved(step, state)
        if hooks.after_step is not None:
            hooks.after_step(step, state)
    checkpointer.close()
    seconds = time.perf_counter() - t_train
    if step < steps:
        print(f"[{name}] stopped at step {step} of {steps}; run again to resume", flush=True)
    return FitResult(state, step, first_step, seconds, step >= steps, logger, record)


def _log(logger: MetricsLogger, logging: Logging, step: int, pending: list[dict]) -> dict:
    """Writes (and prints) one record from the metrics of the steps since the last log."""
    if not logging.average:
        return logger.log(step, jax.device_get(pending[-1]))
    host = jax.device_get(pending)
    mean = {k: float(np.mean([m[k] for m in host if k in m])) for k in host[-1]}
    for k in logging.keep_last:
        mean[k] = float(host[-1][k])
    record = logger.log(step, mean, print_line=logging.line is None)
    if logging.line is not None and jax.process_index() == 0:
        print(logging.line(step, mean, record), flush=True)
    return record


# ============================================================================ one model


def describe_start(name: str, layout: Layout, t_data: float) -> Callable[[int, Any], None]:
    """An `on_start` hook printing data time, parameter count and mesh."""

    def show(first_step: int, state: Any) -> None:
        del first_step
        print(f"[{name}] data ready in {format_duration(time.perf_counter() - t_data)}; "
              f"{state_lib.count_params(state['params']):,} parameters; "
              f"mesh {dict(layout.mesh.shape)}", flush=True)

    return show


def train_model(name: str, workdir: str, *, init_fn: Callable[[jax.Array], Any], loss_fn: LossFn,
                tx: optax.GradientTransformation, schedule: optax.Schedule, layout: Layout,
                seed: int, iterator: Iterator, batch_ndims: dict[str, int],
                train_config: ml_collections.ConfigDict, t_data: float,
                stop_at: int | None = None) -> FitResult:
    """The whole run of a single-model trainer: `init_state` (key ``jax.random.key(seed)``),
    `make_train_step`, then `fit` for ``train_config.steps`` steps (``log_every``,
    ``checkpoint_every``, ``keep_checkpoints`` from `train_config`), printing `describe_start`.

    `batch_ndims`: name -> dimensions of each host batch array (e.g. ``{"image": 4}`` for
    ``[B, H, W, 3]``).
    """
    state, state_shardings = init_state(init_fn, tx, layout, jax.random.key(seed))
    batch_shardings = layout.batch_shardings(batch_ndims)
    train_step = make_train_step(loss_fn, tx, schedule, state_shardings, batch_shardings)
    return fit(name, workdir, state=state, state_shardings=state_shardings,
               step_fn=lambda step: train_step, iterator=iterator,
               batch_shardings=batch_shardings, items_per_step=layout.global_batch,
               steps=int(train_config.steps),
               checkpoint_every=int(train_config.checkpoint_every),
               keep_checkpoints=int(train_config.keep_checkpoints),
               logging=Logging(every=int(train_config.log_every)), stop_at=stop_at,
               hooks=Hooks(on_start=describe_start(name, layout, t_data)))
