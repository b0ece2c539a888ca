"""Trains the unified model (T2I by D3Diff + MMU + LM) on a mixed stream of image codes and text.

    python -m unif2ace_jax.train --config=configs/synthface_tiny.py --workdir=DIR

One readable loop in sections: config and mesh; data; model and parameters (``eval_shape`` ->
logical shardings -> jitted init); optimizer; checkpoint restore; the jitted step; the loop.

Config fields read here (see configs/synthface_tiny.py for a full example):

* ``seed``, ``total_steps``, ``log_every``, ``ckpt_every``, ``keep_checkpoints``
* ``mesh`` (sizes of data / fsdp / tensor / expert; one may be -1), ``dcn_mesh`` (optional),
  ``sharding.rules`` (overrides of the logical rules table, `parallel/rules.py`)
* ``optim`` (`optim.py`), ``loss`` (`losses/unified.py`)
* ``model``: backbone fields (`models/backbone.py`) + ``num_image_codes`` (K) and ``image_grid``
  (h = w of the code grid; 0 = take both from the image tokenizer), ``vocab_pad_to_multiple``,
  ``group_assignment``, ``position_mode``
* ``data`` (`data/pipeline.py`; ``image_field`` must give ``image_codes``)
* ``tokenizer_workdir``: the trained image tokenizer whose codes the data holds (read by
  `generate` / `evaluate` to turn codes into images); may be empty for code-only runs
* ``sampling``: defaults of `generate` / `evaluate` (sampler, steps, guidance, temperatures)

Writes ``DIR/run.json`` (config + tokenizer paths + vocabulary sizes), ``DIR/metrics.jsonl`` (one
record per logged step: ``step, loss, lr, tokens_per_s`` and the loss parts), a progress line,
and Orbax checkpoints (train state + data-iterator position, async, keep-N) under
``DIR/checkpoints``; a restarted run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.unified import UnifiedModel, build_model, default_features
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import presets as presets_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.checkpoint import trained as trained_lib
from unif2ace_jax.losses.unified import MODEL_KEYS, model_inputs, unified_loss
from unif2ace_jax.train import loop
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.train.progress import MetricsLogger, format_duration

SHOWN = ("loss", "lr", "mask_ce", "mask_accuracy", "mmu_loss", "mmu_accuracy", "lm_loss")


# ---------------------------------------------------------------------------------------------
# Pieces the trainer, the bench and the tests share.


def image_code_geometry(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(K, h)``: codebook size and code-grid side, from the image tokenizer when one is named.

    ``config.model.num_image_codes`` / ``image_grid`` must agree with it (or be 0).
    """
    k = int(config.model.get("num_image_codes", 0))
    grid = int(config.model.get("image_grid", 0))
    tok_dir = config.get("tokenizer_workdir", "") or ""
    if tok_dir:
        from unif2ace_jax.models.tokenizer import make_tokenizer
        from unif2ace_jax.models.tokenizer.pretrained import load_config

        tok_config, _ = load_config(tok_dir)
        tok_model = make_tokenizer(tok_config.model)
        tok_k = tok_model.codebook_size
        tok_grid = int(tok_config.data.image_size) // tok_model.downsample_factor
        if k and k != tok_k:
            raise UserError(f"model.num_image_codes={k} but the tokenizer in {tok_dir} has "
                            f"{tok_k} codes (set 0 to take it from the tokenizer)")
        if grid and grid != tok_grid:
            raise UserError(f"model.image_grid={grid} but the tokenizer in {tok_dir} makes "
                            f"{tok_grid}x{tok_grid} codes (set 0 to take it from the tokenizer)")
        k, grid = tok_k, tok_grid
    if k <= 0 or grid <= 0:
        raise UserError("model.num_image_codes and model.image_grid must be set (> 0) when no "
                        "tokenizer_workdir is given")
    return k, grid


