"""Ahead-of-time fit check: compiles the real train step for a TPU slice on this (CPU) host.

    python -m unif2ace_jax.aot --config=configs/unif2ace_1p8b.py --topology=v5p:4x4x2 \\
        [--preset=fsdp|fsdp_tensor[:N]|fsdp_expert[:N]] [--config.model.remat_policy=full] \\
        [--config.data.batch_size=512] [--out=result.json]

Needs ``libtpu`` (``pip install -e '.[tpu]'``); no TPU is used: `jax.experimental.topologies`
describes the slice and XLA compiles for it. Nothing is materialised: the parameters, optimizer
state and batch are `jax.ShapeDtypeStruct`s carrying their shardings, so a 1.8B model costs
only the compile. The step is `train.make_train_step` (the trainer's own jitted function: same
loss, optimizer, shardings and donation), with the global batch ``config.data.batch_size`` and
the training sequence length ``Lt + La + N + 5``.

Prints one JSON object:

* ``topology``, ``slice``, ``device_kind``, ``num_devices``, ``mesh``, ``preset``,
  ``remat_policy``, ``global_batch``, ``sequence_length``, ``params``, ``active_params``;
* per device (XLA ``memory_analysis``): ``argument_bytes``, ``output_bytes``, ``alias_bytes``
  (outputs written into donated inputs), ``temp_bytes``, ``generated_code_bytes``, and
  ``total_bytes = argument + output - alias + temp + generated_code``; ``hbm_bytes`` of the chip
  and ``fits = total_bytes <= hbm_bytes``;
* ``xla_flops_per_device`` (XLA ``cost_analysis`` of the partitioned step, recomputation by
  remat included), ``est_step_time_s = xla_flops_per_device / peak_bf16_flops`` (a roofline
  estimate: compute bound at peak, communication and memory traffic ignored);
* ``model_flops_per_step = 6 * active_params * tokens`` (tokens = batch x sequence; the
  attention-score matmuls are not in it), and ``mfu = model_flops_per_step / (num_devices *
  peak * est_step_time_s)`` = model FLOPs / XLA FLOPs: the utilisation the step would reach if
  it ran at the roofline time; real MFU is lower. ``min_step_time_s`` = model FLOPs /
  (devices x peak), the step at 100 % MFU. When XLA counts fewer FLOPs than the model
  needs (``mfu > 1``: its cost analysis leaves some ops out, or the scanned count was used) the
  output carries a ``warning``.

Exit status: 0 ok; 2 bad input (one ``error:`` line, e.g. an unknown topology); 3 ``libtpu``
is not installed (one ``error:`` line).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

# A compile-only run never needs an accelerator backend: keep JAX (and an installed libtpu)
# from probing for TPUs. Read by JAX at import, so before any import of jax.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# jax, and the project modules that import it, are imported inside the functions that use
# them: `main` sets libtpu's environment (topology_lib.libtpu_env) before the first of them.
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unif2ace_jax.data import pipeline  # noqa: E402
from unif2ace_jax.errors import UserError, config_value, run_cli  # noqa: E402
from unif2ace_jax.models.backbone import full_model_config  # noqa: E402
from unif2ace_jax.parallel import presets as presets_lib  # noqa: E402
from unif2ace_jax.parallel import topology as topology_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x2, v5e:16x16, v4:4x4x4, v6e:8x8 "
                    "or a Cloud name such as v5p-64.")
flags.DEFINE_string("preset", None, "Sharding preset (parallel/presets.py); default: "
                    "config.sharding.preset, else config.mesh / config.sharding.rules.")
flags.DEFINE_integer("text_vocab_size", 0, "Text vocabulary size (0: config.data.tokenizer."
                     "vocab_size if set, else config.assumed_text_vocab_size, else 50295, the "
                     "Phi-1.5 tokenizer of Show-o).")
flags.DEFINE_string("out", None, "Also write the JSON object to this file.")
flags.DEFINE_bool("unrolled_flops", True, "Count FLOPs on unrolled 1- and 2-layer steps (two "
                  "more compiles) when the config scans its layers; off: the scanned step's own "
                  "count, which holds the layer loop body once.")

PHI_TEXT_VOCAB = 50295
LIBTPU_EXIT = 3


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_value(_CONFIG)
    if config is None:
        raise UserError("--config is required (e.g. --config=configs/unif2ace_1p8b.py)")
    if not flags.FLAGS.topology:
        raise UserError("--topology is required (e.g. --topology=v5p:4x4x2)")
    topo = topology_lib.parse_topology(flags.FLAGS.topology)
    if importlib.util.find_spec("libtpu") is None:
        print("error: libtpu is not installed; the AOT fit check compiles for TPU and needs it "
              "(pip install -e '.[tpu]')", file=sys.stderr)
        sys.exit(LIBTPU_EXIT)
    for key, value in topology_lib.libtpu_env(topo).items():
        os.environ.setdefault(key, value)
    result = fit_check(config, topo, preset=flags.FLAGS.preset,
                       text_vocab_size=flags.FLAGS.text_vocab_size,
                       unrolled_flops=flags.FLAGS.unrolled_flops)
    text = json.dumps(result, indent=1)
    if flags.FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
        with open(flags.FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)


def fit_check(config, topo: topology_lib.Topology, *, preset: str | None = None,
              text_vocab_size: int = 0, unrolled_flops: bool = True) -> dict:
    """Compiles the train step of `config` for `topo`; returns the report (see module doc)."""
    config = presets_lib.apply_preset(config, preset)
    t0 = time.perf_counter()
    step = compile_step(config, topo, text_vocab_size=text_vocab_size)
    compile_s = time.perf_counter() - t0
    xla_flops, flops_method = _xla_flops(config, topo, step, text_vocab_size, unrolled_flops)

    mem = step["compiled"].memory_analysis()
    argument = int(mem.argument_size_in_bytes)
    output = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    total = argument + output - alias + temp + code
    chip = topo.chip
    num_devices = step["num_devices"]
    model_flops = 6.0 * step["active_params"] * step["tokens"]
    step_time = xla_flops / chip.peak_bf16_flops if xla_flops else None
    mfu = model_flops / (num_devices * xla_flops) if xla_flops else None
    return {
        "topology": topo.name,
        "slice": topo.slice_name,
        "device_kind": step["device_kind"],
        "num_devices": num_devices,
        "mesh": step["mesh"],
        "preset": presets_lib.sharding_config(config).preset or None,
        "remat_policy": full_model_config(config.model).remat_policy,
        "scan_layers": bool(full_model_config(config.model).scan_layers),
        "dtype": full_model_config(config.model).dtype,
        "global_batch": step["global_batch"],
        "sequence_length": step["sequence_length"],
        "tokens_per_step": step["tokens"],
        "text_vocab_size": step["text_vocab_size"],
        "params": step["params"],
        "active_params": step["active_params"],
        "argument_bytes": argument,
        "output_bytes": output,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "generated_code_bytes": code,
        "total_bytes": total,
        "hbm_bytes": chip.hbm_bytes,
        "fits": total <= chip.hbm_bytes,
        "xla_flops_per_device": xla_flops,
        "xla_flops_method": flops_method,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
        "est_step_time_s": step_time,
        "est_step_time_note": "roofline estimate: xla_flops_per_device / peak bf16 FLOP/s per "
                              "chip; communication and memory bandwidth ignored",
        "model_flops_per_step": model_flops,
        "min_step_time_s": model_flops / (num_devices * chip.peak_bf16_flops),
        "min_step_time_note": "model FLOPs / (num_devices * peak): the step time at 100 % MFU",
        "mfu": mfu,
        "mfu_note": "model FLOPs (6 * active_params * tokens) / (num_devices * "
                    "xla_flops_per_device): MFU if the step ran at the roofline time",
        "compile_seconds": round(compile_s, 1),
        **({"warning": "XLA counted fewer FLOPs than 6 * active_params * tokens (its cost "
                       "analysis left some ops out, or counted the scanned layer loop once): "
                       "est_step_time_s is too low; min_step_time_s is a bound"}
           if mfu and mfu > 1 else {}),
    }


def _xla_flops(config, topo: topology_lib.Topology, step: dict, text_vocab_size: int,
               unrolled_flops: bool) -> tuple[float, str]:
    """XLA's FLOPs per device of the step, and how they were counted."""
    xla_flops, flops_method = step["flops"], "compiled step"
    num_layers = int(config.model.num_layers)
    scan_layers = bool(full_model_config(config.model).scan_layers)
    if not unrolled_flops and scan_layers:
        flops_method = "scanned step (the layer loop body counted once: an undercount)"
    elif scan_layers and num_layers > 2:
        # XLA's cost analysis counts the body of the layer loop once, whatever the trip count:
        # count unrolled 1- and 2-layer steps and extrapolate (the layers are identical).
        per = []
        for n in (1, 2):
            small = config.copy_and_resolve_references()
            with small.unlocked():
                small.model.num_layers = n
                small.model.scan_layers = False
            per.append(compile_step(small, topo, text_vocab_size=text_vocab_size)["flops"])
        xla_flops = per[0] + (num_layers - 1) * (per[1] - per[0])
        flops_method = (f"unrolled 1- and 2-layer steps extrapolated to {num_layers} layers "
                        f"(the scanned step's cost analysis counts its loop body once)")
    return xla_flops, flops_method


