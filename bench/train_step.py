"""Throughput of the unified model's jitted train step against this machine's matmul peak.

    python bench/train_step.py --config=configs/bench_reference.py [--torch]
    python bench/train_step.py --config=configs/synthface_tiny.py --steps=3

Prints tokens/s, achieved FLOP/s and that as a fraction of the dense float32 matmul peak
(an ``n x n @ n x n`` product, ``--peak_size``) measured in the same run. The step (and the
peak, and with ``--torch`` transformers' PhiForCausalLM + torch AdamW at the same shape) are
timed round-robin, ``--rounds`` times, so load from other processes hits all alike; the medians
are reported, also in process CPU time (FLOP per CPU-second: robust to sharing the machine).

FLOPs are the model's matmul FLOPs, counted analytically (3x forward): per token and layer
``8 D^2`` (q, k, v, out projections) ``+ 4 D F`` (FFN) ``+ 4 L D`` (scores and context, the full
L x L product as computed), plus ``2 D V`` per token for the lm head and ``2 D K`` per image
token for the image-code logits. (XLA's CPU cost analysis counts a scanned layer once, so it
is not used.)

A synthetic batch (random ids; one third each T2I, MMU, LM rows; random feature vectors for a
seq-MoE's ``config.data.extra_fields``) with the shapes of
``config.bench`` (batch_size, text_width, answer_width, text_vocab_size) or else of
``config.data`` is used, so no dataset or tokenizer is needed.
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unif2ace_jax.checkpoint import state as state_lib  # noqa: E402
from unif2ace_jax.models.moe.seq_moe import dummy_features  # noqa: E402
from unif2ace_jax.models.unified import build_model, default_features  # noqa: E402
from unif2ace_jax.optim import make_optimizer  # noqa: E402
from unif2ace_jax.parallel import rules as rules_lib  # noqa: E402
from unif2ace_jax.parallel.mesh import make_mesh  # noqa: E402
from unif2ace_jax.train.train import make_train_step, to_global  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_reference.py",
                                          "Model config to benchmark.", lock_config=False)
flags.DEFINE_integer("steps", 5, "Timed train steps per round.")
flags.DEFINE_integer("rounds", 3, "Round-robin rounds (median reported).")
flags.DEFINE_integer("peak_size", 2048, "n of the n x n float32 matmul that measures the peak.")
flags.DEFINE_bool("torch", False, "Also time transformers' PhiForCausalLM at the same shape.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of text lines.")
FLAGS = flags.FLAGS


def step_flops(d: int, f: int, layers: int, length: int, batch: int, vocab: int,
               image_tokens: int = 0, codes: int = 0) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward)."""
    per_token = layers * (8 * d * d + 4 * d * f + 4 * length * d) + 2 * d * vocab
    forward = batch * length * per_token + batch * image_tokens * 2 * d * codes
    return 3.0 * forward


def _timed(fn, reps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `reps` calls of `fn` (which blocks)."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _shapes(config) -> dict:
    bench = config.get("bench", None)
    if bench is not None:
        return dict(batch=int(bench.batch_size), text_width=int(bench.text_width),
                    answer_width=int(bench.answer_width), text_vocab=int(bench.text_vocab_size))
    data = config.data
    return dict(batch=int(data.batch_size), text_width=int(data.max_text_len),
                answer_width=int(data.max_answer_len),
                text_vocab=int(data.tokenizer.get("vocab_size", 0) or 512))


def build_unified_step(config):
    """(run() -> None blocking, tokens per step, analytic FLOPs per step)."""
    s = _shapes(config)
    m = config.model
    k, grid = int(m.num_image_codes), int(m.image_grid)
    model = build_model(m, text_vocab_size=s["text_vocab"], num_image_codes=k, image_grid=grid)
    mesh = make_mesh(config.mesh)
    rules = rules_lib.get_rules(tuple(config.get("sharding", {}).get("rules", ())))
    tx, schedule = make_optimizer(config.optim, int(config.get("total_steps", 1000)))
    rng = np.random.default_rng(0)
    b, lt, la = s["batch"], s["text_width"], s["answer_width"]
    batch = {
        "task": (np.arange(b) % 3).astype(np.int32),
        "text": rng.integers(0, s["text_vocab"], (b, lt)).astype(np.int32),
        "text_len": np.full((b,), lt, np.int32),
        "answer": rng.integers(0, s["text_vocab"], (b, la)).astype(np.int32),
        "answer_len": np.full((b,), la, np.int32),
        "image_codes": rng.integers(0, k, (b, grid * grid)).astype(np.int32),
        "valid": np.ones((b,), bool),
    }
    # The records' feature fields a seq-MoE reads (clip / face), random like the rest.
    extra_fields = tuple(config.data.get("extra_fields", ()) or ())
    init_features = None
    if extra_fields:
        shapes = dummy_features(m.seq_moe, b)
        for name in extra_fields:
            batch[name] = rng.standard_normal(shapes[name].shape).astype(np.float32)
        init_features = default_features(batch["task"][:1], np.zeros((1,), np.float32),
                                         {n: batch[n][:1] for n in extra_fields})
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, jax.random.key(0),
                                                    init_features)
    bs = {name: rules_lib.batch_sharding(mesh, rules, v.ndim) for name, v in batch.items()}
    step = make_train_step(model, tx, schedule, config.loss, shardings, bs, mesh, rules,
                           seed=0, extra_fields=extra_fields)
    batch = to_global(batch, bs)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    length = lt + la + grid * grid + 5
    ffn = m.ffn
    f = int(ffn.get("hidden", 0)) or int(ffn.get("num_shared", 1) * ffn.get("shared_hidden", 0)
                                        + ffn.get("top_k", 0) * ffn.get("routed_hidden", 0))
    flops = step_flops(int(m.d_model), f, int(m.num_layers), length, b, model.vocab.size,
                       grid * grid, k)
    return run, b * length, flops