def batch_shard_count(mesh: Mesh, rules: rules_lib.Rules) -> int:
    """How many ways the batch dimension is split over the mesh."""
    axis = dict(rules).get("batch")
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: rules_lib.Rules):
    """The mesh and logical-rules context in which flax's activation constraints resolve.

    Uses the `with mesh:` resource environment (deprecated in JAX 0.10 in favour of
    `jax.set_mesh`, whose abstract mesh flax 0.12 would also apply to every parameter's
    logical names inside the layer scan, with the wrong rank), and hands the mesh to
    `rules.constrain` explicitly: without an abstract mesh flax drops activation constraints.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mesh.__enter__()
    try:
        with nn.logical_axis_rules(rules), rules_lib.activation_mesh(mesh):
            yield
    finally:
        mesh.__exit__(None, None, None)


def make_train_step(model: UnifiedModel, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_cfg: ml_collections.ConfigDict,
                    state_shardings: Any, batch_shardings: Any, mesh: Mesh,
                    rules: rules_lib.Rules, *, seed: int, extra_fields: tuple[str, ...] = ()):
    """``jit(state, batch) -> (state, metrics)`` with in/out shardings; the state is donated.

    The step's randomness is ``fold_in(key(seed), step)``: a pure function of the step, so a
    resumed run draws exactly what an uninterrupted one would.
    """

    def step_fn(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])

        def loss_fn(params):
            return unified_loss(model, params, batch, rng, loss_cfg, train=True,
                                extra_fields=extra_fields)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def run(state, batch):
        with sharding_context(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict:
    """Per-host numpy batch -> global jax Arrays (`jax.make_array_from_process_local_data`)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


def _check_codes(batch: dict[str, np.ndarray], k: int, grid: int) -> None:
    codes = batch.get("image_codes")
    if codes is None:
        raise UserError("the training data gives no image_codes; set data.image_field to "
                        "'image_codes' and point data.dataset at a pre-tokenised dataset")
    if codes.shape[1] != grid * grid:
        raise UserError(f"records carry {codes.shape[1]} image codes, the model expects "
                        f"{grid}x{grid}={grid * grid}")
    if codes.size and (codes.min() < 0 or codes.max() >= k):
        raise UserError(f"image codes lie in [{codes.min()}, {codes.max()}], outside the "
                        f"model's [0, {k})")


def _feature_shapes(features: dict[str, Any]) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
            for k, v in features.items() if k not in ("task", "mask_ratio")}


