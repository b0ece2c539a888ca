"""Trains the MAGVIT-v2-style LFQ image tokenizer (DESIGN §8).

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

import json
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.data import images as images_lib
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate.tokenizer import evaluate_params, make_reconstruct_fn
from unif2ace_jax.losses import tokenizer as tok_losses
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.discriminator import PatchDiscriminator, make_discriminator
from unif2ace_jax.models.tokenizer.magvit2 import ImageTokenizer, images_to_model
from unif2ace_jax.models.tokenizer.pretrained import CONFIG_FILE, save_tokenizer
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.train import loop
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.train.progress import MetricsLogger, format_duration
from unif2ace_jax.utils.image_grid import save_image_grid

TRAIN_SUMMARY = "train_summary.json"  # written once training has completed


class Parts(NamedTuple):
    model: ImageTokenizer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    disc: PatchDiscriminator | None
    disc_tx: optax.GradientTransformation | None


def gan_enabled(config: ml_collections.ConfigDict) -> bool:
    return float(config.loss.get("gan", 0.0)) > 0.0


def build(config: ml_collections.ConfigDict) -> Parts:
    """Model, optimizer and (when the GAN loss is on) discriminator from `config`."""
    if config.loss.get("entropy_mode", "full") not in tok_losses.ENTROPY_MODES:
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
        disc = make_discriminator(config.discriminator, config.model.get("dtype", "float32"),
                                  config.model.get("param_dtype", "float32"))
        disc_tx, _ = make_optimizer(config.disc_optim, steps)
    return Parts(model, tx, schedule, disc, disc_tx)


def compile_cheaply(fn, *args, out_shardings: Any = None):
    """`jax.jit(fn)` compiled for `args`, with XLA's backend optimisation off on CPU.

    For one-off functions (parameter init): on CPU, LLVM-optimising the unrolled threefry
    random-number code of every initializer dominates (e.g. 38 s vs 11 s for the 64 px
    tokenizer's init); the run time of such functions does not matter.
    """
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    lowered = jitted.lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile({"xla_backend_optimization_level": 0})
    return lowered.compile()


def init_state(parts: Parts, mesh: Mesh, rules: rules_lib.Rules, image_size: int,
               rng: jax.Array) -> tuple[dict, Any]:
    """The train state laid out on `mesh`, and its shardings.

    ``{"step", "params", "opt_state"}`` plus ``{"disc_params", "disc_opt_state"}`` with a GAN.
    Shapes come from `jax.eval_shape`; the jitted init writes each array in its sharding.
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

    abstract = jax.eval_shape(boxed_init, rng)
    shardings = rules_lib.logical_shardings(abstract, mesh, rules)
    init = compile_cheaply(lambda key: nn.meta.unbox(boxed_init(key)), rng,
                           out_shardings=shardings)
    return init(rng), shardings


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
        out["latents"], temperature=loss_cfg.get("entropy_temperature", 1.0),
        mode=loss_cfg.get("entropy_mode", "full"))
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


