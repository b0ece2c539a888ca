"""In-memory face data for the expert encoders' trainers: images, attribute labels, caption ids.

`load_split(data_config, split, tokenizer=None)` reads a split once into numpy arrays::

    {"image": uint8 [N, S, S, 3], "labels": int32 [N, A],
     "text": int32 [N, Lt], "text_len": int32 [N]}        # text fields only with a tokenizer

from a prepared TFDS dataset (``data.source = "tfds"``: ``data_dir``, ``name``, ``config``) or
SynthFace rendered on the fly (``"synthface"``: ``synthface_seed``). ``labels`` follow
`unif2ace_jax.data.images.attribute_names()` (-1 = unknown); ``text`` is the caption's ids,
right-padded with 0 and truncated to ``data.max_text_len`` (S = ``data.image_size``).

Every field of ``config.data`` is in `default_config` (the trainer reads the splits,
``eval_examples`` and ``tokenizer`` there too); `load_split` reads `full_config` of what it is given.

`batches(arrays, batch_size, seed=...)` is a checkpointable grain iterator over them (host
shard ``[process_index::process_count]``, reshuffled every epoch, repeated, fixed batches).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np

from unif2ace_jax.data import images as images_lib
from unif2ace_jax.data import records
from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.defaults import with_defaults


def default_config() -> ml_collections.ConfigDict:
    """Every field of the expert encoders' ``config.data``, with its default.

    ``num_examples`` / ``eval_examples`` 0 = the whole split; ``config`` "" = the dataset's
    default builder config; ``tokenizer``: the caption tokenizer (`data.text_tokenizer`).
    """
    return ml_collections.ConfigDict(dict(
        source="tfds", data_dir="", name="synthface", config="", num_examples=0,
        image_size=64, synthface_seed=0, train_split="train", eval_split="test",
        eval_examples=0, max_text_len=128,
        tokenizer=dict(name="sentencepiece", model_path="")))


def full_config(data_config: Any) -> ml_collections.ConfigDict:
    """`default_config` updated with `data_config` (unknown fields refused)."""
    return with_defaults(default_config(), data_config, "data")


def _tfds_rows(data_config: Any, split: str, limit: int) -> tuple[list, Any]:
    if not data_config.data_dir:
        raise UserError("data.data_dir must be set for the tfds source")
    builder = records.load_builder(data_config.data_dir, data_config.name,
                                   data_config.config or None)
    if split not in builder.info.splits:
        raise UserError(f"dataset {builder.info.full_name} has no split {split!r}; "
                        f"known: {sorted(builder.info.splits)}")
    source = records.encoded_source(builder, split)
    n = len(source) if limit <= 0 else min(limit, len(source))
    return [source[i] for i in range(n)], builder.info.full_name


def pad_ids(ids: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads (with 0) / truncates id lists: ``(ids int32 [N, length], lengths int32 [N])``."""
    out = np.zeros((len(ids), length), np.int32)
    lengths = np.zeros(len(ids), np.int32)
    for i, row in enumerate(ids):
        row = list(row)[:length]
        out[i, :len(row)] = row
        lengths[i] = len(row)
    return out, lengths


def load_split(data_config: Any, split: str, *, tokenizer: Any = None,
               num_examples: int | None = None, num_threads: int = 2) -> dict[str, np.ndarray]:
    """The arrays of `split` (module docstring); `num_examples` (default ``data.num_examples``,
    0 = all) limits the records read."""
    data_config = full_config(data_config)
    size = int(data_config.image_size)
    limit = int(data_config.num_examples if num_examples is None else num_examples)
    source = str(data_config.source)
    if source == "tfds":
        rows, where = _tfds_rows(data_config, split, limit)

        def convert(item):
            i, row = item
            image = records.decode_image(bytes(row[records.IMAGE]), size=size,
                                         source=f"{where} {split} record {i}")
            return image, images_lib.record_labels(row), records.as_str(row[records.CAPTION])

        with ThreadPoolExecutor(max(num_threads, 1)) as pool:
            converted = list(pool.map(convert, enumerate(rows), chunksize=256))
    elif source == "synthface":
        if limit <= 0:
            raise UserError("data.num_examples must be positive for the synthface source")
        seed = int(data_config.synthface_seed)

        def render(i):
            ex = images_lib.synthface_example(seed, split, i, size)
            return (np.asarray(ex["image"], np.uint8), images_lib.attribute_labels(ex["attributes"]),
                    ex["caption"])

        converted = [render(i) for i in range(limit)]
    else:
        raise UserError(f"unknown data.source {source!r}; known: tfds, synthface")
    if not converted:
        raise UserError(f"split {split!r} has no records")
    out = {"image": np.stack([c[0] for c in converted]),
           "labels": np.stack([c[1] for c in converted]).astype(np.int32)}
    if tokenizer is not None:
        ids = tokenizer.encode_batch([c[2] for c in converted])
        out["text"], out["text_len"] = pad_ids(ids, int(data_config.max_text_len))
    return out


def batches(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
            shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
            process_index: int | None = None, process_count: int | None = None
            ) -> grain.DatasetIterator:
    """A checkpointable iterator of batches ``{name: array [batch_size, ...]}`` of `arrays`."""
    n = len(next(iter(arrays.values())))
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.range(n)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) < batch_size and drop_remainder:
        raise UserError(f"{len(ds)} examples on this host, fewer than one batch of {batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(lambda i: {k: v[i] for k, v in arrays.items()})
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
