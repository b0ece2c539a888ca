"""Mesh resolution, sharding rules, checkpoint round trip and the metrics log."""

import io
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.checkpoint.manager import Checkpointer, abstract_with_shardings
from unif2ace_jax.errors import UserError
from unif2ace_jax.parallel import mesh as mesh_lib
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.registry import Registry
from unif2ace_jax.train.progress import MetricsLogger, format_duration, read_metrics


def test_resolve_axis_sizes_fills_minus_one():
    assert mesh_lib.resolve_axis_sizes({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
    assert mesh_lib.resolve_axis_sizes({"fsdp": 4, "tensor": 2}, 8) == (1, 4, 2, 1)


@pytest.mark.parametrize("sizes", [{"data": 3}, {"data": -1, "fsdp": -1}, {"bogus": 1},
                                   {"data": -1, "tensor": 3}, {"data": 0}])
def test_resolve_axis_sizes_rejects_bad_meshes(sizes):
    with pytest.raises(UserError):
        mesh_lib.resolve_axis_sizes(sizes, 8)


def test_rules_overrides_and_unknown_names():
    rules = dict(rules_lib.get_rules([("mlp", None), ("embed", ["fsdp", "tensor"])]))
    assert rules["mlp"] is None and rules["embed"] == ("fsdp", "tensor")
    with pytest.raises(UserError):
        rules_lib.get_rules([("not_an_axis", "data")])


def test_registry_lists_known_names_on_miss():
    reg = Registry("widget")
    reg.register("a")(1)
    assert reg.get("a") == 1
    with pytest.raises(UserError, match="known: a"):
        reg.get("b")
    with pytest.raises(ValueError):
        reg.register("a")(2)


def test_checkpoint_round_trip_with_iterator(tmp_path):
    ds = grain.MapDataset.range(64).shuffle(seed=3).batch(4).to_iter_dataset()
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(2)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(2, state, it)
    ckpt.wait()
    expected = [next(it) for _ in range(3)]

    fresh = iter(ds)
    restored = Checkpointer(str(tmp_path / "ckpt")).restore(abstract_with_shardings(state), fresh)
    got = [next(fresh) for _ in range(3)]
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 2
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_restore_without_checkpoint_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_metrics_logger_writes_jsonl_and_line(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(str(tmp_path), total_steps=10, name="t", stream=out)
    logger.count(100)
    record = logger.log(5, {"loss": jnp.float32(1.5)})
    assert record["step"] == 5 and record["loss"] == 1.5 and record["tokens_per_s"] > 0
    assert read_metrics(str(tmp_path)) == [json.loads(json.dumps(record))]
    line = out.getvalue()
    assert "step  5/10" in line and "loss 1.5" in line and "ETA" in line
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"
