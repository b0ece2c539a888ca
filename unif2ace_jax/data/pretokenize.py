"""Adds image codes from a trained tokenizer to a prepared TFDS dataset (as a new dataset).

    python -m unif2ace_jax.data.pretokenize --tokenizer_workdir=TOK_DIR \\
        --data_dir=DATA_DIR --dataset=synthface[/CONFIG] --out_data_dir=OUT_DIR \\
        [--name=synthface_codes] [--batch_size=64] [--splits=train,test]

Writes ``OUT_DIR/NAME[/CONFIG]/VERSION``: every record of the source unchanged plus
``image_codes``: int32 ``[h·w]``, the tokenizer's codes in row-major order (as Show-o's
``get_code``). The source dataset is not modified. Computation runs in cached chunks with a
progress bar (`unif2ace_jax.data.derive`): an interrupted run, started again with the same
arguments, skips the chunks it already finished. The chunk cache is keyed by a hash of the
tokenizer's weights, so a different tokenizer never reuses another's codes, and a finished
dataset made by another tokenizer is refused. The dataset's `metadata.json` records which
tokenizer made the codes (`image_tokenizer`: workdir, step, weights hash, bits, grid).

Records whose images are not at the tokenizer's resolution are resized to it first (bilinear).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from unif2ace_jax.data.derive_run import cli_splits, derive_recorded, open_source
from unif2ace_jax.data.images import resize_image
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer.pretrained import PARAMS_FILE, load_tokenizer

CODES_FIELD = "image_codes"


def _params_digest(workdir: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(workdir, PARAMS_FILE), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def pretokenize(tokenizer_workdir: str, data_dir: str, dataset: str, out_data_dir: str, *,
                name: str | None = None, batch_size: int = 64, splits: list[str] | None = None,
                chunk_batches: int = 16, progress: bool = True) -> str:
    """Writes the source dataset + ``image_codes`` under `out_data_dir`; returns its directory.

    `dataset` is ``name`` or ``name/config`` in `data_dir`. The new dataset is named `name`
    (default ``<source name>_codes``) and keeps the source's config and version.
    """
    if batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    if not out_data_dir:
        raise UserError("--out_data_dir is required")
    source, out_name = open_source(data_dir, dataset, out_data_dir, name, "_codes")
    tok = load_tokenizer(tokenizer_workdir)
    size = tok.image_size
    grid = tok.grid_size

    def compute(batch: dict) -> dict:
        images = batch["image"]
        if images.shape[1:3] != (size, size):
            images = np.stack([resize_image(im, size) for im in images])
        codes = tok.encode(images)
        return {CODES_FIELD: codes.reshape(codes.shape[0], -1).astype(np.int32)}

    extra = {CODES_FIELD: tfds.features.Tensor(shape=(grid * grid,), dtype=np.int32)}
    digest = _params_digest(tokenizer_workdir)
    entry = {
        "workdir": os.path.abspath(tokenizer_workdir), "step": tok.step, "params_sha256": digest,
        "bits": int(tok.model.bits), "grid": [tok.grid_size, tok.grid_size],
        "image_size": tok.image_size,
        "source_image_shape": list(source.info.features["image"].shape),
    }
    return derive_recorded(
        source, out_data_dir, out_name, extra, compute, batch_size, key="image_tokenizer",
        entry=entry, digest=digest, digest_field="params_sha256", cache_tag="tokenizer",
        other_maker=lambda m: f"codes from another tokenizer ({m.get('workdir')})",
        input_field="image", splits=splits, chunk_batches=chunk_batches, progress=progress)


def main(argv: list[str]) -> None:
    f, splits = cli_splits(argv, ("tokenizer_workdir", "data_dir", "dataset", "out_data_dir"))
    path = pretokenize(f.tokenizer_workdir, f.data_dir, f.dataset, f.out_data_dir, name=f.name,
                       batch_size=f.batch_size, splits=splits)
    print(f"wrote {path}")


def _define_flags() -> None:
    flags.DEFINE_string("tokenizer_workdir", None, "Trained tokenizer (its training workdir).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir of the source dataset.")
    flags.DEFINE_string("dataset", None, "Source dataset: name or name/config.")
    flags.DEFINE_string("out_data_dir", None, "TFDS data_dir for the new dataset.")
    flags.DEFINE_string("name", None, "Name of the new dataset (default: <source>_codes).")
    flags.DEFINE_integer("batch_size", 64, "Images per tokenizer call.")
    flags.DEFINE_string("splits", "", "Comma-separated splits (default: all).")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _define_flags()
    run_cli(main)
