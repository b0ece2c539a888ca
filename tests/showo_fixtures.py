"""Where the Show-o golden fixtures are: ``shared/fixtures/showo/<name>`` beside the repository
(see its README), or under ``$UNIF2ACE_SHARED/fixtures/showo`` when ``UNIF2ACE_SHARED`` names the
folder that holds ``fixtures/``."""

from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("UNIF2ACE_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
SHOWO = os.path.join(SHARED, "fixtures", "showo")


def path(name: str) -> str:
    """The folder of the Show-o fixture `name` ("showo", "magvit2"), present or not."""
    return os.path.join(SHOWO, name)


def require(folder: str) -> str:
    """`folder`; skips the calling test when it is absent."""
    if not os.path.isdir(folder):
        pytest.skip(f"Show-o golden fixture folder {folder} is absent (set UNIF2ACE_SHARED)")
    return folder


def golden(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``<name>/golden.npz``; skips the calling test when the fixture is absent."""
    return dict(np.load(os.path.join(require(path(name)), "golden.npz")))
