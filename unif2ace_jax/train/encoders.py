"""Trains the SynthFace expert encoders of the sequence-level MoE (docs/DESIGN.md §5).

    python -m unif2ace_jax.train.encoders --kind=face --workdir=DIR [--config=configs/encoders_synthface.py]
    python -m unif2ace_jax.train.encoders --kind=clip --workdir=DIR [--config=...]

``face`` (`synthface_face`): additive-margin attribute classifiers on a unit-norm embedding plus
a two-view instance InfoNCE term (see `models/encoders/synthface_face.py` for what "identity"
means on SynthFace). ``clip`` (`synthface_clip`): image and text towers, symmetric InfoNCE on
(face, caption) pairs with a learned temperature; captions are tokenised with the data stage's
SentencePiece model (``config.data.tokenizer.model_path``).

The training split is read into memory once. Data parallel over ``config.mesh``. Writes
``DIR/metrics.jsonl`` and a progress line, Orbax checkpoints under ``DIR/checkpoints`` (train
state + data-iterator position: a restarted run continues exactly), and at the end the encoder
(``DIR/encoder_params.msgpack`` + ``DIR/encoder_config.json``, loaded by the registry names
``synthface_face`` / ``synthface_clip`` with ``encoder_config.workdir=DIR``) and
``DIR/eval.json``: face: test attribute accuracy (mean over attributes, and micro); clip:
test image->text and text->image retrieval top-1 / top-5 among all scored test pairs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unif2ace_jax.data import encoder_data
from unif2ace_jax.data import images as images_lib
from unif2ace_jax.data.text_tokenizer import make_text_tokenizer
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate.judge import AccuracyTally
from unif2ace_jax.models.encoders import synthface_saved
from unif2ace_jax.models.encoders.contrastive import info_nce_loss, margin_attribute_loss
from unif2ace_jax.models.encoders.synthface_clip import make_clip_model
from unif2ace_jax.models.encoders.synthface_face import make_face_model
from unif2ace_jax.models.judge import value_mask
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.train import loop
from unif2ace_jax.train.judge import random_shift
from unif2ace_jax.train.progress import format_duration
from unif2ace_jax.utils.defaults import fill_missing

KINDS = ("face", "clip")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "encoders_synthface.py")
EVAL_FILE = "eval.json"


def default_config() -> dict:
    """The trainer's defaults for the fields a config may leave out (`fill_missing`)."""
    section = {"train": {"keep_checkpoints": 3}}
    return {**loop.LAYOUT_DEFAULTS, "data": {"eval_examples": 0, "tokenizer": {"model_path": ""}},
            "face": {**section, "loss": {"shift": 0}}, "clip": section}


# --------------------------------------------------------------------------- losses


def face_loss_fn(model, loss_cfg: Any, num_values: tuple[int, ...], seed: int) -> loop.LossFn:
    """``(params, batch, step) -> (loss, metrics)`` of the face encoder.

    batch: ``image uint8 [B, H, W, 3]``, ``labels int32 [B, A]``. With ``instance_weight > 0``
    two views (independent random shifts by up to ``shift`` px) of every face go through the
    model: the margin loss is averaged over both, plus ``instance_weight`` x InfoNCE between the
    views' embeddings at temperature ``instance_temperature``.
    """
    valid = jnp.asarray(value_mask(num_values))
    weight = float(loss_cfg.instance_weight)
    shift = int(loss_cfg.shift)
    log_scale = float(np.log(1.0 / float(loss_cfg.instance_temperature)))

    def loss_fn(params, batch, step):
        images, labels = batch["image"], batch["labels"]
        key = jax.random.fold_in(jax.random.key(seed), step)
        views = 2 if weight > 0 else 1
        if views == 2:
            k1, k2 = jax.random.split(key)
            images = jnp.concatenate([random_shift(images, k1, shift),
                                      random_shift(images, k2, shift)])
            labels = jnp.concatenate([labels, labels])
        elif shift:
            images = random_shift(images, key, shift)
        pooled, cos = model.apply({"params": params}, images)
        loss, aux = margin_attribute_loss(cos, labels, valid, scale=float(loss_cfg.scale),
                                          margin=float(loss_cfg.margin))
        metrics = {"attr_loss": loss, "acc": aux["accuracy"]}
        if views == 2:
            b = pooled.shape[0] // 2
            inst, inst_aux = info_nce_loss(pooled[:b], pooled[b:], log_scale)
            loss = loss + weight * inst
            metrics.update(inst_loss=inst, inst_top1=inst_aux["a_to_b_top1"])
        return loss, metrics

    return loss_fn


