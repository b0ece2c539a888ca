"""Progress lines and the `metrics.jsonl` log shared by every trainer in the project.

A progress line looks like::

    [tokenizer] step  1200/6000 (20%) | loss 0.0412 | psnr 27.1 | 410 img/s | 3.1 step/s | ETA 25m48s

`metrics.jsonl` gets one JSON object per logged step (always with `step`), written by process 0.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _scalar(value: Any) -> float | int | str:
    if isinstance(value, (str, int)):
        return value
    array = np.asarray(value)
    if array.dtype.kind in "iu":
        return int(array)
    return float(array)


class MetricsLogger:
    """Throughput/ETA tracking, a printed progress line and `DIR/metrics.jsonl`."""

    def __init__(self, workdir: str | None, total_steps: int, *, name: str = "train",
                 items_name: str = "tokens", first_step: int = 0, stream=None):
        self.total_steps = total_steps
        self.name = name
        self.items_name = items_name
        self.stream = stream or sys.stdout
        self._is_writer = jax.process_index() == 0
        self._path = None
        if workdir and self._is_writer:
            os.makedirs(workdir, exist_ok=True)
            self._path = os.path.join(workdir, "metrics.jsonl")
        self._last_time = time.perf_counter()
        self._last_step = first_step
        self._items_since = 0.0

    def count(self, items: float) -> None:
        """Adds `items` processed (tokens, images) since the last `log`, for throughput."""
        self._items_since += items

    def log(self, step: int, metrics: Mapping[str, Any], *, print_line: bool = True) -> dict:
        """Writes one record for `step` with throughput and ETA; returns the record."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        steps_per_s = steps / elapsed if steps > 0 else 0.0
        items_per_s = self._items_since / elapsed
        record = {"step": int(step)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        record[f"{self.items_name}_per_s"] = items_per_s
        record["steps_per_s"] = steps_per_s
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
        self._last_time, self._last_step, self._items_since = now, step, 0.0
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if print_line and self._is_writer:
            width = len(str(self.total_steps))
            parts = [f"[{self.name}] step {step:>{width}}/{self.total_steps} "
                     f"({100.0 * step / max(self.total_steps, 1):.0f}%)"]
            for key, value in metrics.items():
                value = _scalar(value)
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
            parts.append(f"{items_per_s:,.0f} {self.items_name}/s")
            parts.append(f"{steps_per_s:.2f} step/s")
            parts.append(f"ETA {format_duration(eta)}")
            print(" | ".join(parts), file=self.stream, flush=True)
        return record


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty when absent)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_line(name: str, total: int, step: int, metrics: Mapping[str, float],
                  record: Mapping[str, Any], *, shown: tuple[str, ...], items: str) -> str:
    """``[name] step S/T (P%) | key value | ... | throughput | R step/s | ETA``.

    `shown`: the keys of `metrics` to print (those present); `items`: the throughput, a format
    string over `record`, e.g. ``"{tokens_per_s:,.0f} tok/s"``.
    """
    rate = record["steps_per_s"]
    eta = format_duration((total - step) / rate) if rate > 0 else "?"
    parts = [f"[{name}] step {step:>{len(str(total))}}/{total} ({100 * step / total:.0f}%)"]
    parts += [f"{key} {metrics[key]:.4g}" for key in shown if key in metrics]
    parts += [items.format(**record), f"{rate:.2f} step/s", f"ETA {eta}"]
    return " | ".join(parts)