# ---------------------------------------------------------------------------------------------
# The trainer


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict:
    """Trains (or resumes) the unified model in `workdir`; returns the last logged record.

    `stop_after`: leave after this many steps of this invocation (with a checkpoint), as a
    preempted job would; a later call resumes. The schedule still spans ``total_steps``.
    """
    from unif2ace_jax.data.pipeline import load_tokenizer, make_train_iterator

    # ======================================================================= config and mesh
    total_steps = int(config.total_steps)
    if total_steps <= 0:
        raise UserError(f"total_steps must be positive, got {total_steps}")
    config = presets_lib.apply_preset(config)  # config.sharding.preset -> mesh + rules
    mesh = mesh_lib.make_mesh(config.mesh, config.get("dcn_mesh", None))
    rules = rules_lib.get_rules(tuple(config.get("sharding", {}).get("rules", ())))
    global_batch = int(config.data.batch_size)
    shards = batch_shard_count(mesh, rules)
    if global_batch % jax.process_count() or global_batch % shards:
        raise UserError(f"data.batch_size {global_batch} must be divisible by the "
                        f"{jax.process_count()} processes and the {shards} batch shards")
    os.makedirs(workdir, exist_ok=True)
    loop.check_same_model(os.path.join(workdir, trained_lib.RUN_FILE), config, "a run")
    extra_fields = tuple(config.data.get("extra_fields", ()) or ())

    # ======================================================================= data
    text_tokenizer = load_tokenizer(config.data)
    k, grid = image_code_geometry(config)
    iterator = make_train_iterator(config, tokenizer=text_tokenizer)
    # The first batch fixes the shapes (and checks the codes); it is not consumed: the iterator
    # is rewound so step 0 trains on it, and a restore moves it anyway.
    start_state = iterator.get_state()
    first = next(iterator)
    iterator.set_state(start_state)
    _check_codes(first, k, grid)

    # ======================================================================= model
    model = build_model(config.model, text_vocab_size=text_tokenizer.vocab_size,
                        num_image_codes=k, image_grid=grid)
    host_inputs = model_inputs(first, extra_fields)
    init_features = default_features(first["task"][:1], np.zeros((1,), np.float32),
                                     {n: v[:1] for n, v in host_inputs.items()
                                      if n not in MODEL_KEYS})

    # ======================================================================= optimizer
    tx, schedule = make_optimizer(config.optim, total_steps)

    # ======================================================================= parameters
    state, state_shardings = state_lib.create_train_state(
        model, tx, mesh, rules, jax.random.key(int(config.seed)), init_features)
    batch_shardings = {name: rules_lib.batch_sharding(mesh, rules, np.ndim(v))
                       for name, v in host_inputs.items()}

    # ======================================================================= checkpoint restore
    checkpointer = Checkpointer(os.path.join(workdir, trained_lib.CHECKPOINT_DIR),
                                max_to_keep=int(config.get("keep_checkpoints", 2)),
                                save_interval_steps=int(config.ckpt_every))
    first_step = 0
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state_lib.abstract_state(state, state_shardings), iterator)
        first_step = int(state["step"])
        print(f"[train] resumed from step {first_step} in {workdir}", flush=True)
    tok_dir = config.get("tokenizer_workdir", "") or ""
    trained_lib.save_run_info(
        workdir, config, text_tokenizer=os.path.abspath(config.data.tokenizer.model_path),
        text_tokenizer_name=config.data.tokenizer.name,
        tokenizer_workdir=os.path.abspath(tok_dir) if tok_dir else "",
        text_vocab_size=int(text_tokenizer.vocab_size), num_image_codes=k, image_grid=grid,
        feature_shapes=_feature_shapes(init_features),
        feature_encoders=trained_lib.feature_encoder_specs(config))
    seq_len = first["text"].shape[1] + first["answer"].shape[1] + grid * grid + 5
    print(f"[train] {state_lib.count_params(state['params']):,} parameters; vocab "
          f"{model.vocab.size} (text {text_tokenizer.vocab_size}, {k} image codes, {grid}x{grid} "
          f"per image); sequence {seq_len}; batch {global_batch}; mesh {dict(mesh.shape)}",
          flush=True)

    # ======================================================================= train step
    train_step = make_train_step(model, tx, schedule, config.loss, state_shardings,
                                 batch_shardings, mesh, rules, seed=int(config.seed),
                                 extra_fields=extra_fields)

    # ======================================================================= loop
    logger = MetricsLogger(workdir, total_steps, name="train", items_name="tokens",
                           first_step=first_step)
    log_every = max(int(config.log_every), 1)
    pending: list[dict] = []
    record: dict = {}
    t_start = time.perf_counter()
    step = first_step
    last_step = total_steps if stop_after is None else min(total_steps, first_step + stop_after)
    while step < last_step:
        batch = to_global(model_inputs(next(iterator), extra_fields), batch_shardings)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        step += 1
        logger.count(global_batch * seq_len)
        if step % log_every == 0 or step == last_step:
            host = jax.device_get(pending)
            pending = []
            mean = {key: float(np.mean([m[key] for m in host])) for key in host[-1]}
            mean["lr"] = float(host[-1]["lr"])
            record = logger.log(step, mean, print_line=False)
            if jax.process_index() == 0:
                print(_progress_line(step, total_steps, mean, record), flush=True)
        checkpointer.save(step, state, iterator, force=step == last_step)
    checkpointer.close()
    seconds = time.perf_counter() - t_start
    print(f"[train] trained {step - first_step} steps in {format_duration(seconds)}; "
          f"checkpoints in {os.path.join(workdir, trained_lib.CHECKPOINT_DIR)}", flush=True)
    return record


def _progress_line(step: int, total: int, mean: dict, record: dict) -> str:
    rate = record["steps_per_s"]
    eta = format_duration((total - step) / rate) if rate > 0 else "?"
    parts = [f"[train] step {step:>{len(str(total))}}/{total} ({100 * step / total:.0f}%)"]
    parts += [f"{key} {mean[key]:.4g}" for key in SHOWN if key in mean]
    parts += [f"{record['tokens_per_s']:,.0f} tok/s", f"{rate:.2f} step/s", f"ETA {eta}"]
    return " | ".join(parts)
