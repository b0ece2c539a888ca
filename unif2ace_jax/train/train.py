"""Trains the unified model (T2I by D3Diff + MMU + LM) on a mixed stream of image codes and text.

    python -m unif2ace_jax.train --config=configs/synthface_tiny.py --workdir=DIR

The trainer keeps the model, its loss and its data; `train.loop` (the skeleton shared by every
trainer) does the mesh, the init (``eval_shape`` -> logical shardings -> jitted init), the resume,
the loop, the logs and the checkpoints. `train` reads in sections: config and mesh; data; model
and optimizer; state and step; loop.

Config fields read here (see configs/synthface_tiny.py for a full example):

* ``seed``, ``total_steps``, ``log_every``, ``ckpt_every``, ``keep_checkpoints`` (default 2)
* ``mesh`` (sizes of data / fsdp / tensor / expert; one may be -1), ``dcn_mesh`` (default none),
  ``sharding.rules`` (overrides of the logical rules table, `parallel/rules.py`; default none)
* ``optim`` (`optim.py`), ``loss`` (`losses/unified.py`)
* ``model``: backbone fields (`models/backbone.py`) + ``num_image_codes`` (K) and ``image_grid``
  (h = w of the code grid; 0 = take both from the image tokenizer), ``vocab_pad_to_multiple``,
  ``group_assignment``, ``position_mode``
* ``data`` (`data/pipeline.py`; ``image_field`` must give ``image_codes``)
* ``init_from`` (default none): a unified-model workdir (e.g. a Show-o converted by
  `convert.showo`) whose params a NEW run starts from (a resumed run restores its own
  checkpoint); ``init.ffn_upcycling`` ("split" | "copy" | "random") turns its dense FFN into
  token-MoE experts (`checkpoint/init_from.py`); ``init.from_required``: refuse to start
  without ``init_from``
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
import functools
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint import init_from as init_from_lib
from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.checkpoint import trained as trained_lib
from unif2ace_jax.data import pipeline
from unif2ace_jax.errors import UserError
from unif2ace_jax.losses.unified import MODEL_KEYS, model_inputs, unified_loss
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.pretrained import load_config
from unif2ace_jax.models.sequences import sequence_length
from unif2ace_jax.models.unified import UnifiedModel, build_model, default_features
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.parallel import presets as presets_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train import loop
from unif2ace_jax.train.loop import to_global  # noqa: F401  (the bench and tests lay out batches with it)
from unif2ace_jax.train.progress import format_duration, progress_line
from unif2ace_jax.utils.defaults import fill_missing

# The fields `image_code_geometry` reads, with their defaults (it also serves aot and summary).
GEOMETRY_DEFAULTS = {"tokenizer_workdir": "", "model": {"num_image_codes": 0, "image_grid": 0}}
SHOWN = ("loss", "lr", "mask_ce", "mask_accuracy", "mmu_loss", "mmu_accuracy", "lm_loss")


# ============================================================================ pieces
# Shared with the bench, the AOT check and the tests.


def image_code_geometry(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(K, h)``: codebook size and code-grid side, from the image tokenizer when one is named.

    ``config.model.num_image_codes`` / ``image_grid`` must agree with it (or be 0).
    """
    config = fill_missing(config, GEOMETRY_DEFAULTS)
    k, grid = int(config.model.num_image_codes), int(config.model.image_grid)
    tok_dir = config.tokenizer_workdir or ""
    if tok_dir:
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


# ============================================================================ the trainer


