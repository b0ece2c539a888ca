"""Trains the MAGVIT-v2-style LFQ image tokenizer (docs/DESIGN.md §8).

    python -m unif2ace_jax.train.tokenizer --config=configs/tokenizer_synthface_64.py --workdir=DIR

Loss: ``l1·L1 + l2·L2 + entropy·(LFQ entropy loss) + commitment·(commitment loss)``, plus
``gan·(hinge generator loss)`` from ``loss.gan_start_step`` on when ``loss.gan > 0`` (the PatchGAN
discriminator is then updated every step with its own optimizer, ``disc_optim``). Before that
step a separate jitted step without the discriminator runs, so the warm-up costs nothing extra.

Data parallel over the mesh of `config.mesh` (parameters laid out by the logical rules). Writes
``DIR/metrics.jsonl``, a progress line, Orbax checkpoints under ``DIR/checkpoints`` (train state +
data-iterator position: a restarted run continues exactly), reconstruction grids
``DIR/images/recon_STEP.png`` (pairs input | reconstruction), and the exported tokenizer
(``DIR/tokenizer_params.msgpack`` + ``tokenizer_config.json``, read by
`unif2ace_jax.models.tokenizer.pretrained.load_tokenizer`) at every checkpoint and at the end;
``DIR/train_summary.json`` (final step, train seconds, end-of-training evaluation) once training
has completed.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.data import images as images_lib
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate.tokenizer import evaluate_params, make_reconstruct_fn
from unif2ace_jax.losses import tokenizer as tok_losses
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.discriminator import PatchDiscriminator, make_discriminator
from unif2ace_jax.models.tokenizer.magvit2 import ImageTokenizer, images_to_model
from unif2ace_jax.models.tokenizer.pretrained import CONFIG_FILE, save_tokenizer
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train import loop
from unif2ace_jax.train.progress import format_duration, progress_line
from unif2ace_jax.utils.defaults import fill_missing
from unif2ace_jax.utils.image_grid import save_image_grid
from unif2ace_jax.utils.files import write_json

TRAIN_SUMMARY = "train_summary.json"  # written once training has completed


class Parts(NamedTuple):
    model: ImageTokenizer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    disc: PatchDiscriminator | None
    disc_tx: optax.GradientTransformation | None


# ============================================================================ config, model


def default_config() -> dict:
    """The trainer's defaults for the fields a config may leave out (`fill_missing`)."""
    return {**loop.LAYOUT_DEFAULTS,
            "model": {"dtype": "float32", "param_dtype": "float32"},
            "data": {"num_threads": 2},
            "loss": {"gan": 0.0, "gan_start_step": 0, "entropy_temperature": 1.0,
                     "entropy_mode": "full"},
            "train": {"keep_checkpoints": 2, "num_grid_images": 16, "image_every": 0,
                      "eval_examples": 0}}


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the trainer's defaults filled in."""
    return fill_missing(config, default_config())


def gan_enabled(config: ml_collections.ConfigDict) -> bool:
    return float(resolve_config(config).loss.gan) > 0.0


def build(config: ml_collections.ConfigDict) -> Parts:
    """Model, optimizer and (when the GAN loss is on) discriminator from `config`."""
    config = resolve_config(config)
    if config.loss.entropy_mode not in tok_losses.ENTROPY_MODES:
        raise UserError(f"loss.entropy_mode must be one of {tok_losses.ENTROPY_MODES}, "
                        f"got {config.loss.entropy_mode!r}")
    model = make_tokenizer(config.model)
    size = int(config.data.image_size)
    if size % model.downsample_factor:
        raise UserError(f"data.image_size {size} is not a multiple of the tokenizer's "
                        f"downsampling factor {model.downsample_factor}")
    steps = int(config.train.steps)
    tx, schedule = make_optimizer(config.optim, steps)
    disc = disc_tx = None
    if gan_enabled(config):
        disc = make_discriminator(config.discriminator, config.model.dtype,
                                  config.model.param_dtype)
        disc_tx, _ = make_optimizer(config.disc_optim, steps)
    return Parts(model, tx, schedule, disc, disc_tx)


def init_state(parts: Parts, mesh: Mesh, rules: rules_lib.Rules, image_size: int,
               rng: jax.Array) -> tuple[dict, Any]:
    """The train state laid out on `mesh` (`checkpoint.state.init_state`), and its shardings.

    ``{"step", "params", "opt_state"}`` plus ``{"disc_params", "disc_opt_state"}`` with a GAN.
    """
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    def boxed_init(key):
        k_model, k_disc = jax.random.split(key)
        params = parts.model.init(k_model, dummy)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": parts.tx.init(params)}
        if parts.disc is not None:
            disc_params = parts.disc.init(k_disc, dummy)["params"]
            state["disc_params"] = disc_params
            state["disc_opt_state"] = parts.disc_tx.init(disc_params)
        return state

    return state_lib.init_state(boxed_init, mesh, rules, rng)


# ============================================================================ loss and step