def compile_step(config, topo: topology_lib.Topology, *, text_vocab_size: int = 0) -> dict:
    """The trainer's jitted step for `config` compiled for `topo` (abstract inputs only).

    Returns ``compiled`` (`jax.stages.Compiled`), ``flops`` (its XLA cost analysis),
    ``mesh``, ``num_devices``, ``device_kind``, ``global_batch``, ``sequence_length``,
    ``tokens``, ``text_vocab_size``, ``params`` and ``active_params``.
    """
    import jax
    from jax.experimental import topologies

    from unif2ace_jax.models.unified import build_model, train_sequence_length
    from unif2ace_jax.parallel import mesh as mesh_lib
    from unif2ace_jax.parallel import rules as rules_lib
    from unif2ace_jax.checkpoint import state as state_lib
    from unif2ace_jax.optim import make_optimizer
    from unif2ace_jax.train.train import image_code_geometry, make_train_step, sharding_context

    try:
        desc = topologies.get_topology_desc(topo.name, "tpu",
                                            **topology_lib.topology_kwargs(topo))
    except Exception as e:  # libtpu rejects a shape it cannot build (e.g. a torus too large)
        raise UserError(f"libtpu cannot describe topology {topo.name}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    devices = list(desc.devices)
    dcn = config.get("dcn_mesh", None)  # a top-level field only multi-slice configs have
    if dcn and any(int(v) != 1 for v in dict(dcn).values()):
        raise UserError("the AOT check compiles one slice; leave config.dcn_mesh empty")
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = rules_lib.get_rules(tuple(presets_lib.sharding_config(config).rules or ()))

    data = pipeline.full_config(config.data)
    # assumed_text_vocab_size: a top-level field only configs without a tokenizer at hand have.
    vocab = (text_vocab_size or int(data.tokenizer.vocab_size or 0)
             or int(config.get("assumed_text_vocab_size", 0) or 0) or PHI_TEXT_VOCAB)
    k, grid = image_code_geometry(config)
    model = build_model(config.model, text_vocab_size=vocab, num_image_codes=k, image_grid=grid)
    global_batch = int(config.data.batch_size)
    shards = rules_lib.batch_shard_count(mesh, rules)
    if global_batch % shards:
        raise UserError(f"data.batch_size {global_batch} is not divisible by the {shards} batch "
                        f"shards of mesh {dict(mesh.shape)}")
    lt, la = int(config.data.max_text_len), int(config.data.max_answer_len)
    extra_fields = tuple(data.extra_fields or ())
    batch_shapes = _batch_shapes(model, config, global_batch, lt, la, extra_fields)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype,
                                        sharding=rules_lib.batch_sharding(mesh, rules, len(shape)))
             for name, (shape, dtype) in batch_shapes.items()}
    init_features = _init_features(batch_shapes)

    tx, schedule = make_optimizer(config.optim, int(config.total_steps))
    abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules, init_features)
    state = state_lib.abstract_state(abstract, shardings)
    step = make_train_step(model, tx, schedule, config.loss, shardings,
                           {n: s.sharding for n, s in batch.items()}, mesh, rules,
                           seed=int(config.seed), extra_fields=extra_fields)
    with sharding_context(mesh, rules):
        compiled = step.jitted.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    seq_len = train_sequence_length(model, lt, la)
    return {"compiled": compiled, "flops": float((cost or {}).get("flops", 0.0)),
            "mesh": {name: int(size) for name, size in mesh.shape.items()},
            "num_devices": len(devices), "device_kind": devices[0].device_kind,
            "global_batch": global_batch, "sequence_length": seq_len,
            "tokens": global_batch * seq_len, "text_vocab_size": vocab,
            "params": state_lib.count_params(abstract["params"]),
            "active_params": active_param_count(model, config.model, init_features)}


