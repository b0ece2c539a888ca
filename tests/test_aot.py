"""AOT fit check (`unif2ace_jax.aot`), TPU topologies, sharding presets, multi-host detection.

The compile test needs `libtpu`; it runs with the first Python that can import it (this one,
or the interpreter named by ``UNIF2ACE_TPU_PYTHON``, default /tmp/tpuvenv/bin/python) and is
skipped with a message otherwise. Everything else is pure and runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import ml_collections
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.parallel import distributed, presets, topology
from unif2ace_jax.parallel.rules import DEFAULT_RULES, get_rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Topologies


@pytest.mark.parametrize("text,name,slice_name,chips", [
    ("v5p:4x4x2", "v5p:4x4x2", "v5p-64", 32),
    ("v5e:16x16", "v5e:16x16", "v5e-256", 256),
    ("v4:4x4x4", "v4:4x4x4", "v4-128", 64),
    ("v6e:2x4", "v6e:2x4", "v6e-8", 8),
    ("v4-128", "v4:4x4x4", "v4-128", 64),
    ("V5litepod-16", "v5e:4x4", "v5e-16", 16),
    ("v5p-8", "v5p:2x2x1", "v5p-8", 4),
])
def test_parse_topology(text, name, slice_name, chips):
    topo = topology.parse_topology(text)
    assert (topo.name, topo.slice_name, topo.num_chips) == (name, slice_name, chips)
    a, b = topo.shape[0], topo.shape[1]
    assert a * b * (topo.shape[2] if len(topo.shape) == 3 else 1) == chips


@pytest.mark.parametrize("text,words", [
    ("v9:2x2", ["unknown TPU kind", "v9"]),
    ("v5p:2x2", ["3 dimensions"]),
    ("v5e:2x2x2", ["2 dimensions"]),
    ("v5p-7", ["TensorCores"]),
    ("v5p-24", ["not a standard slice"]),
    ("tpu", ["unknown topology"]),
    ("", ["unknown topology"]),
])
def test_parse_topology_errors(text, words):
    with pytest.raises(UserError) as e:
        topology.parse_topology(text)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_chip_table_and_env():
    gib = 1024 ** 3
    assert {k: c.hbm_bytes // gib for k, c in topology.CHIPS.items()} == {
        "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
    env = topology.libtpu_env(topology.parse_topology("v5e:16x16"))
    assert env["TPU_ACCELERATOR_TYPE"] == "v5litepod-256"
    assert env["TPU_WORKER_HOSTNAMES"] == "localhost"


# ---------------------------------------------------------------------------------------------
# Presets


def _spec(names, rules):
    return tuple(nn.logical_to_mesh_axes(names, rules))


def test_presets_mesh_and_rules():
    fsdp = presets.get_preset("fsdp")
    assert dict(fsdp.mesh) == {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}
    rules = get_rules(presets.merged_rules(fsdp))
    # Every parameter of the backbone is split along its width only.
    assert _spec(("layers", "embed", "heads", "kv"), rules) == (None, "fsdp", None, None)
    assert _spec(("layers", "embed", "mlp"), rules) == (None, "fsdp", None)
    assert _spec(("vocab", "embed"), rules) == (None, "fsdp")

    tp = presets.get_preset("fsdp_tensor:8")
    assert dict(tp.mesh) == {"data": 1, "fsdp": -1, "tensor": 8, "expert": 1}
    rules = get_rules(presets.merged_rules(tp))
    assert _spec(("layers", "embed", "heads", "kv"), rules) == (None, "fsdp", "tensor", None)
    assert _spec(("layers", "mlp", "embed"), rules) == (None, "tensor", "fsdp")
    assert _spec(("embed", "vocab"), rules) == ("fsdp", "tensor")
    assert dict(rules)["batch"] == ("data", "fsdp")

    ep = presets.get_preset("fsdp_expert")
    assert dict(ep.mesh)["expert"] == 8
    rules = get_rules(presets.merged_rules(ep))
    assert _spec(("layers", "exp", "embed", "mlp"), rules) == (None, "expert", "fsdp", None)
    assert dict(rules)["batch"] == ("data", "fsdp", "expert")
    # Every preset names only known logical axes (get_rules would raise otherwise).
    known = {name for name, _ in DEFAULT_RULES}
    for p in presets.PRESETS.values():
        assert {name for name, _ in p.rules} <= known


def test_preset_errors():
    for spec, word in (("tp", "unknown sharding preset"), ("fsdp:4", "takes no size"),
                       ("fsdp_tensor:0", "positive integer"), ("fsdp_tensor:x", "positive")):
        with pytest.raises(UserError, match=word):
            presets.get_preset(spec)


def test_apply_preset_config_rules_win():
    config = ml_collections.ConfigDict({
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},
        "sharding": {"rules": (("mlp", None),), "preset": "fsdp_tensor:2"}})
    config.lock()
    out = presets.apply_preset(config)
    assert dict(out.mesh) == {"data": 1, "fsdp": -1, "tensor": 2, "expert": 1}
    table = dict(get_rules(tuple(out.sharding.rules)))
    assert table["heads"] == "tensor" and table["mlp"] is None  # the config's rule wins
    assert dict(config.mesh)["data"] == -1  # the input is not modified
    # --preset beats config.sharding.preset; no preset: the same object comes back.
    assert dict(presets.apply_preset(config, "fsdp").mesh)["tensor"] == 1
    plain = ml_collections.ConfigDict({"mesh": {"data": -1}, "sharding": {"rules": ()}})
    assert presets.apply_preset(plain) is plain


# ---------------------------------------------------------------------------------------------
# Multi-host detection


@pytest.mark.parametrize("env,kind", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # one-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"SLURM_NTASKS": "16"}, None),  # no job id: not inside SLURM
])
def test_launch_kind_from_env(env, kind):
    launch = distributed.launch_kind(env)
    assert (launch.kind if launch else None) == kind


def test_launch_kind_explicit_flags():
    env = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "16"}
    launch = distributed.launch_kind(env, coordinator="127.0.0.1:1234", num_processes=2,
                                     process_id=1)
    assert launch == distributed.Launch("explicit", "127.0.0.1:1234", 2, 1)
    bad = [dict(coordinator="127.0.0.1:1234"),
           dict(coordinator="127.0.0.1", num_processes=2, process_id=0),
           dict(coordinator="h:1", num_processes=2, process_id=2),
           dict(num_processes=2, process_id=0)]
    for kwargs in bad:
        with pytest.raises(UserError):
            distributed.launch_kind({}, **kwargs)
    assert distributed.local_device_ids({}) is None
    assert distributed.local_device_ids({"UNIF2ACE_LOCAL_DEVICE_IDS": "0,1,2,3"}) == [0, 1, 2, 3]
    with pytest.raises(UserError):
        distributed.local_device_ids({"UNIF2ACE_LOCAL_DEVICE_IDS": "0,a"})
    assert distributed.uses_cpu({"JAX_PLATFORMS": "cpu"})
    assert not distributed.uses_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not distributed.uses_cpu({})


# ---------------------------------------------------------------------------------------------
# The CLI


def _tpu_python() -> str | None:
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    candidate = os.environ.get("UNIF2ACE_TPU_PYTHON", "/tmp/tpuvenv/bin/python")
    if not os.path.isfile(candidate):
        return None
    probe = subprocess.run([candidate, "-c", "import libtpu, unif2ace_jax"],
                           capture_output=True, text=True, timeout=120)
    return candidate if probe.returncode == 0 else None


def _run_aot(python: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([python, "-m", "unif2ace_jax.aot", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
def test_aot_compiles_tiny_config_for_a_small_slice():
    python = _tpu_python()
    if python is None:
        pytest.skip("libtpu is not importable here nor in $UNIF2ACE_TPU_PYTHON "
                    "(/tmp/tpuvenv/bin/python); install the 'tpu' extra to run the AOT check")
    proc = _run_aot(python, "--config=configs/unif2ace_1p8b.py:tiny", "--topology=v5e:2x2",
                    "--preset=fsdp", "--text_vocab_size=500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # no libtpu / JAX warnings
    out = json.loads(proc.stdout)
    assert out["num_devices"] == 4 and out["mesh"]["fsdp"] == 4
    assert out["device_kind"].startswith("TPU v5")
    assert out["global_batch"] == 8 and out["hbm_bytes"] == 16 * 1024 ** 3
    assert out["total_bytes"] == (out["argument_bytes"] + out["output_bytes"]
                                  - out["alias_bytes"] + out["temp_bytes"]
                                  + out["generated_code_bytes"])
    assert out["fits"] is True
    # The donated state (params + Adam's two moments, f32) is an argument, split 4 ways: at
    # least a quarter of it per device, and less than a whole copy (TPU layouts pad small
    # dimensions to tiles of 8 x 128, so tiny shapes take more than their quarter).
    state = 3 * 4 * out["params"]
    assert state / 4 <= out["argument_bytes"] < state
    # Per-device XLA FLOPs: at least this device's share of 6 N T, not wildly more.
    share = out["model_flops_per_step"] / 4
    assert share < out["xla_flops_per_device"] < 4 * share
    assert out["mfu"] == pytest.approx(share / out["xla_flops_per_device"])
    assert out["est_step_time_s"] == pytest.approx(out["xla_flops_per_device"] / 197e12)


def test_aot_unknown_topology_is_one_line():
    proc = _run_aot(sys.executable, "--config=configs/unif2ace_1p8b.py:tiny", "--topology=v7x:2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "v7x" in lines[0]


def test_aot_without_libtpu_exits_cleanly():
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed in this interpreter")
    proc = _run_aot(sys.executable, "--config=configs/unif2ace_1p8b.py:tiny",
                    "--topology=v5e:2x2")
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "libtpu is not installed" in lines[0]
