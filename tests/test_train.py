"""The unified trainer: metrics, run files, exact resume, and clean CLI errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import unified_env
from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.train.progress import read_metrics
from unif2ace_jax.checkpoint.trained import RUN_FILE, load_trained
from unif2ace_jax.train.train import train


def _final_params(workdir):
    return jax.tree.map(np.asarray, jax.device_get(load_trained(workdir).params))


def _data_item(workdir, step):
    """The saved data-iterator position (grain writes it as a small JSON file per process)."""
    root = os.path.join(workdir, "checkpoints", str(step), "data")
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == "commit_success.txt":  # names the directory; not part of the state
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


@pytest.mark.slow
def test_restart_continues_exactly(tmp_path):
    config = unified_env.tiny_config(total_steps=4, ckpt_every=2, log_every=1)
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    train(config, straight)
    train(config, resumed, stop_after=2)  # "pre-empted" after step 2 (checkpoint at 2)
    assert Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 2
    train(config, resumed)  # continues 3, 4 from the checkpoint and the data position

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "mask_ce", "mmu_loss", "lm_loss", "lr", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
        assert ra["tokens_per_s"] > 0
    pa, pb = _final_params(straight), _final_params(resumed)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert _data_item(straight, 4) == _data_item(resumed, 4)
    assert _data_item(straight, 4)  # something was saved

    with open(os.path.join(straight, RUN_FILE)) as f:
        run = json.load(f)
    assert run["num_image_codes"] == unified_env.build_env()["num_codes"]
    assert os.path.isfile(run["text_tokenizer"]) and os.path.isdir(run["tokenizer_workdir"])
    assert run["config"]["model"]["d_model"] == config.model.d_model


@pytest.mark.slow
def test_init_from_another_run_at_a_new_start_only(tmp_path, capsys):
    source = unified_env.trained_run()
    config = unified_env.tiny_config(total_steps=2, ckpt_every=1, log_every=1)
    config.init_from = source
    workdir = str(tmp_path / "run")
    train(config, workdir, stop_after=1)
    out = capsys.readouterr().out
    assert f"[train] params from {source}: " in out and " 0 fresh; 0 source params unused" in out
    # One AdamW step from the source's params moves each by at most about lr (and decay).
    lr = read_metrics(workdir)[0]["lr"]
    for x, y in zip(jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(
            _final_params(source))):
        np.testing.assert_allclose(x, y, rtol=0, atol=1.5 * lr + 1e-6)
    config.init_from = str(tmp_path / "absent")  # a resumed run restores its own checkpoint
    train(config, workdir)
    assert "params from" not in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


def _cli(*args):
    return unified_env.run_module("unif2ace_jax.train", *args)


_assert_one_error_line = unified_env.assert_one_error_line


def test_cli_unknown_config_key(tmp_path):
    proc = _cli("--config=configs/synthface_tiny.py:tiny", "--config.no_such_key=1",
                f"--workdir={tmp_path}")
    _assert_one_error_line(proc, "no_such_key")


def test_cli_missing_workdir_and_data(tmp_path):
    _assert_one_error_line(_cli("--config=configs/synthface_tiny.py:tiny"), "--workdir")
    proc = _cli("--config=configs/synthface_tiny.py:tiny",
                f"--config.data.data_dir={tmp_path / 'nope'}", f"--workdir={tmp_path / 'w'}")
    _assert_one_error_line(proc)


def test_bench_runs():
    """bench/train_step.py prints tokens/s, FLOP/s and the fraction of the measured peak (on the
    full model: the seq-MoE's clip / face experts need feature fields in the synthetic batch)."""
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--config=configs/synthface_tiny.py:tiny,moe=both",
         "--steps=1", "--rounds=1", "--peak_size=256", "--json"],
        capture_output=True, text=True, timeout=600, cwd=unified_env.ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"device", "num_devices", "peak_flops_per_s", "peak_matmul",
                           "compile_and_first_step_s", "unified"}  # no torch_phi without --torch
    assert result["peak_matmul"] == "256x256 f32"
    assert result["num_devices"] >= 1 and result["compile_and_first_step_s"] > 0
    assert result["peak_flops_per_s"] > 0
    r = result["unified"]
    assert set(r) == {"tokens_per_step", "flops_per_step", "step_s", "tokens_per_s",
                      "flops_per_s", "fraction_of_peak", "fraction_of_peak_cpu_time"}
    assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["step_s"] > 0
    assert r["fraction_of_peak_cpu_time"] > 0
    # The rates are the per-step figures over the same measured step time.
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
    assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"])
    assert r["fraction_of_peak"] == pytest.approx(r["flops_per_s"] / result["peak_flops_per_s"])
    # At least the lm head's 3 x 2 D V FLOPs per token (D = 32, V >= 512 text ids in :tiny).
    assert r["flops_per_step"] >= 3 * 2 * 32 * 512 * r["tokens_per_step"]
    # 8 rows of L = 32 + 3 + 16 + 5 tokens (configs/synthface_tiny.py:tiny).
    assert r["tokens_per_step"] == 8 * (32 + 3 + 16 + 5)
