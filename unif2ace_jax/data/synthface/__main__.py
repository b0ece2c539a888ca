"""Preview CLI: writes a grid of SynthFace images and prints their captions and QA.

python -m unif2ace_jax.data.synthface --out=/tmp/synthface.png --num=16 --image_size=64
"""

from __future__ import annotations

import numpy as np
from absl import flags

from unif2ace_jax.data.synthface import generate
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.utils.image_grid import save_image_grid

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "PNG file for the preview grid.")
flags.DEFINE_integer("num", 16, "Number of examples.")
flags.DEFINE_integer("image_size", 64, "Image side in pixels (multiple of 32).")
flags.DEFINE_string("split", "train", "train, test or test_heldout_combos.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("upscale", 1, "Nearest-neighbour upscaling of each tile in the grid.")
flags.DEFINE_bool("qa", False, "Also print the QA pairs.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        raise UserError("--out=FILE.png is required")
    if FLAGS.num < 1:
        raise UserError(f"--num must be >= 1, got {FLAGS.num}")
    examples = list(generate(FLAGS.seed, FLAGS.num, FLAGS.image_size, FLAGS.split))
    for i, ex in enumerate(examples):
        print(f"[{i}] {ex['caption']}")
        if FLAGS.qa:
            for (q, a), t in zip(ex["qa"], ex["qa_types"]):
                print(f"    ({t}) {q} -> {a}")
    save_image_grid(np.stack([ex["image"] for ex in examples]), FLAGS.out,
                    labels=[str(i) for i in range(len(examples))], upscale=FLAGS.upscale)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    run_cli(main)
