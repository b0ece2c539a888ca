"""CLI: ``python -m unif2ace_jax.evaluate --workdir=DIR --split=test`` prints one JSON object.

See `unif2ace_jax.evaluate.unified` for the metrics. Bad input (missing workdir or checkpoint,
unknown split, no judge) prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import json

from absl import flags

from unif2ace_jax.cli import begin
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.evaluate.unified import evaluate

flags.DEFINE_string("workdir", None, "Training directory of the unified model.")
flags.DEFINE_string("split", "test", "Split: test, test_heldout_combos, ...")
flags.DEFINE_string("judge_workdir", None,
                    "Attribute judge (default: the run's config.judge_workdir).")
flags.DEFINE_integer("max_questions", None, "Evaluate at most this many questions (default all).")
flags.DEFINE_integer("num_generate", 200, "Faces generated from captions (0 = skip generation).")
flags.DEFINE_integer("max_nelbo_images", None, "Images for the NELBO (default all).")
flags.DEFINE_integer("nelbo_samples", 1, "Mask draws per image for the NELBO.")
flags.DEFINE_integer("batch_size", 100, "Evaluation batch size.")
flags.DEFINE_integer("seed", 0, "Seed of generation and NELBO masks.")
flags.DEFINE_enum("sampler", None, ["maskgit", "ancestral"], "T2I sampler (default: config).")
flags.DEFINE_integer("steps", None, "T2I sampling steps (default: config).")
flags.DEFINE_float("guidance", None, "CFG weight (default: config).")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    begin(argv, "workdir")
    for name in ("max_questions", "max_nelbo_images"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if FLAGS.num_generate < 0 or FLAGS.nelbo_samples < 1 or FLAGS.batch_size < 1:
        raise UserError("--num_generate must be >= 0, --nelbo_samples and --batch_size >= 1")
    result = evaluate(FLAGS.workdir, FLAGS.split, judge_workdir=FLAGS.judge_workdir,
                      max_questions=FLAGS.max_questions, num_generate=FLAGS.num_generate,
                      max_nelbo_images=FLAGS.max_nelbo_images, nelbo_samples=FLAGS.nelbo_samples,
                      batch_size=FLAGS.batch_size, seed=FLAGS.seed, sampler=FLAGS.sampler,
                      steps=FLAGS.steps, guidance=FLAGS.guidance)
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