def default_config() -> dict:
    """The trainer's defaults for the fields a config may leave out (`fill_missing`)."""
    return {**loop.LAYOUT_DEFAULTS, "keep_checkpoints": 2, "tokenizer_workdir": "",
            "data": {"extra_fields": ()}, "init_from": "",
            "init": {"ffn_upcycling": "split", "from_required": False}}


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict:
    """Trains (or resumes) the unified model in `workdir`; returns the last logged record.

    `stop_after`: leave after this many steps of this invocation (with a checkpoint), as a
    preempted job would; a later call resumes. The schedule still spans ``total_steps``.
    """
    # ======================================================================= config and mesh
    config = fill_missing(presets_lib.apply_preset(config), default_config())
    total_steps = int(config.total_steps)
    layout = loop.setup_mesh(config, int(config.data.batch_size), total_steps,
                             batch_field="data.batch_size", steps_field="total_steps")
    os.makedirs(workdir, exist_ok=True)
    loop.check_same_model(os.path.join(workdir, trained_lib.RUN_FILE), config, "a run")
    extra_fields = tuple(config.data.extra_fields or ())

    # ======================================================================= data
    text_tokenizer = pipeline.load_tokenizer(config.data)
    k, grid = image_code_geometry(config)
    iterator = pipeline.make_train_iterator(config, tokenizer=text_tokenizer)
    # The first batch fixes the shapes (and checks the codes); it is not consumed: the iterator
    # is rewound so step 0 trains on it, and a restore moves it anyway.
    start_state = iterator.get_state()
    first = next(iterator)
    iterator.set_state(start_state)
    _check_codes(first, k, grid)

    # ======================================================================= model and optimizer
    model = build_model(config.model, text_vocab_size=text_tokenizer.vocab_size,
                        num_image_codes=k, image_grid=grid)
    host_inputs = model_inputs(first, extra_fields)
    init_features = default_features(first["task"][:1], np.zeros((1,), np.float32),
                                     {n: v[:1] for n, v in host_inputs.items()
                                      if n not in MODEL_KEYS})
    tx, schedule = make_optimizer(config.optim, total_steps)

    # ======================================================================= state and step
    state, state_shardings = state_lib.create_train_state(
        model, tx, layout.mesh, layout.rules, jax.random.key(int(config.seed)), init_features)
    batch_shardings = layout.batch_shardings({n: np.ndim(v) for n, v in host_inputs.items()})
    train_step = make_train_step(model, tx, schedule, config.loss, state_shardings,
                                 batch_shardings, layout.mesh, layout.rules,
                                 seed=int(config.seed), extra_fields=extra_fields)

    # ======================================================================= loop
    seq_len = sequence_length(first["text"].shape[1], first["answer"].shape[1], grid * grid)

    def new_run(state: dict) -> dict:
        return _init_from(config, model, state, state_shardings)

    def on_start(first_step: int, state: dict) -> None:
        del first_step
        _save_run_info(workdir, config, text_tokenizer, k, grid, init_features)
        print(f"[train] {state_lib.count_params(state['params']):,} parameters; vocab "
              f"{model.vocab.size} (text {text_tokenizer.vocab_size}, {k} image codes, "
              f"{grid}x{grid} per image); sequence {seq_len}; batch {layout.global_batch}; "
              f"mesh {dict(layout.mesh.shape)}", flush=True)

    line = functools.partial(progress_line, "train", total_steps, shown=SHOWN,
                             items="{tokens_per_s:,.0f} tok/s")
    run = loop.fit(
        "train", workdir, state=state, state_shardings=state_shardings,
        step_fn=lambda step: train_step, iterator=iterator, batch_shardings=batch_shardings,
        items_per_step=layout.global_batch * seq_len, steps=total_steps,
        checkpoint_every=int(config.ckpt_every), keep_checkpoints=int(config.keep_checkpoints),
        logging=loop.Logging(every=int(config.log_every), items_name="tokens", average=True,
                             keep_last=("lr",), line=line),
        hooks=loop.Hooks(inputs=lambda host: model_inputs(host, extra_fields), new_run=new_run,
                         on_start=on_start),
        stop_after=stop_after)
    print(f"[train] trained {run.step - run.first_step} steps in "
          f"{format_duration(run.train_seconds)}; checkpoints in "
          f"{os.path.join(workdir, loop.CHECKPOINT_DIR)}", flush=True)
    return run.record


def _init_from(config: ml_collections.ConfigDict, model: UnifiedModel, state: dict,
               state_shardings: Any) -> dict:
    """A new run's state with its params initialised from ``config.init_from`` (a unified-model
    workdir, e.g. a converted Show-o; `checkpoint.init_from`), or `state` when none is given."""
    source = config.init_from or ""
    if not source:
        if config.init.from_required:
            raise UserError("this config starts from a converted Show-o: pass "
                            "--config.init_from=DIR (python -m unif2ace_jax.convert.showo)")
        return state
    params, report = init_from_lib.init_params_from_workdir(
        source, model, state["params"], state_shardings["params"],
        str(config.init.ffn_upcycling))
    print(f"[train] params from {source}: {report.summary()}", flush=True)
    return {**state, "params": params}


def _save_run_info(workdir: str, config: ml_collections.ConfigDict, text_tokenizer: Any, k: int,
                   grid: int, init_features: dict) -> None:
    """``DIR/run.json``: the config, the tokenizers' paths, vocabulary sizes, feature specs."""
    tok_dir = config.tokenizer_workdir or ""
    trained_lib.save_run_info(
        workdir, config, text_tokenizer=os.path.abspath(config.data.tokenizer.model_path),
        text_tokenizer_name=config.data.tokenizer.name,
        tokenizer_workdir=os.path.abspath(tok_dir) if tok_dir else "",
        text_vocab_size=int(text_tokenizer.vocab_size), num_image_codes=k, image_grid=grid,
        feature_shapes=_feature_shapes(init_features),
        feature_encoders=trained_lib.feature_encoder_specs(config))
