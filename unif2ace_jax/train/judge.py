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

import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.data import images as images_lib
from unif2ace_jax.evaluate import judge as judge_eval  # the saved-judge format lives there
from unif2ace_jax.models.judge import AttributeJudge, judge_loss, make_judge
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.train import loop
from unif2ace_jax.train.progress import format_duration
from unif2ace_jax.utils.defaults import fill_missing


def default_config() -> dict:
    """The trainer's defaults for the fields a config may leave out (`fill_missing`)."""
    return {**loop.LAYOUT_DEFAULTS, "data": {"cache": False, "num_threads": 2},
            "train": {"augment_shift": 0, "keep_checkpoints": 3}}


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


def judge_loss_fn(model: AttributeJudge, *, augment_shift: int = 0, seed: int = 0) -> loop.LossFn:
    """`loss_fn(params, batch, step) -> (loss, {"acc"})` of the judge for `loop.make_train_step`.

    batch: ``{"image": uint8 [B, H, W, 3], "labels": int [B, A]}``. With `augment_shift` > 0
    every image is randomly translated by up to that many pixels (the randomness depends only
    on (seed, step), so a resumed run repeats it exactly).
    """

    def loss_fn(params, batch, step):
        images = batch["image"]
        if augment_shift:
            images = random_shift(images, jax.random.fold_in(jax.random.key(seed), step),
                                  augment_shift)
        loss, aux = judge_loss(model.apply({"params": params}, images), batch["labels"])
        return loss, {"acc": aux["accuracy"]}

    return loss_fn


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
          ) -> dict | None:
    """Trains (or resumes) the judge in `workdir`; returns the final eval metrics.

    `stop_at` ends the run after that step with a checkpoint, as a preemption would (returns
    None; running again resumes).
    """
    config = fill_missing(config, default_config())
    steps = int(config.train.steps)
    layout = loop.setup_mesh(config, int(config.train.batch_size), steps)

    os.makedirs(workdir, exist_ok=True)
    t_data = time.perf_counter()
    if config.data.cache:
        print(f"[judge] reading {config.data.num_examples} training faces into memory "
              f"({config.data.source})", flush=True)
    iterator = images_lib.image_batches(config.data, "train", layout.local_batch,
                                        seed=config.seed,
                                        num_threads=int(config.data.num_threads))
    image_size = int(config.data.image_size)
    model = make_judge(config.model, images_lib.num_values())
    tx, schedule = make_optimizer(config.optim, steps)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    loss_fn = judge_loss_fn(model, augment_shift=int(config.train.augment_shift),
                            seed=int(config.seed))
    run = loop.train_model("judge", workdir, init_fn=lambda key: model.init(key, dummy)["params"],
                           loss_fn=loss_fn, tx=tx, schedule=schedule, layout=layout,
                           seed=config.seed, iterator=iterator,
                           batch_ndims={"image": 4, "labels": 2}, train_config=config.train,
                           t_data=t_data, stop_at=stop_at)
    if not run.finished:
        return None
    state, step, first_step, train_seconds, logger = (run.state, run.step, run.first_step,
                                                      run.train_seconds, run.logger)

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
    from absl import logging

    from unif2ace_jax import cli

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/judge_synthface.py")
    train(config, cli.require("workdir"))


def _define_flags():
    from unif2ace_jax import cli

    return cli.define_trainer_flags("Directory for checkpoints, metrics and the judge.",
                                    "Judge config file.")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _CONFIG = _define_flags()
    run_cli(main)
