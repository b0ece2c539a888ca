"""Shared test set-up: CPU only, and a runner for code that needs 8 fake devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 900) -> str:
    """Runs `code` in a fresh Python with `num_devices` fake CPU devices; returns its stdout.

    XLA reads the device-count flag once, before JAX starts, so multi-device tests need
    their own process. A non-zero exit fails the calling test with the child's stderr.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture
def multidevice():
    return run_with_devices
