"""Expert-encoder embeddings for the seq-MoE: precomputed into a new dataset, or on the fly.

Prepare (the TPU-efficient path, docs/DESIGN.md §5/§9)::

    python -m unif2ace_jax.data.embeddings --data_dir=DATA_DIR --dataset=synthface[/CONFIG] \\
        --encoders=synthface_face,synthface_clip --encoder_workdirs=FACE_DIR,CLIP_DIR \\
        [--out_data_dir=DATA_DIR] [--name=synthface_emb] [--output=pooled] [--batch_size=64]

writes ``OUT_DIR/NAME[/CONFIG]/VERSION``: every source record unchanged plus one float32 field
per encoder, named by `feature_field` (``synthface_face`` -> ``face``, ``synthface_clip`` and
``clip_vision`` -> ``clip``: the seq-MoE experts' default ``feature_key``s): ``[D]`` with
``--output=pooled``, ``[T, D]`` with ``tokens``. The source is untouched; computation runs in
cached chunks with a progress bar (`unif2ace_jax.data.derive`), so an interrupted run started
again with the same arguments skips the finished chunks. The cache is keyed by a hash of the
encoders' weights; a finished dataset made by other weights is refused. The new dataset's
``metadata.json`` records the encoders (``embeddings``: field -> encoder, workdir, hash, output).
Train with it by listing the fields in ``data.extra_fields``.

On the fly (records without embeddings, e.g. ``ask`` on a new image)::

    encoders = load_encoders(["synthface_face"], [FACE_DIR])     # {"face": LoadedEncoder}
    features = compute_features(encoders, images)                # {"face": float32 [B, D]}

Both paths run the same jitted encoder (`LoadedEncoder.encode`), so a record's field equals
`compute_features` on the record's image.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import flags
from flax import serialization

from unif2ace_jax.data import records
from unif2ace_jax.data.derive_run import cli_splits, derive_recorded, open_source
from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.models.encoders import ENCODERS, load_encoder

FIELDS = {"synthface_face": "face", "synthface_clip": "clip", "clip_vision": "clip"}
OUTPUTS = ("pooled", "tokens")


def feature_field(encoder: str) -> str:
    """The record field (= seq-MoE ``feature_key``) an encoder's embedding is stored under."""
    return FIELDS.get(encoder, encoder)


def load_encoders(names: Sequence[str], workdirs: Sequence[str], *, output: str = "pooled"
                  ) -> dict:
    """``{field: LoadedEncoder}`` for encoder names and their weight directories (same order).

    A workdir is the trainer's workdir for ``synthface_*`` and the converter's output directory
    for ``clip_vision``. UserError for unknown names, missing directories, or two encoders
    writing the same field.
    """
    names = [n.strip() for n in names if n.strip()]
    workdirs = [w.strip() for w in workdirs if w.strip()]
    if not names:
        raise UserError("no encoders named (e.g. --encoders=synthface_face,synthface_clip)")
    if len(names) != len(workdirs):
        raise UserError(f"{len(names)} encoders but {len(workdirs)} encoder workdirs; give one "
                        f"workdir per encoder, in the same order")
    if output not in OUTPUTS:
        raise UserError(f"output must be one of {OUTPUTS}, got {output!r}")
    out = {}
    for name, workdir in zip(names, workdirs):
        ENCODERS.get(name)
        field = feature_field(name)
        if field in out:
            raise UserError(f"two encoders would write the field {field!r}")
        if not os.path.isdir(workdir):
            raise UserError(f"encoder workdir not found: {workdir} (for {name})")
        out[field] = load_encoder(name, {"workdir": workdir, "path": workdir, "output": output})
    return out


