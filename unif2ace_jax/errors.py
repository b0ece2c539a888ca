"""User-facing errors and the CLI wrapper that turns them into one line and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

from absl import app, flags


class UserError(Exception):
    """Bad input from the user (missing file, corrupt image, unknown name, wrong shape).

    CLIs print `error: <message>` on one line to stderr and exit with status 2.
    """


def check_shape(name: str, array: Any, expected: Sequence[int | str]) -> None:
    """UserError ``<name> must be [<expected>], got shape (...)`` unless `array` has that shape:
    an int entry must match exactly, a str entry (a dimension's name, e.g. "B") any size."""
    shape = tuple(array.shape)
    if len(shape) != len(expected) or any(
            isinstance(want, int) and got != want for got, want in zip(shape, expected)):
        raise UserError(f"{name} must be [{', '.join(map(str, expected))}], got shape {shape}")


def cli_main(main: Callable[..., object]) -> Callable[..., object]:
    """Decorates an absl `main(argv)` so a UserError (or an unknown config key) exits cleanly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def run_cli(main: Callable[[list[str]], object]) -> None:
    """absl `app.run` with clean one-line errors for bad flags and UserErrors.

    absl prints a usage dump for bad flags; ml_collections raises on unknown
    `--config.x` keys while parsing. Both become `error: ...` and exit status 2.
    """
    try:
        app.run(cli_main(main), flags_parser=_parse_flags_or_exit)
    except UserError as e:  # raised by flag parsing helpers
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KeyError):  # ml_collections: unknown `--config.x` key
            print(f"error: unknown config key {cause.args[0]!r}", file=sys.stderr)
        else:
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, AttributeError) as e:
        # ml_collections config_flags raises these (message: the quoted key) for an
        # unknown `--config.x` override.
        key = _one_line(str(e)).strip("\"'")
        print(f"error: unknown config key {key!r} in a --config override", file=sys.stderr)
        sys.exit(2)
    except (ValueError, TypeError, OSError, UserError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(2)


def config_value(holder) -> "ml_collections.ConfigDict":  # noqa: F821
    """The ConfigDict behind a `config_flags.DEFINE_config_file` holder.

    A config file that failed to load (missing, syntax error) raises UserError with the cause.
    """
    try:
        value = holder.value
    except KeyError as e:
        raise UserError(f"unknown config key {e.args[0]!r}") from None
    except (AttributeError, ValueError, TypeError) as e:
        raise UserError(f"bad config override: {_one_line(str(e))}") from None
    error = getattr(value, "_error", None) if type(value).__name__ == "_ErrorConfig" else None
    if error is not None:
        raise UserError(f"cannot load config: {_one_line(str(error))}")
    return value


def _one_line(message: str) -> str:
    return " ".join(message.strip().split())
