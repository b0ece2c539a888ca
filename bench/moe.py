"""Token-MoE layer step time against a dense FFN with the same active parameters per token.

    python bench/moe.py [--tokens=2048 --d_model=512 ...]

One step = forward + backward of ``sum(y * r) + aux losses`` w.r.t. the layer's params and
its input, jitted. The dense baseline is the Phi MLP with hidden width
``num_shared * shared_hidden + top_k * routed_hidden`` (the MoE's active width per token).
Steps of all variants are timed round-robin after warm-up (so load from other processes
hits them alike), and the median of ``--repeats`` rounds is reported with the ratio to dense,
in wall time and in process CPU time. Target (issue 5): ratio <= 1.5 on CPU.

Variants: ``ragged_blocked`` (dropless, the CPU path), ``capacity_gather`` and
``capacity_einsum`` (capacity dispatch by index / by one-hot einsum), ``ragged_dot``
(dropless with `jax.lax.ragged_dot`, which on CPU computes every expert densely: shown for
reference, expect about X times the routed FLOPs).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from unif2ace_jax.errors import UserError, run_cli  # noqa: E402
from unif2ace_jax.models.ffn import DenseFFN  # noqa: E402
from unif2ace_jax.models.moe import TokenMoE  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 2048, "tokens per step (batch x sequence)")
flags.DEFINE_integer("seq_len", 256, "sequence length (tokens must be a multiple)")
flags.DEFINE_integer("d_model", 512, "model width")
flags.DEFINE_integer("num_routed", 8, "routed experts per group")
flags.DEFINE_integer("num_shared", 1, "shared experts per group")
flags.DEFINE_integer("top_k", 4, "router top-k")
flags.DEFINE_integer("routed_hidden", 256, "routed expert width")
flags.DEFINE_integer("shared_hidden", 1024, "shared expert width")
flags.DEFINE_float("capacity_factor", 1.0, "capacity mode: slots per expert factor")
flags.DEFINE_integer("block_size", 128, "ragged/blocked: rows per block")
flags.DEFINE_list("variants", ["ragged_blocked", "capacity_gather", "capacity_einsum",
                               "ragged_dot"], "MoE variants to time")
flags.DEFINE_integer("repeats", 10, "timed rounds (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed rounds after compilation")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")

VARIANTS = {
    "ragged_blocked": dict(dispatch="ragged", grouped_matmul="blocked"),
    "ragged_dot": dict(dispatch="ragged", grouped_matmul="ragged_dot"),
    "capacity_gather": dict(dispatch="capacity", capacity_method="gather"),
    "capacity_einsum": dict(dispatch="capacity", capacity_method="einsum"),
}


def make_step(module, x, group, valid):
    """A jitted fwd+bwd step and its params (random init)."""
    params = jax.jit(module.init)(jax.random.key(0), x, group=group, valid=valid)["params"]
    r = jax.random.normal(jax.random.key(1), x.shape, x.dtype)

    def loss(params, x):
        y, state = module.apply({"params": params}, x, group=group, valid=valid,
                                mutable=["aux_loss"])
        aux = sum(jax.tree.leaves(state.get("aux_loss", {})))
        return jnp.sum((y * r).astype(jnp.float32)) + aux

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.tokens % FLAGS.seq_len:
        raise UserError(f"--tokens={FLAGS.tokens} is not a multiple of --seq_len={FLAGS.seq_len}")
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    dtype = jnp.dtype(FLAGS.dtype)
    batch = FLAGS.tokens // FLAGS.seq_len
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, FLAGS.seq_len, FLAGS.d_model)), dtype)
    group = jnp.asarray(np.arange(batch)[:, None] % 2 * np.ones((1, FLAGS.seq_len)), jnp.int32)
    valid = jnp.ones((batch, FLAGS.seq_len), bool)
    active = FLAGS.num_shared * FLAGS.shared_hidden + FLAGS.top_k * FLAGS.routed_hidden

    steps = {"dense": make_step(DenseFFN(hidden=active, dtype=dtype), x, group, valid)}
    for name in FLAGS.variants:
        module = TokenMoE(num_routed=FLAGS.num_routed, num_shared=FLAGS.num_shared,
                          top_k=FLAGS.top_k, routed_hidden=FLAGS.routed_hidden,
                          shared_hidden=FLAGS.shared_hidden,
                          capacity_factor=FLAGS.capacity_factor, block_size=FLAGS.block_size,
                          dtype=dtype, **VARIANTS[name])
        steps[name] = make_step(module, x, group, valid)

    for fn in steps.values():  # compile + warm up
        for _ in range(1 + FLAGS.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(FLAGS.repeats):
        for name, fn in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    print(f"backend={jax.default_backend()} dtype={FLAGS.dtype} tokens={FLAGS.tokens} "
          f"d_model={FLAGS.d_model} experts=2x{FLAGS.num_routed} top_k={FLAGS.top_k} "
          f"routed_hidden={FLAGS.routed_hidden} shared={FLAGS.num_shared}x{FLAGS.shared_hidden} "
          f"dense_hidden={active} capacity_factor={FLAGS.capacity_factor} "
          f"block_size={FLAGS.block_size} repeats={FLAGS.repeats}")
    dense = statistics.median(times["dense"])
    dense_cpu = statistics.median(cpu["dense"])
    print(f"{'variant':<18}{'median ms':>10}{'min ms':>9}{'ratio':>8}"
          f"{'cpu ms':>9}{'cpu ratio':>10}")
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(f"{name:<18}{med * 1e3:>10.1f}{min(ts) * 1e3:>9.1f}{med / dense:>8.2f}"
              f"{med_cpu * 1e3:>9.1f}{med_cpu / dense_cpu:>10.2f}")
    print("ratio: median wall time / dense; cpu: process CPU time (all threads) per step, "
          "less sensitive to other load on the machine")


if __name__ == "__main__":
    run_cli(main)