def compute_features(encoders: Mapping[str, object], images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs every encoder on a batch of faces.

    Args:
      encoders: ``{field: LoadedEncoder}`` (`load_encoders`).
      images: uint8 ``[B, H, W, 3]`` (any size; each encoder resizes to its own resolution).
    Returns:
      ``{field: float32 [B, D] or [B, T, D]}``, ready for the model's ``features`` dict.
    """
    images = np.asarray(images)
    check_shape("images", images, ("B", "H", "W", 3))
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {images.dtype}")
    return {field: np.asarray(enc.encode(images), np.float32) for field, enc in encoders.items()}


def _digest(encoders: Mapping[str, object]) -> str:
    h = hashlib.sha256()
    for field in sorted(encoders):
        enc = encoders[field]
        h.update(f"{field}:{enc.name}:{json.dumps(dict(enc.cfg or {}), sort_keys=True)}".encode())
        h.update(serialization.msgpack_serialize(jax.tree.map(np.asarray, enc.params)))
    return h.hexdigest()[:16]


def prepare_embeddings(data_dir: str, dataset: str, encoders: Sequence[str],
                       encoder_workdirs: Sequence[str], *, out_data_dir: str | None = None,
                       name: str | None = None, output: str = "pooled", batch_size: int = 64,
                       splits: list[str] | None = None, chunk_batches: int = 16,
                       progress: bool = True) -> str:
    """Writes the source dataset + one embedding field per encoder; returns its directory.

    `dataset` is ``name`` or ``name/config`` in `data_dir`; the new dataset (default name
    ``<source>_emb``, in `out_data_dir`, default `data_dir`) keeps the source's config and
    version.
    """
    import tensorflow_datasets as tfds  # lazy: seconds; ask/generate import this module

    if batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    for encoder in encoders:
        ENCODERS.get(encoder.strip())  # unknown names fail before any work
    out_data_dir = out_data_dir or data_dir
    source, out_name = open_source(data_dir, dataset, out_data_dir, name, "_emb")
    loaded = load_encoders(encoders, encoder_workdirs, output=output)
    shape = tuple(source.info.features[records.IMAGE].shape)
    dummy = jax.ShapeDtypeStruct((1,) + shape, np.uint8)
    extra = {}
    for field, enc in loaded.items():
        out_shape = jax.eval_shape(enc.encode, dummy).shape[1:]
        extra[field] = tfds.features.Tensor(shape=tuple(int(s) for s in out_shape),
                                            dtype=np.float32)

    def compute(batch: dict) -> dict:
        return compute_features(loaded, batch[records.IMAGE])

    digest = _digest(loaded)
    entry = {
        "digest": digest, "output": output,
        "fields": {field: {"encoder": enc.name, "workdir": os.path.abspath(enc.cfg["workdir"]),
                           "shape": list(extra[field].shape)}
                   for field, enc in loaded.items()}}
    return derive_recorded(
        source, out_data_dir, out_name, extra, compute, batch_size, key="embeddings",
        entry=entry, digest=digest, digest_field="digest", cache_tag="encoders",
        other_maker=lambda m: "embeddings from other encoders", input_field=records.IMAGE,
        splits=splits, chunk_batches=chunk_batches, progress=progress)


def main(argv: list[str]) -> None:
    f, splits = cli_splits(argv, ("data_dir", "dataset", "encoders", "encoder_workdirs"))
    path = prepare_embeddings(f.data_dir, f.dataset, f.encoders.split(","),
                              f.encoder_workdirs.split(","), out_data_dir=f.out_data_dir,
                              name=f.name, output=f.output, batch_size=f.batch_size,
                              splits=splits)
    print(f"wrote {path}")


def _define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "TFDS data_dir of the source dataset.")
    flags.DEFINE_string("dataset", None, "Source dataset: name or name/config.")
    flags.DEFINE_string("encoders", None, "Comma-separated encoder names "
                        "(synthface_face, synthface_clip, clip_vision).")
    flags.DEFINE_string("encoder_workdirs", None, "Comma-separated weight directories, one per "
                        "encoder, same order.")
    flags.DEFINE_string("out_data_dir", None, "TFDS data_dir for the new dataset (default: "
                        "--data_dir).")
    flags.DEFINE_string("name", None, "Name of the new dataset (default: <source>_emb).")
    flags.DEFINE_enum("output", "pooled", list(OUTPUTS), "pooled: [D] per record; tokens: [T, D].")
    flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
    flags.DEFINE_string("splits", "", "Comma-separated splits (default: all).")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _define_flags()
    run_cli(main)