def clip_loss_fn(model) -> loop.LossFn:
    """``(params, batch, step) -> (loss, metrics)``: symmetric InfoNCE of (image, caption).

    batch: ``image uint8 [B, H, W, 3]``, ``text int32 [B, L]``, ``text_len int32 [B]``.
    """

    def loss_fn(params, batch, step):
        del step
        img, txt, log_scale = model.apply({"params": params}, batch["image"], batch["text"],
                                          batch["text_len"])
        loss, aux = info_nce_loss(img, txt, log_scale)
        return loss, {"i2t_top1": aux["a_to_b_top1"], "scale": aux["scale"]}

    return loss_fn


# --------------------------------------------------------------------------- evaluation


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate_face(model, params, arrays: dict[str, np.ndarray], batch_size: int = 250) -> dict:
    """Attribute accuracy of the cosine heads (argmax per attribute) on `arrays`."""
    apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x)[1], axis=-1))
    tally = AccuracyTally(images_lib.attribute_names())
    for sl in _chunks(len(arrays["image"]), batch_size):
        tally.add(np.asarray(apply(params, arrays["image"][sl])), arrays["labels"][sl])
    result = tally.result()
    return {"attribute_accuracy": result["mean"], "attribute_accuracy_micro": result["micro"],
            "num_images": result["num_images"],
            "per_attribute": {n: result[n] for n in images_lib.attribute_names() if n in result}}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray) -> dict:
    """Image->text and text->image retrieval among N pairs (row i of each is a pair).

    ``image_emb, text_emb: [N, D]`` unit norm. Ranks by cosine; ties count as misses.
    """
    sims = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    own = np.diag(sims)
    rank_i2t = (sims > own[:, None]).sum(1)  # better captions than the image's own
    rank_t2i = (sims > own[None, :]).sum(0)
    return {"i2t_top1": float(np.mean(rank_i2t < 1)), "i2t_top5": float(np.mean(rank_i2t < 5)),
            "t2i_top1": float(np.mean(rank_t2i < 1)), "t2i_top5": float(np.mean(rank_t2i < 5)),
            "num_pairs": int(len(own)), "chance_top1": 1.0 / max(len(own), 1)}


def evaluate_clip(model, params, arrays: dict[str, np.ndarray], batch_size: int = 250) -> dict:
    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                method=model.encode_image)["pooled"])
    text_fn = jax.jit(lambda p, t, n: model.apply({"params": p}, t, n,
                                                  method=model.encode_text)["pooled"])
    n = len(arrays["image"])
    img = np.concatenate([np.asarray(image_fn(params, arrays["image"][sl]))
                          for sl in _chunks(n, batch_size)])
    txt = np.concatenate([np.asarray(text_fn(params, arrays["text"][sl], arrays["text_len"][sl]))
                          for sl in _chunks(n, batch_size)])
    return retrieval_metrics(img, txt)


# --------------------------------------------------------------------------- training


def _tokenizer(config: ml_collections.ConfigDict):
    tok = config.data.tokenizer
    if not tok.model_path:
        raise UserError("config.data.tokenizer.model_path must name the SentencePiece model "
                        "(python -m unif2ace_jax.data train_tokenizer)")
    return make_text_tokenizer(tok.name, tok.model_path)


