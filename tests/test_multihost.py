"""Two processes on localhost (4 fake CPU devices each, `jax.distributed` with a local
coordinator, gloo collectives) train the tiny config and match one process with 8 devices.

Both runs go through the real trainer (`train.train`); the two-process one through the CLI with
``--coordinator/--num_processes/--process_id``. Host p reads records ``p::2`` of the data, so the
one-process reference is fed the same global batches: its iterator concatenates the two hosts'
per-host batches (host 0's rows first, as `make_array_from_process_local_data` lays them out on
the ``data`` axis). Losses of every step and the final parameters (restored from the Orbax
checkpoints both runs wrote; the two-process one written by both processes) must agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from unified_env import ROOT, build_env

STEPS = 3

REFERENCE = r"""
import json, sys
import numpy as np
from unif2ace_jax.data import pipeline
from unif2ace_jax.train.train import train
from unified_env import load_config_module

overrides, workdir = json.loads(sys.argv[1]), sys.argv[2]
real = pipeline.make_train_iterator


class TwoHosts:
    # The global batch a two-process run assembles: host 0's rows, then host 1's.
    def __init__(self, iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):  # bytes: what grain's checkpoint handler stores for a non-grain iterator
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state):
        for it, s in zip(self.iterators, json.loads(state)):
            it.set_state(s)

    def start_prefetch(self):
        pass


def two_hosts(config, **kwargs):
    return TwoHosts([real(config, process_index=i, process_count=2, **kwargs) for i in range(2)])


pipeline.make_train_iterator = two_hosts
config = load_config_module("synthface_tiny").get_config("tiny")
for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for p in path:
        target = target[p]
    target[last] = value
import jax
assert jax.device_count() == 8 and jax.process_count() == 1
train(config, workdir)
"""


def _overrides(env: dict) -> dict:
    return {"data.data_dir": env["data_dir"], "data.dataset": "synthface_codes",
            "data.tokenizer.model_path": env["text_model"], "tokenizer_workdir": env["tok_dir"],
            "model.num_image_codes": env["num_codes"], "model.image_grid": env["grid"],
            "total_steps": STEPS, "log_every": 1, "ckpt_every": STEPS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(ROOT, "tests"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    for key in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


def _wait_all(procs: list[subprocess.Popen], timeout: int) -> list[str]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                pytest.fail(f"process exited {p.returncode}:\n{err[-4000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    env = build_env()
    overrides = _overrides(env)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    port = _free_port()
    flags = [f"--config={os.path.join(ROOT, 'configs', 'synthface_tiny.py')}:tiny",
             f"--workdir={two}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    flags += [f"--config.{k}={v}" for k, v in overrides.items()]
    procs = [subprocess.Popen([sys.executable, "-m", "unif2ace_jax.train", *flags,
                               f"--process_id={i}"], cwd=ROOT, env=_env(4), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outs = _wait_all(procs, timeout=900)
    assert "mesh {'data': 8" in outs[0], outs[0][-2000:]

    ref = subprocess.Popen([sys.executable, "-c", REFERENCE, json.dumps(overrides), one],
                           cwd=ROOT, env=_env(8), text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    _wait_all([ref], timeout=900)

    ref_losses, got_losses = _losses(one), _losses(two)
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1))
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses]
    np.testing.assert_allclose([v for _, v in got_losses], [v for _, v in ref_losses],
                               rtol=2e-5, atol=1e-6)

    from unif2ace_jax.checkpoint.trained import load_trained

    ref_run, got_run = load_trained(one), load_trained(two)
    assert ref_run.step == got_run.step == STEPS
    import jax

    ref_params = jax.tree.map(np.asarray, jax.device_get(ref_run.params))
    got_params = jax.tree.map(np.asarray, jax.device_get(got_run.params))
    assert jax.tree.structure(ref_params) == jax.tree.structure(got_params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         ref_params, got_params))
    assert max(diffs) < 1e-5
    # The runs trained (else equal parameters would prove nothing).
    assert ref_losses[0][1] != ref_losses[-1][1]
