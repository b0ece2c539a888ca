"""The main job's scheduler: dependencies, how many stages at once, and stopping on a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from unif2ace_jax.stage_graph import run_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The main job's shape: a diamond behind one root, and a tail.
AFTER = {"data": (), "judge": ("data",), "tok": ("data",), "enc": ("data",),
         "tok_eval": ("tok", "judge"), "emb": ("tok", "enc"), "train": ("emb", "judge"),
         "eval": ("train",)}


class Recorder:
    def __init__(self, hold: float = 0.02):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.running = 0
        self.most_at_once = 0
        self.hold = hold

    def __call__(self, name: str, abort: threading.Event) -> None:
        with self.lock:
            self.events.append(("start", name))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.hold)
        with self.lock:
            self.running -= 1
            self.events.append(("end", name))


@pytest.mark.parametrize("jobs", [1, 2, 3, 8])
def test_every_stage_runs_once_after_its_dependencies(jobs):
    rec = Recorder()
    run_graph(list(AFTER), AFTER, rec, jobs=jobs)
    starts = [n for kind, n in rec.events if kind == "start"]
    assert sorted(starts) == sorted(AFTER)
    for name, deps in AFTER.items():
        started = rec.events.index(("start", name))
        for dep in deps:
            assert rec.events.index(("end", dep)) < started, (name, dep)
    assert rec.most_at_once <= jobs
    if jobs == 1:
        assert starts == list(AFTER)  # one at a time, in the given order


def test_independent_stages_really_run_together():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three are running at once

    def run(name, abort):
        if name in ("judge", "tok", "enc"):
            barrier.wait()

    run_graph(["data", "judge", "tok", "enc"], AFTER, run, jobs=3)
    assert not barrier.broken


def test_dependencies_outside_the_run_count_as_done():
    rec = Recorder(hold=0)
    run_graph(["train", "eval"], AFTER, rec, jobs=2)  # data ... emb were skipped by the caller
    assert [n for kind, n in rec.events if kind == "start"] == ["train", "eval"]


def test_a_failure_stops_the_rest_and_is_raised():
    started, stopped_early, aborts = [], [], []

    def run(name, abort):
        started.append(name)
        if name == "tok":
            time.sleep(0.05)
            raise RuntimeError("tok broke")
        if name in ("judge", "enc"):  # long stages: they return once told to stop
            if abort.wait(timeout=30):
                stopped_early.append(name)

    t0 = time.time()
    with pytest.raises(RuntimeError, match="tok broke"):
        run_graph(list(AFTER), AFTER, run, jobs=3, on_abort=lambda: aborts.append(1))
    assert time.time() - t0 < 20
    assert sorted(started) == ["data", "enc", "judge", "tok"]  # nothing after the failure
    assert sorted(stopped_early) == ["enc", "judge"] and aborts == [1]


def test_a_cycle_and_bad_jobs_are_refused():
    with pytest.raises(ValueError, match="cycle"):
        run_graph(["a", "b"], {"a": ("b",), "b": ("a",)}, lambda n, abort: None)
    with pytest.raises(ValueError, match="jobs"):
        run_graph(["a"], {}, lambda n, abort: None, jobs=0)


def test_main_stops_the_child_processes_of_other_stages():
    """`main._run` with the real process handling: a failing command ends the job while a
    60-second command of another stage is terminated, not waited for."""
    script = textwrap.dedent("""
        import sys, threading, time
        from unif2ace_jax import main
        from unif2ace_jax.stage_graph import run_graph
        main.FLAGS(["main"])
        commands = {"slow": [sys.executable, "-c", "import time; time.sleep(60)"],
                    "bad": [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(3)"]}
        t0 = time.time()
        try:
            run_graph(["slow", "bad"], {}, lambda n, abort: main._run(commands[n], n, abort),
                      jobs=2, on_abort=main._stop_children)
        except main.UserError as e:
            print("raised:", e)
        print("seconds:", round(time.time() - t0, 1))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=50, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    raised = [line for line in lines if line.startswith("raised:")]
    assert len(raised) == 1 and "stage bad failed (exit 3)" in raised[0], proc.stdout
    seconds = float([line for line in lines if line.startswith("seconds:")][0].split()[1])
    assert seconds < 30, proc.stdout