def tokenizer_loss(model: ImageTokenizer, params: Any, images: jax.Array,
                   loss_cfg: ml_collections.ConfigDict, *, disc: PatchDiscriminator | None = None,
                   disc_params: Any = None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """Total generator loss for ``images [B, H, W, 3]`` in [-1, 1].

    Returns ``(loss, (metrics, recon))``; the GAN term is added when `disc` is given.
    """
    out = model.apply({"params": params}, images)
    recon = out["recon"]
    rec, parts = tok_losses.reconstruction_loss(images, recon, l1_weight=loss_cfg.l1,
                                                l2_weight=loss_cfg.l2)
    sample_ent, batch_ent = tok_losses.lfq_entropy_terms(
        out["latents"], temperature=loss_cfg.entropy_temperature, mode=loss_cfg.entropy_mode)
    commit = tok_losses.commitment_loss(out["latents"], out["quantized"])
    loss = rec + loss_cfg.entropy * (sample_ent - batch_ent) + loss_cfg.commitment * commit
    k = model.codebook_size
    used = jnp.zeros((k,), jnp.int32).at[out["indices"].reshape(-1)].max(1)
    metrics = {"l1": parts["l1"], "l2": parts["l2"],
               "psnr": jnp.mean(tok_losses.psnr(images, recon)),
               "sample_entropy": sample_ent, "batch_entropy": batch_ent, "commit": commit,
               "batch_usage": jnp.sum(used) / k}
    if disc is not None:
        g_loss = tok_losses.hinge_generator_loss(disc.apply({"params": disc_params}, recon))
        loss = loss + loss_cfg.gan * g_loss
        metrics["g_loss"] = g_loss
    metrics["loss"] = loss
    return loss, (metrics, recon)


def make_train_step(parts: Parts, loss_cfg: ml_collections.ConfigDict, state_shardings: Any,
                    image_sharding: NamedSharding, *, with_gan: bool):
    """jit(state, images uint8 [B,H,W,3]) -> (state, metrics); the input state is donated.

    `with_gan` adds the generator's hinge loss and a discriminator update (both use the
    discriminator's parameters from before this step).
    """
    model, tx, schedule, disc, disc_tx = parts

    def step_fn(state, images_u8):
        images = images_to_model(images_u8)
        kw = dict(disc=disc, disc_params=state["disc_params"]) if with_gan else {}
        (_, (metrics, recon)), grads = jax.value_and_grad(
            lambda p: tokenizer_loss(model, p, images, loss_cfg, **kw), has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, step=state["step"] + 1,
                         params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = schedule(state["step"])
        if with_gan:
            fake = jax.lax.stop_gradient(recon)

            def d_loss_fn(dp):
                real_logits = disc.apply({"params": dp}, images)
                fake_logits = disc.apply({"params": dp}, fake)
                return (tok_losses.hinge_discriminator_loss(real_logits, fake_logits),
                        (jnp.mean(real_logits), jnp.mean(fake_logits)))

            (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(
                d_loss_fn, has_aux=True)(state["disc_params"])
            d_updates, d_opt = disc_tx.update(d_grads, state["disc_opt_state"],
                                              state["disc_params"])
            new_state["disc_params"] = optax.apply_updates(state["disc_params"], d_updates)
            new_state["disc_opt_state"] = d_opt
            metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean)
        return new_state, metrics

    replicated = NamedSharding(image_sharding.mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, image_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


# ============================================================================ extras


def write_recon_grid(path: str, images: np.ndarray, recon: np.ndarray) -> None:
    """PNG of pairs (input | reconstruction), 4 pairs per row."""
    pairs = np.stack([images, recon], axis=1).reshape((-1,) + images.shape[1:])
    upscale = max(1, 128 // images.shape[1])
    save_image_grid(pairs, path, ncols=8, upscale=upscale)


def _eval_data_config(config: ml_collections.ConfigDict, num: int) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.num_examples = int(num)
    data.cache = False
    return data


def _grid_hook(config: ml_collections.ConfigDict, model: ImageTokenizer, workdir: str):
    """``write(step, state)``: a reconstruction grid of a fixed set of test faces at
    ``DIR/images/recon_STEP.png`` (nothing without ``train.num_grid_images``)."""
    num = int(config.train.num_grid_images)
    images = None
    if num > 0:
        batches = images_lib.image_batches(_eval_data_config(config, num), config.train.eval_split,
                                           num, shuffle=False, repeat=False, drop_remainder=False,
                                           process_index=0, process_count=1)
        images = next(batches)["image"]
    reconstruct = make_reconstruct_fn(model)

    def write(step: int, state: dict) -> None:
        if images is None or jax.process_index() != 0:
            return
        _, recon = reconstruct(state["params"], images)
        write_recon_grid(os.path.join(workdir, "images", f"recon_{step:06d}.png"), images,
                         np.asarray(recon))

    return write


def _finish(config: ml_collections.ConfigDict, model: ImageTokenizer, workdir: str,
            run: loop.FitResult) -> dict:
    """The end-of-training evaluation, its metrics record and ``DIR/train_summary.json``."""
    record: dict = {"train_seconds": run.train_seconds, "trained_steps": run.step - run.first_step}
    num_eval = int(config.train.eval_examples)
    if num_eval > 0:
        result = evaluate_params(model, run.state["params"], _eval_data_config(config, num_eval),
                                 config.train.eval_split, batch_size=min(100, num_eval))
        record.update({f"eval_{k}": v for k, v in result.items()})
        print(f"[tokenizer] {config.train.eval_split}: PSNR {result['psnr']:.2f} dB, code usage "
              f"{result['code_usage']:.3f}, perplexity {result['code_perplexity']:.1f} "
              f"({result['num_images']} faces)", flush=True)
    run.logger.log(run.step, record, print_line=False)
    if jax.process_index() == 0:  # written last: its presence says training completed
        path = os.path.join(workdir, TRAIN_SUMMARY)
        write_json(path, {"step": run.step, **record})
    print(f"[tokenizer] trained {run.step - run.first_step} steps in "
          f"{format_duration(run.train_seconds)}; tokenizer exported to {workdir}", flush=True)
    return record


# ============================================================================ the trainer


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict:
    """Trains (or resumes) the tokenizer in `workdir`; returns the final record (with the
    end-of-training evaluation when ``train.eval_examples > 0``).

    `stop_at`: leave the loop after this step as an interrupted run would (a checkpoint is
    written there; no final evaluation); a later call resumes. For tests and time-boxed jobs.
    """
    # ======================================================================= config and mesh
    config = resolve_config(config)
    steps = int(config.train.steps)
    layout = loop.setup_mesh(config, int(config.train.batch_size), steps)
    parts = build(config)
    os.makedirs(workdir, exist_ok=True)
    loop.check_same_model(os.path.join(workdir, CONFIG_FILE), config, "a tokenizer")

    # ======================================================================= data
    iterator = images_lib.image_batches(config.data, "train", layout.local_batch,
                                        seed=config.seed, num_threads=int(config.data.num_threads))

    # ======================================================================= state and steps
    image_size = int(config.data.image_size)
    state, state_shardings = init_state(parts, layout.mesh, layout.rules, image_size,
                                        jax.random.key(config.seed))
    image_sharding = rules_lib.batch_sharding(layout.mesh, layout.rules, 4)
    gan_start = int(config.loss.gan_start_step)
    step_fns = {with_gan: make_train_step(parts, config.loss, state_shardings, image_sharding,
                                          with_gan=with_gan)
                for with_gan in ((False, True) if parts.disc is not None else (False,))}

    # ======================================================================= loop
    grid = image_size // parts.model.downsample_factor

    def on_start(first_step: int, state: dict) -> None:
        del first_step
        print(f"[tokenizer] {state_lib.count_params(state['params']):,} parameters; "
              f"{image_size}px -> {grid}x{grid} codes of {parts.model.codebook_size}; "
              f"batch {layout.global_batch}; mesh {dict(layout.mesh.shape)}"
              + (f"; GAN from step {gan_start}" if parts.disc is not None else ""), flush=True)

    write_grid = _grid_hook(config, parts.model, workdir)
    image_every = int(config.train.image_every)

    def after_step(step: int, state: dict) -> None:
        if image_every and (step % image_every == 0 or step == steps):
            write_grid(step, state)

    shown = ("loss", "l1", "psnr", "batch_entropy", "batch_usage", "g_loss", "d_loss")
    run = loop.fit(
        "tokenizer", workdir, state=state, state_shardings=state_shardings,
        step_fn=lambda step: step_fns[parts.disc is not None and step >= gan_start],
        iterator=iterator, batch_shardings=image_sharding, items_per_step=layout.global_batch,
        steps=steps, checkpoint_every=int(config.train.checkpoint_every),
        keep_checkpoints=int(config.train.keep_checkpoints),
        logging=loop.Logging(every=int(config.train.log_every), average=True, at_stop=False,
                             line=functools.partial(progress_line, "tokenizer", steps,
                                                    shown=shown, items="{img_per_s:,.1f} img/s")),
        hooks=loop.Hooks(
            inputs=lambda host: host["image"],
            on_start=on_start,
            on_saved=lambda step, state: save_tokenizer(workdir, config, state["params"], step),
            after_step=after_step),
        stop_at=stop_at)
    if not run.finished:
        return {"train_seconds": run.train_seconds, "trained_steps": run.step - run.first_step}
    if run.step == run.first_step:  # nothing left to train: still leave an export and a grid
        save_tokenizer(workdir, config, run.state["params"], run.step)
        write_grid(run.step, run.state)
    return _finish(config, parts.model, workdir, run)


def main(argv: list[str]) -> None:
    from unif2ace_jax import cli

    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/tokenizer_synthface_64.py")
    train(config, cli.require("workdir"))


def _define_flags():
    from unif2ace_jax import cli

    return cli.define_trainer_flags("Directory for checkpoints, metrics, images and the "
                                    "exported tokenizer.", "Tokenizer config file.")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _CONFIG = _define_flags()
    run_cli(main)