def build_torch_step(config):
    """transformers' PhiForCausalLM + torch.optim.AdamW at the reference shape (LM only)."""
    import torch  # lazy: optional dependency (--torch only)
    from transformers import PhiConfig, PhiForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    s = _shapes(config)
    m = config.model
    length = s["text_width"] + s["answer_width"] + int(m.image_grid) ** 2 + 5
    vocab = s["text_vocab"] + 7 + int(m.num_image_codes) + 1
    cfg = PhiConfig(vocab_size=vocab, hidden_size=int(m.d_model),
                    intermediate_size=int(m.ffn.hidden), num_hidden_layers=int(m.num_layers),
                    num_attention_heads=int(m.num_heads), partial_rotary_factor=0.5,
                    max_position_embeddings=max(2048, length), resid_pdrop=0.0,
                    embd_pdrop=0.0, attention_dropout=0.0)
    model = PhiForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ids = torch.randint(0, vocab, (s["batch"], length))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    flops = step_flops(int(m.d_model), int(m.ffn.hidden), int(m.num_layers), length,
                       s["batch"], vocab)
    return run, s["batch"] * length, flops


def main(argv):
    del argv
    config = _CONFIG.value
    n = FLAGS.peak_size
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))
    peak_reps = max(1, int(4e10 // (2 * n ** 3)))  # ~40 GFLOP per timing

    def peak():
        jax.block_until_ready(matmul(a, b))

    t0 = time.perf_counter()
    unified, tokens, flops = build_unified_step(config)
    unified()  # compile + first step
    compile_s = time.perf_counter() - t0
    contenders = {"unified": (unified, tokens, flops)}
    if FLAGS.torch:
        run, t_tokens, t_flops = build_torch_step(config)
        run()
        contenders["torch_phi"] = (run, t_tokens, t_flops)

    rates = {name: {"wall": [], "cpu": []} for name in ["peak", *contenders]}
    for _ in range(FLAGS.rounds):
        w, c = _timed(peak, peak_reps)
        rates["peak"]["wall"].append(2 * n ** 3 * peak_reps / w)
        rates["peak"]["cpu"].append(2 * n ** 3 * peak_reps / max(c, 1e-9))
        for name, (run, _, fl) in contenders.items():
            w, c = _timed(run, FLAGS.steps)
            rates[name]["wall"].append(fl * FLAGS.steps / w)
            rates[name]["cpu"].append(fl * FLAGS.steps / max(c, 1e-9))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rates.items()}
    peak_wall, peak_cpu = med["peak"]["wall"], med["peak"]["cpu"]
    result = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              "peak_flops_per_s": peak_wall, "peak_matmul": f"{n}x{n} f32",
              "compile_and_first_step_s": compile_s}
    for name, (_, tok, fl) in contenders.items():
        result[name] = {
            "tokens_per_step": tok, "flops_per_step": fl,
            "step_s": fl / med[name]["wall"],
            "tokens_per_s": tok * med[name]["wall"] / fl,
            "flops_per_s": med[name]["wall"],
            "fraction_of_peak": med[name]["wall"] / peak_wall,
            "fraction_of_peak_cpu_time": med[name]["cpu"] / peak_cpu,
        }
    if FLAGS.json:
        print(json.dumps(result))
        return
    print(f"peak: {peak_wall / 1e9:.1f} GFLOP/s ({n}x{n} f32 matmul on {result['device']}, "
          f"{result['num_devices']} device(s))")
    for name in contenders:
        r = result[name]
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s | {r['flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"| {100 * r['fraction_of_peak']:.1f}% of peak (CPU-time basis "
              f"{100 * r['fraction_of_peak_cpu_time']:.1f}%) | {r['step_s'] * 1e3:.0f} ms/step "
              f"| {r['tokens_per_step']} tokens, {r['flops_per_step'] / 1e9:.2f} GFLOP per step")


if __name__ == "__main__":
    app.run(main)