def _batch_shapes(model, config, batch: int, lt: int, la: int,
                  extra_fields: tuple[str, ...]) -> dict:
    """``name -> (shape, dtype)`` of a global training batch (`losses.unified.model_inputs` keys)."""
    shapes = {"task": ((batch,), np.int32), "text": ((batch, lt), np.int32),
              "text_len": ((batch,), np.int32), "answer": ((batch, la), np.int32),
              "answer_len": ((batch,), np.int32), "text_targets": ((batch, lt), np.bool_),
              "image_codes": ((batch, model.num_image_tokens), np.int32),
              "valid": ((batch,), np.bool_)}
    dims = _feature_dims(config.model)
    for name in extra_fields:
        if name not in dims:
            raise UserError(f"data.extra_fields names {name!r}, but no seq-MoE expert of "
                            f"config.model.seq_moe reads it with a feature_dim; its shape is "
                            f"unknown without the dataset")
        shapes[name] = ((batch, dims[name]), np.float32)
        shapes[f"{name}_present"] = ((batch,), np.bool_)
    return shapes


def _feature_dims(model_config) -> dict[str, int]:
    seq_moe = model_config.get("seq_moe", None) or {}
    experts = seq_moe.get("experts", None) or {}
    return {e.get("feature_key", name): int(e.get("feature_dim", 0))
            for name, e in experts.items()
            if e.get("encoder", "precomputed") == "precomputed" and e.get("feature_dim", 0)}


