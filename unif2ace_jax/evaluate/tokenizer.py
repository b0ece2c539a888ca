"""Evaluates a trained image tokenizer: PSNR, codebook usage, and how much attribute detail
survives tokenisation (the SynthFace judge on reconstructions).

    python -m unif2ace_jax.evaluate.tokenizer --workdir=DIR --split=test \\
        [--num=1000] [--judge_workdir=JUDGE_DIR]

Prints one JSON object:

* ``psnr``: mean over images of the per-image PSNR (dB) of the uint8 reconstruction against the
  uint8 input (peak 255);
* ``code_usage``: fraction of the ``2^k`` codes used at least once over all tokens of the split;
  ``code_perplexity``: ``exp`` of the entropy of the empirical code distribution;
* with ``--judge_workdir``: ``judge_mean`` (mean over attributes of the judge's accuracy on the
  reconstructions, the attributes being the faces' true ones), ``judge_micro``, per-attribute
  ``judge_<name>``, and ``judge_original_mean`` (the same judge on the original images, the
  ceiling).

The faces are the tokenizer's training data config (source, image size, SynthFace seed) on
`--split`; with ``--data_dir`` (and ``--dataset``) they come from a prepared TFDS dataset instead.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from unif2ace_jax.data import images as images_lib
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate.judge import AccuracyTally, load_judge
from unif2ace_jax.losses import tokenizer as tok_losses
from unif2ace_jax.models.tokenizer.magvit2 import ImageTokenizer, images_to_model, model_to_images
from unif2ace_jax.models.tokenizer.pretrained import load_tokenizer


def make_reconstruct_fn(model: ImageTokenizer):
    """jit(params, uint8 images [B,H,W,3]) -> (codes int32 [B,h,w], uint8 reconstructions)."""

    def fn(params, images_u8):
        out = model.apply({"params": params}, images_to_model(images_u8))
        return out["indices"], model_to_images(out["recon"], model.pixel_rounding)

    return jax.jit(fn)


def evaluate_params(model: ImageTokenizer, params: Any, data_config: ml_collections.ConfigDict,
                    split: str, *, batch_size: int = 100, judge: Any = None) -> dict:
    """Metrics over every face of `split` given by `data_config` (see the module docstring).

    `judge`: an `evaluate.judge.Judge` or None.
    """
    batches = images_lib.image_batches(data_config, split, batch_size, shuffle=False,
                                       repeat=False, drop_remainder=False, process_index=0,
                                       process_count=1)
    reconstruct = make_reconstruct_fn(model)
    counts = np.zeros(model.codebook_size, np.int64)
    psnr_sum, num = 0.0, 0
    tally = tally_orig = None
    if judge is not None:
        tally, tally_orig = AccuracyTally(judge.names), AccuracyTally(judge.names)
    for batch in batches:
        images = np.asarray(batch["image"])
        n = images.shape[0]
        if n < batch_size:  # keep one compiled shape
            images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:],
                                                      np.uint8)])
        codes, recon = jax.device_get(reconstruct(params, images))
        images, codes, recon = images[:n], codes[:n], recon[:n]
        psnr_sum += float(np.sum(tok_losses.psnr(images, recon, value_range=(0.0, 255.0))))
        num += n
        counts += np.bincount(codes.reshape(-1), minlength=model.codebook_size)
        if judge is not None:
            tally.add(judge.predict_labels(recon), batch["labels"])
            tally_orig.add(judge.predict_labels(images), batch["labels"])
    if num == 0:
        raise UserError(f"split {split!r} has no images")
    result = {"psnr": psnr_sum / num, **tok_losses.code_usage_stats(counts),
              "codebook_size": int(model.codebook_size), "num_images": num,
              "num_tokens": int(counts.sum())}
    if judge is not None:
        scores = tally.result()
        result["judge_mean"] = scores["mean"]
        result["judge_micro"] = scores["micro"]
        result["judge_original_mean"] = tally_orig.result()["mean"]
        result.update({f"judge_{name}": scores[name] for name in judge.names if name in scores})
    return result


def _data_config(config: ml_collections.ConfigDict, num: int, data_dir: str | None,
                 dataset: str | None) -> ml_collections.ConfigDict:
    data = images_lib.full_config(config.data)
    data.num_examples = int(num)
    data.cache = False
    if data_dir:
        data.source = "tfds"
        data.data_dir = data_dir
        data.name = dataset or data.name
    return data


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.workdir:
        raise UserError("--workdir is required (the tokenizer's training directory)")
    if f.num <= 0 or f.batch_size <= 0:
        raise UserError(f"--num and --batch_size must be positive, got {f.num} and {f.batch_size}")
    tok = load_tokenizer(f.workdir)
    judge = None
    if f.judge_workdir:
        judge = load_judge(f.judge_workdir)
    data = _data_config(tok.config, f.num, f.data_dir, f.dataset)
    result = evaluate_params(tok.model, tok.params, data, f.split,
                             batch_size=min(f.batch_size, f.num), judge=judge)
    result = {"split": f.split, "step": tok.step, **result}
    print(json.dumps(result, indent=1))


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Tokenizer training directory (exported tokenizer).")
    flags.DEFINE_string("split", "test", "Split to evaluate (train, test, test_heldout_combos).")
    flags.DEFINE_integer("num", 1000, "Number of faces.")
    flags.DEFINE_integer("batch_size", 100, "Faces per batch.")
    flags.DEFINE_string("judge_workdir", None, "Trained SynthFace judge (optional).")
    flags.DEFINE_string("data_dir", None, "Read faces from this TFDS data_dir instead.")
    flags.DEFINE_string("dataset", None, "TFDS dataset name with --data_dir (default: the "
                        "training config's data.name).")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _define_flags()
    run_cli(main)
