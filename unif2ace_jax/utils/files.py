"""Files written whole or not at all.

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
