"""Files written whole or not at all, and JSON files read with one-line errors.

Every file a command writes for others to read (configs, params, summaries, images, records'
metadata) goes through `atomic_open`: the bytes go to a temporary file beside the target, which
replaces the target only once it is complete, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Any, Iterator

from unif2ace_jax.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f: ...``: `path` appears, complete, when the block
    ends without an error; on an error the temporary file is removed and `path` is untouched.
    The parent directory is created if needed."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # unique: concurrent writers never share one
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (text or bytes) to `path` with `atomic_open`."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs: Any) -> None:
    """``json.dump(value, f, **dump_kwargs)`` into `path` with `atomic_open`."""
    with atomic_open(path, "w") as f:
        json.dump(value, f, **dump_kwargs)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value in `path`; a one-line UserError naming `what` (e.g. "attributes file")
    when the file is missing, unreadable or not valid JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON: {path} ({_one_line(e)})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({_one_line(e)})") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """`read_json` of a file that must hold a JSON object (UserError otherwise)."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UserError(f"{os.fspath(path)}: expected a JSON object")
    return value


def _one_line(e: BaseException, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit]