def _init_features(batch_shapes: dict) -> dict:
    """Features of batch 1 for `model.init` (their shapes fix the seq-MoE's parameters)."""
    from unif2ace_jax.losses.unified import MODEL_KEYS
    from unif2ace_jax.models.unified import default_features

    skip = MODEL_KEYS
    extra = {n: np.zeros((1,) + tuple(shape[1:]), dtype)
             for n, (shape, dtype) in batch_shapes.items() if n not in skip}
    return default_features(np.zeros((1,), np.int32), np.zeros((1,), np.float32), extra)


def active_param_count(model, model_config, features) -> int:
    """Parameters one token's forward pass multiplies with (for ``6 N`` model FLOPs).

    Not counted: the input embedding table (a lookup) and the sequence-level MoE branch (run
    once per sequence, not per token). Token-MoE experts count at the share a token uses:
    routed ``top_k / num`` (``num`` = all routed experts of both groups), shared ``1 / num``
    (one shared expert per group).
    """
    import flax.linen as nn
    import jax

    boxed = jax.eval_shape(lambda key: model.init(key, features=features), jax.random.key(0))
    top_k = int((model_config.get("ffn", None) or {}).get("top_k", 1) or 1)
    total = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        keys = [str(getattr(p, "key", p)) for p in path]
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
        size = float(np.prod(value.shape))
        if "embed_tokens" in keys or "seq_moe" in keys:
            continue
        leaf_name = keys[-1]
        # Stacked layers put "layers" first; the expert count is the first other dimension.
        dims = [d for d, n in zip(value.shape, names or (None,) * len(value.shape))
                if n != "layers"]
        if leaf_name.startswith("routed_") and dims:
            size *= min(top_k, dims[0]) / dims[0]
        elif leaf_name.startswith("shared_") and dims:
            size /= dims[0]
        total += size
    return int(total)


if __name__ == "__main__":
    run_cli(main)
