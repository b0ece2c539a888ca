"""Checks shared by the command-line entry points (absl ``main(argv)`` functions).

Each check raises a UserError with the one-line message the CLIs print (`errors.run_cli`
turns it into ``error: ...`` and exit status 2).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from unif2ace_jax.errors import UserError, config_value


def load_config(path: str, arg: str | None = None) -> Any:
    """``get_config(arg)`` of the config file at `path` (``get_config()`` when `arg` is empty).

    The one way to load a config file outside ``--config`` flags: commands that take a config
    path, and config files that build on a sibling (``os.path.dirname(__file__)``).
    UserError when there is no such file; a bad `arg` raises the file's ValueError.
    """
    if not os.path.isfile(path):
        raise UserError(f"no config file {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def quiet_logs() -> None:
    """Orbax / TFDS log every checkpoint and dataset read at INFO; keep the output readable
    (unless ``--verbosity`` was given)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def no_positional(argv: list[str]) -> None:
    """UserError when the command line holds arguments besides flags."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")


def require(name: str) -> Any:
    """The value of flag ``--name``; UserError ``--name is required`` when it is unset/empty."""
    value = getattr(flags.FLAGS, name)
    if not value:
        raise UserError(f"--{name} is required")
    return value


def begin(argv: list[str], *required: str) -> None:
    """The usual start of an inference CLI: `quiet_logs`, `no_positional`, then `require` of
    each flag in `required`, in that order."""
    quiet_logs()
    no_positional(argv)
    for name in required:
        require(name)


def require_config(holder: Any, example: str) -> Any:
    """The ConfigDict of a `config_flags.DEFINE_config_file` holder (`errors.config_value`);
    UserError ``--config is required (e.g. --config=<example>)`` when none was given."""
    config = config_value(holder)
    if config is None:
        raise UserError(f"--config is required (e.g. --config={example})")
    return config


def define_trainer_flags(workdir_help: str, config_help: str,
                         default_config: str | None = None) -> Any:
    """Defines a trainer's two flags, ``--workdir`` and a locked ``--config`` file; returns the
    config holder (for `require_config`)."""
    flags.DEFINE_string("workdir", None, workdir_help)
    return config_flags.DEFINE_config_file("config", default_config, config_help,
                                           lock_config=True)
