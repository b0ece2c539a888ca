"""Text-to-image with a trained unified model; writes a grid of faces as PNG.

    python -m unif2ace_jax.generate --workdir=DIR --prompt="A person with red hair ..." \\
        --out=faces.png [--num=4] [--steps=16] [--guidance=1.75] [--seed=0] \\
        [--sampler=maskgit|ancestral]

``--prompt`` may be repeated: one grid row per prompt, ``--num`` faces each. Unset options come
from the run's ``config.sampling``. Everything else (model, checkpoint, text and image
tokenizers) is read from ``DIR`` (see `checkpoint.trained.load_trained`). A workdir written by
``convert.showo`` samples with Show-o's prompts, mask and MaskGIT schedule (its
``config.sampling``); it needs an image tokenizer (``convert.showo --tokenizer_workdir``). Bad input prints one
``error:`` line and exits with status 2.
"""

from __future__ import annotations

import os

from absl import flags

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.cli import begin
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.sampling.t2i import generate_images
from unif2ace_jax.utils.image_grid import save_image_grid

flags.DEFINE_string("workdir", None, "Training directory of the unified model.")
flags.DEFINE_multi_string("prompt", None, "Caption(s) to draw; repeat for several rows.")
flags.DEFINE_string("out", None, "Output PNG (an image grid).")
flags.DEFINE_integer("num", 4, "Faces per prompt.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sampling.steps).")
flags.DEFINE_float("guidance", None, "CFG weight w (default: config.sampling.guidance).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum("sampler", None, ["maskgit", "ancestral"],
                  "T2I sampler (default: config.sampling.sampler).")
flags.DEFINE_integer("upscale", 0, "Nearest-neighbour zoom of each face (0: to >= 128 px).")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    begin(argv, "workdir")
    prompts = [p for p in (FLAGS.prompt or []) if p.strip()]
    if not prompts:
        raise UserError("--prompt is required (a non-empty caption)")
    if not FLAGS.out:
        raise UserError("--out is required (a .png file)")
    if not FLAGS.out.lower().endswith(".png"):
        raise UserError(f"--out must be a .png file, got {FLAGS.out}")
    if FLAGS.num < 1:
        raise UserError(f"--num must be >= 1, got {FLAGS.num}")
    if FLAGS.steps is not None and FLAGS.steps < 1:
        raise UserError(f"--steps must be >= 1, got {FLAGS.steps}")
    parent = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(parent):
        raise UserError(f"directory of --out does not exist: {parent}")

    trained = load_trained(FLAGS.workdir)
    images = generate_images(trained, prompts, num_per_prompt=FLAGS.num, seed=FLAGS.seed,
                             sampler=FLAGS.sampler, steps=FLAGS.steps, guidance=FLAGS.guidance,
                             chunk=min(32, len(prompts) * FLAGS.num))
    upscale = FLAGS.upscale or max(1, -(-128 // images.shape[1]))
    save_image_grid(images, FLAGS.out, ncols=FLAGS.num, upscale=upscale)
    print(f"wrote {len(images)} faces ({len(prompts)} prompt(s) x {FLAGS.num}) from step "
          f"{trained.step} to {FLAGS.out}")


if __name__ == "__main__":
    run_cli(main)
