"""CLI: ``python -m unif2ace_jax.train --config=configs/<name>.py --workdir=DIR``.

Overrides: ``--config.total_steps=100``, ``--config.data.batch_size=32``, ... An unknown key, a
missing config or workdir prints one ``error:`` line and exits with status 2.

Multi-host: on a TPU pod slice or under a multi-task SLURM step, `jax.distributed.initialize()`
runs first (`parallel/distributed.py`); elsewhere it can be forced with
``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (e.g. several processes on one
machine, CPU collectives through gloo). Every process runs this same command.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from unif2ace_jax import cli
from unif2ace_jax.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run.json.")
flags.DEFINE_string("coordinator", None, "Multi-process: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv: list[str]) -> None:
    cli.quiet_logs()
    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/synthface_tiny.py")
    workdir = cli.require("workdir")
    from unif2ace_jax.parallel.distributed import maybe_initialize

    maybe_initialize(coordinator=flags.FLAGS.coordinator, num_processes=flags.FLAGS.num_processes,
                     process_id=flags.FLAGS.process_id)
    from unif2ace_jax.train.train import train

    train(config, workdir)


if __name__ == "__main__":
    run_cli(main)