def _progress_line(step: int, steps: int, mean: dict, record: dict, shown) -> str:
    rate = record["steps_per_s"]
    eta = format_duration((steps - step) / rate) if rate > 0 else "?"
    parts = [f"[tokenizer] step {step:>{len(str(steps))}}/{steps} ({100 * step / steps:.0f}%)"]
    parts += [f"{k} {mean[k]:.4g}" for k in shown if k in mean]
    parts += [f"{record['img_per_s']:,.1f} img/s", f"{rate:.2f} step/s", f"ETA {eta}"]
    return " | ".join(parts)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict:
    """Trains (or resumes) the tokenizer in `workdir`; returns the final record (with the
    end-of-training evaluation when ``train.eval_examples > 0``).

    `stop_at`: leave the loop after this step as an interrupted run would (a checkpoint is
    written there; no final evaluation); a later call resumes. For tests and time-boxed jobs.
    """
    steps = int(config.train.steps)
    global_batch = int(config.train.batch_size)
    if steps <= 0 or global_batch <= 0:
        raise UserError(f"train.steps and train.batch_size must be positive, got "
                        f"{steps} and {global_batch}")
    mesh = mesh_lib.make_mesh(config.mesh, config.get("dcn_mesh", None))
    rules = rules_lib.get_rules(tuple(config.sharding.get("rules", ())))
    shards = loop.batch_shards(mesh, rules)
    if global_batch % jax.process_count() or global_batch % shards:
        raise UserError(f"train.batch_size {global_batch} must be divisible by the "
                        f"{jax.process_count()} processes and the {shards} data-parallel shards")
    local_batch = global_batch // jax.process_count()
    parts = build(config)
    os.makedirs(workdir, exist_ok=True)
    loop.check_same_model(os.path.join(workdir, CONFIG_FILE), config, "a tokenizer")

    iterator = images_lib.image_batches(config.data, "train", local_batch, seed=config.seed,
                                        num_threads=int(config.data.get("num_threads", 2)))
    image_size = int(config.data.image_size)
    state, state_shardings = init_state(parts, mesh, rules, image_size,
                                        jax.random.key(config.seed))
    image_sharding = rules_lib.batch_sharding(mesh, rules, 4)
    loss_cfg = config.loss
    gan_start = int(loss_cfg.get("gan_start_step", 0))
    steps_fns = {False: make_train_step(parts, loss_cfg, state_shardings, image_sharding,
                                        with_gan=False)}
    if parts.disc is not None:
        steps_fns[True] = make_train_step(parts, loss_cfg, state_shardings, image_sharding,
                                          with_gan=True)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                max_to_keep=int(config.train.get("keep_checkpoints", 2)),
                                save_interval_steps=int(config.train.checkpoint_every))
    state, first_step = loop.resume("tokenizer", workdir, checkpointer, state, state_shardings,
                                    iterator)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    grid = image_size // parts.model.downsample_factor
    print(f"[tokenizer] {n_params:,} parameters; {image_size}px -> {grid}x{grid} codes of "
          f"{parts.model.codebook_size}; batch {global_batch}; mesh {dict(mesh.shape)}"
          + (f"; GAN from step {gan_start}" if parts.disc is not None else ""), flush=True)

    # A fixed set of test faces for the reconstruction grids.
    num_grid = int(config.train.get("num_grid_images", 16))
    grid_images = None
    if num_grid > 0:
        grid_iter = images_lib.image_batches(_eval_data_config(config, num_grid),
                                             config.train.eval_split, num_grid, shuffle=False,
                                             repeat=False, drop_remainder=False,
                                             process_index=0, process_count=1)
        grid_images = next(grid_iter)["image"]
    reconstruct = make_reconstruct_fn(parts.model)
    image_every = int(config.train.get("image_every", 0))

    def write_grid(step: int) -> None:
        if grid_images is None or jax.process_index() != 0:
            return
        _, recon = reconstruct(state["params"], grid_images)
        write_recon_grid(os.path.join(workdir, "images", f"recon_{step:06d}.png"), grid_images,
                         np.asarray(recon))

    logger = MetricsLogger(workdir, steps, name="tokenizer", items_name="img",
                           first_step=first_step)
    log_every = max(int(config.train.log_every), 1)
    shown = ("loss", "l1", "psnr", "batch_entropy", "batch_usage", "g_loss", "d_loss")
    pending: list[dict] = []
    t_train = time.perf_counter()
    step = first_step
    last = steps if stop_at is None else min(steps, int(stop_at))
    while step < last:
        local = next(iterator)["image"]
        images = jax.make_array_from_process_local_data(image_sharding, np.asarray(local))
        with_gan = parts.disc is not None and step >= gan_start
        state, metrics = steps_fns[with_gan](state, images)
        pending.append(metrics)
        step += 1
        logger.count(global_batch)
        if step % log_every == 0 or step == steps:
            host = jax.device_get(pending)
            mean = {k: float(np.mean([m[k] for m in host if k in m])) for k in host[-1]}
            pending = []
            record = logger.log(step, mean, print_line=False)  # every metric to the jsonl
            if jax.process_index() == 0:
                print(_progress_line(step, steps, mean, record, shown), flush=True)
        if checkpointer.save(step, state, iterator, force=step == last):
            save_tokenizer(workdir, config, state["params"], step)
        if image_every and (step % image_every == 0 or step == steps):
            write_grid(step)
    checkpointer.close()
    train_seconds = time.perf_counter() - t_train
    if step < steps:
        print(f"[tokenizer] stopped at step {step} of {steps}; run again to resume", flush=True)
        return {"train_seconds": train_seconds, "trained_steps": step - first_step}
    if step == first_step:  # nothing left to train: still leave an export and a grid
        save_tokenizer(workdir, config, state["params"], step)
        write_grid(step)

    record: dict = {"train_seconds": train_seconds, "trained_steps": step - first_step}
    num_eval = int(config.train.get("eval_examples", 0))
    if num_eval > 0:
        result = evaluate_params(parts.model, state["params"],
                                 _eval_data_config(config, num_eval), config.train.eval_split,
                                 batch_size=min(100, num_eval))
        record.update({f"eval_{k}": v for k, v in result.items()})
        print(f"[tokenizer] {config.train.eval_split}: PSNR {result['psnr']:.2f} dB, code usage "
              f"{result['code_usage']:.3f}, perplexity {result['code_perplexity']:.1f} "
              f"({result['num_images']} faces)", flush=True)
    logger.log(step, record, print_line=False)
    if jax.process_index() == 0:  # written last: its presence says training completed
        path = os.path.join(workdir, TRAIN_SUMMARY)
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step, **record}, f)
        os.replace(path + ".tmp", path)
    print(f"[tokenizer] trained {step - first_step} steps in {format_duration(train_seconds)}; "
          f"tokenizer exported to {workdir}", flush=True)
    return record


def main(argv: list[str]) -> None:
    from unif2ace_jax import cli

    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/tokenizer_synthface_64.py")
    train(config, cli.require("workdir"))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, images and the "
                        "exported tokenizer.")
    return config_flags.DEFINE_config_file("config", None, "Tokenizer config file.",
                                           lock_config=True)


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _CONFIG = _define_flags()
    run_cli(main)