def train(config: ml_collections.ConfigDict, workdir: str, kind: str, *,
          stop_at: int | None = None) -> dict | None:
    """Trains (or resumes) the `kind` encoder in `workdir`; returns the eval metrics
    (None when stopped early by `stop_at`, as a preemption would; running again resumes)."""
    if kind not in KINDS:
        raise UserError(f"unknown encoder kind {kind!r}; known: {', '.join(KINDS)}")
    if not workdir:
        raise UserError("--workdir is required")
    config = fill_missing(config, default_config())
    section = config[kind]
    steps = int(section.train.steps)
    layout = loop.setup_mesh(config, int(section.train.batch_size), steps)
    name = f"{kind}_encoder"
    os.makedirs(workdir, exist_ok=True)

    t_data = time.perf_counter()
    tokenizer = _tokenizer(config) if kind == "clip" else None
    print(f"[{name}] reading the {config.data.train_split} split into memory "
          f"({config.data.source})", flush=True)
    arrays = encoder_data.load_split(config.data, config.data.train_split, tokenizer=tokenizer)
    if kind == "face":
        arrays = {k: arrays[k] for k in ("image", "labels")}
    else:
        arrays = {k: arrays[k] for k in ("image", "text", "text_len")}
    iterator = encoder_data.batches(arrays, layout.local_batch, seed=int(config.seed))
    num_values = images_lib.num_values()
    size = int(config.data.image_size)
    dummy_images = jnp.zeros((1, size, size, 3), jnp.uint8)
    if kind == "face":
        model = make_face_model(section.model, num_values)
        init: Callable = lambda key: model.init(key, dummy_images)["params"]  # noqa: E731
        loss_fn = face_loss_fn(model, section.loss, num_values, int(config.seed))
        meta = {"num_values": list(num_values)}
    else:
        model = make_clip_model(section.model, tokenizer.vocab_size)
        length = int(config.data.max_text_len)
        init = lambda key: model.init(  # noqa: E731
            key, dummy_images, jnp.zeros((1, length), jnp.int32), jnp.ones((1,), jnp.int32)
        )["params"]
        loss_fn = clip_loss_fn(model)
        meta = {"vocab_size": int(tokenizer.vocab_size), "max_text_len": length,
                "text_tokenizer": os.path.abspath(config.data.tokenizer.model_path)}
    tx, schedule = make_optimizer(section.optim, steps)
    run = loop.train_model(name, workdir, init_fn=init, loss_fn=loss_fn, tx=tx,
                           schedule=schedule, layout=layout, seed=config.seed,
                           iterator=iterator,
                           batch_ndims={k: v.ndim for k, v in arrays.items()},
                           train_config=section.train, t_data=t_data, stop_at=stop_at)
    if not run.finished:
        return None

    params = jax.device_get(run.state["params"])
    eval_data = encoder_data.load_split(config.data, config.data.eval_split, tokenizer=tokenizer,
                                        num_examples=int(config.data.eval_examples))
    evaluate = evaluate_face if kind == "face" else evaluate_clip
    result = evaluate(model, params, eval_data)
    result.update(split=str(config.data.eval_split), train_seconds=run.train_seconds,
                  steps=steps)
    synthface_saved.save_trained(workdir, kind, section.model.to_dict(), params, step=steps,
                                 eval=result, **meta)
    with open(os.path.join(workdir, EVAL_FILE), "w") as f:
        json.dump(result, f, indent=1)
    run.logger.log(steps, {f"eval_{k}": v for k, v in result.items()
                           if isinstance(v, (int, float))}, print_line=False)
    figure = (f"attribute accuracy {result['attribute_accuracy']:.4f}" if kind == "face" else
              f"image->text top-1 {result['i2t_top1']:.4f} (top-5 {result['i2t_top5']:.4f})")
    print(f"[{name}] {config.data.eval_split}: {figure} on {len(eval_data['image'])} faces; "
          f"trained {steps - run.first_step} steps in {format_duration(run.train_seconds)}",
          flush=True)
    return result


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from unif2ace_jax import cli

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/encoders_synthface.py")
    f = flags.FLAGS
    if not f.kind:
        raise UserError(f"--kind is required ({' or '.join(KINDS)})")
    if not f.workdir:
        raise UserError("--workdir is required")
    result = train(config, f.workdir, f.kind)
    if result is not None:
        print(json.dumps({k: v for k, v in result.items() if k != "per_attribute"}))


def _define_flags():
    from absl import flags

    from unif2ace_jax import cli

    flags.DEFINE_string("kind", None, f"Which encoder to train: {', '.join(KINDS)}.")
    return cli.define_trainer_flags("Directory for checkpoints, metrics and the encoder.",
                                    "Encoders config file.", DEFAULT_CONFIG)


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _CONFIG = _define_flags()
    run_cli(main)
