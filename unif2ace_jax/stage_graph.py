"""Runs a job's stages as a dependency graph, several at once (the main job's scheduler).

On a machine with a few cores, small trainers (a CNN judge at batch 128, a tokenizer at batch 8)
keep only part of it busy; running the stages that do not read each other's outputs side by side
fills the rest. Each stage is one call of a `run(name, abort)` function on its own thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Mapping, Sequence


def run_graph(names: Sequence[str], after: Mapping[str, Sequence[str]],
              run: Callable[[str, threading.Event], None], *, jobs: int = 1,
              on_abort: Callable[[], None] = lambda: None) -> None:
    """Calls ``run(name, abort)`` once for every name, each when its dependencies have finished.

    Args:
      names: the stages to run; ready stages start in this order.
      after: name -> the names it needs. A dependency not in `names` counts as finished (a stage
        the caller skips).
      run: runs one stage; raises on failure. It should return soon once `abort` is set.
      jobs: how many stages may run at once (1: one after another, in the order of `names`).
      on_abort: called once, on the scheduling thread, when a stage fails (or on an interrupt),
        e.g. to stop the child processes of the other running stages.

    Raises:
      The first stage's exception, after every running stage has returned; stages not started
      by then never start. ValueError for a dependency cycle among `names`.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    wanted = list(dict.fromkeys(names))
    pending = list(wanted)
    finished: set[str] = set()
    running: dict[str, threading.Thread] = {}
    results: queue.Queue = queue.Queue()
    abort = threading.Event()
    failure: BaseException | None = None

    def ready(name: str) -> bool:
        return all(d in finished or d not in wanted for d in after.get(name, ()))

    def worker(name: str) -> None:
        try:
            run(name, abort)
        except BaseException as e:  # noqa: BLE001 - handed to the scheduling thread
            results.put((name, e))
        else:
            results.put((name, None))

    try:
        while pending or running:
            if failure is None:
                for name in [n for n in pending if ready(n)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(name)
                    running[name] = threading.Thread(target=worker, args=(name,), daemon=True,
                                                     name=f"stage-{name}")
                    running[name].start()
                if not running:
                    raise ValueError(f"dependency cycle among stages {', '.join(pending)}")
            elif not running:
                break
            name, error = results.get()
            running.pop(name).join()
            if error is None:
                finished.add(name)
            elif failure is None:
                failure = error
                abort.set()
                on_abort()
    except BaseException:
        abort.set()
        on_abort()
        raise
    if failure is not None:
        raise failure
