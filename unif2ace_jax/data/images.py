"""Image-only batches (image + attribute labels) for image models: the judge, the image tokenizer.

`image_batches(data_config, split, batch_size)` returns a grain `DatasetIterator` yielding::

    {"image": uint8 [B, H, W, 3], "labels": int32 [B, A]}

where `labels[:, a]` is the index of the face's value of attribute `attribute_names()[a]` in
`ATTRIBUTES[name]` (-1 when the source does not know it). The source is chosen by name
(`data_config.source`) through `IMAGE_SOURCES`:

* ``synthface``: rendered on the fly; example i of a split depends only on
  (`data_config.synthface_seed`, split, i). Fields: `num_examples`, `image_size`,
  `synthface_seed`, `heldout_mix` / `heldout_seed` (see `synthface_source`).
* ``tfds``: a prepared TFDS dataset read through `as_data_source` (no TensorFlow needed, no
  builder class needed). Fields: `data_dir`, `name` (e.g. "synthface" or "synthface/small_64"),
  `config` and `version`, `image_size` (resize when records differ), `num_examples` (use only
  the first n records; 0 = all).

Both: `cache` (read the host's shard into memory once). Every field, with its default, is in
`default_config`; `image_dataset` reads `full_config` of what it is given.

The pipeline is: source -> host shard `[process_index::process_count]` -> seeded shuffle
(reshuffled every epoch) -> repeat -> batch, all as a `grain.MapDataset`, so the iterator
position is checkpointable (`get_state`/`set_state`, or the project's `Checkpointer`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from unif2ace_jax.data import records, synthface
from unif2ace_jax.data.records import as_str, decode_image
from unif2ace_jax.data.synthface.attributes import ATTRIBUTES
from unif2ace_jax.errors import UserError
from unif2ace_jax.registry import Registry
from unif2ace_jax.utils.defaults import with_defaults

ImageSource = Callable[[Any, str], grain.MapDataset]
IMAGE_SOURCES: Registry[ImageSource] = Registry("image source")


def default_config() -> ml_collections.ConfigDict:
    """Every field of an image model's ``config.data`` (judge, image tokenizer), with its default.

    ``heldout_seed`` -1 = ``synthface_seed + 1_000_003``; ``config`` / ``version`` "" = the
    dataset's defaults; ``num_threads``: grain threads of the trainers' batches.
    """
    return ml_collections.ConfigDict(dict(
        source="synthface", num_examples=0, image_size=64, synthface_seed=0, cache=False,
        heldout_mix=0.0, heldout_seed=-1, name="synthface", config="", version="",
        data_dir="", num_threads=2))


def full_config(data_config: Any) -> ml_collections.ConfigDict:
    """`default_config` updated with `data_config` (unknown fields refused)."""
    return with_defaults(default_config(), data_config, "data")


def attribute_names() -> tuple[str, ...]:
    """The attribute names in label order (the order of SynthFace `ATTRIBUTES`)."""
    return tuple(ATTRIBUTES)


def num_attributes() -> int:
    return len(ATTRIBUTES)


def num_values() -> tuple[int, ...]:
    """Number of values of each attribute, in label order."""
    return tuple(len(v) for v in ATTRIBUTES.values())


def attribute_labels(attributes: Mapping[str, Any]) -> np.ndarray:
    """Labels int32 [A] for an attribute dict name -> value (str, bytes or value index).

    Attributes absent from `attributes`, or with an unknown value, get -1.
    """
    table = ATTRIBUTES
    labels = np.full(len(table), -1, np.int32)
    for a, (name, values) in enumerate(table.items()):
        if name not in attributes:
            continue
        value = attributes[name]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            labels[a] = int(value) if 0 <= int(value) < len(values) else -1
            continue
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
            labels[a] = int(value) if 0 <= int(value) < len(values) else -1
            continue
        value = as_str(value)
        labels[a] = values.index(value) if value in values else -1
    return labels


def labels_to_attributes(labels: np.ndarray) -> dict[str, str]:
    """Inverse of `attribute_labels` for one face (labels -1 are left out)."""
    table = ATTRIBUTES
    return {name: values[int(i)] for (name, values), i in zip(table.items(), labels) if i >= 0}


# --------------------------------------------------------------------------- sources


def synthface_example(seed: int, split: str, index: int, image_size: int) -> dict:
    """SynthFace example `index` of `split` (identical to the generator's `index`-th output)."""
    return synthface.example(seed, index, image_size=image_size, split=split)


@IMAGE_SOURCES.register("synthface")
def synthface_source(data_config: Any, split: str) -> grain.MapDataset:
    """SynthFace rendered on the fly: `num_examples` faces of `split` at `image_size` px.

    With `heldout_mix` = f > 0, the "train" split's last round(f * num_examples) faces come from
    `test_heldout_combos` drawn with `heldout_seed` instead (a different seed than the evaluation
    data, so no evaluation image is seen): a model meant to *measure* faces, like the judge,
    then knows every attribute combination.
    """
    if split not in synthface.SPLITS:
        raise UserError(f"unknown SynthFace split {split!r}; known: {list(synthface.SPLITS)}")
    num = int(data_config.num_examples)
    if num <= 0:
        raise UserError(f"data.num_examples must be positive, got {num}")
    seed = int(data_config.synthface_seed)
    size = int(data_config.image_size)
    mix = float(data_config.heldout_mix or 0.0) if split == "train" else 0.0
    if not 0.0 <= mix < 1.0:
        raise UserError(f"data.heldout_mix must be in [0, 1), got {mix}")
    num_plain = num - int(round(mix * num))
    heldout_seed = int(data_config.heldout_seed)
    heldout_seed = seed + 1_000_003 if heldout_seed == -1 else heldout_seed
    if mix and heldout_seed == seed:
        raise UserError("data.heldout_seed must differ from data.synthface_seed")

    def make(index: int) -> dict:
        index = int(index)
        if index < num_plain:
            ex = synthface_example(seed, split, index, size)
        else:
            ex = synthface_example(heldout_seed, "test_heldout_combos", index - num_plain, size)
        return {"image": np.asarray(ex["image"], np.uint8),
                "labels": attribute_labels(ex["attributes"])}

    return grain.MapDataset.range(num).map(make)


def _decode_image(image: Any) -> np.ndarray:
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image.astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 [H, W, 3] to [size, size, 3]."""
    if image.shape[0] == size and image.shape[1] == size:
        return image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def record_labels(record: Mapping[str, Any]) -> np.ndarray:
    """Labels int32 [A] from a TFDS record.

    Accepts `labels` (int [A]), or `attributes` as a dict name -> value (str/bytes/index) or as
    a JSON string of such a dict.
    """
    if "labels" in record:
        return np.asarray(record["labels"], np.int32).reshape(-1)
    attributes = record.get("attributes")
    if attributes is None:
        return np.full(num_attributes(), -1, np.int32)
    if isinstance(attributes, (bytes, str, np.ndarray)) and not isinstance(attributes, Mapping):
        attributes = json.loads(as_str(attributes))
    return attribute_labels(attributes)


@IMAGE_SOURCES.register("tfds")
def tfds_source(data_config: Any, split: str) -> grain.MapDataset:
    """A prepared TFDS dataset (array_record, records of `data/records.py`) read without TF."""
    name = str(data_config.name or "")
    if not name:
        raise UserError("data.name must name the TFDS dataset (e.g. 'synthface')")
    data_dir = data_config.data_dir
    if not data_dir:
        raise UserError("data.data_dir must be set for the tfds image source")
    config = data_config.config
    if "/" in name and not config:
        name, config = name.split("/", 1)
    builder = records.load_builder(data_dir, name, config or None,
                                   data_config.version or None)
    if split not in builder.info.splits:
        raise UserError(f"dataset {builder.info.full_name} has no split {split!r}; "
                        f"known: {sorted(builder.info.splits)}")
    ds = grain.MapDataset.source(builder.as_data_source(split=split))
    limit = int(data_config.num_examples or 0)
    if 0 < limit < len(ds):
        ds = ds[:limit]
    size = data_config.image_size

    def make(record: Mapping[str, Any]) -> dict:
        image = _decode_image(record["image"])
        if size:
            image = resize_image(image, int(size))
        return {"image": image, "labels": record_labels(record)}

    return ds.map(make)


# --------------------------------------------------------------------------- pipeline


def materialize(ds: grain.MapDataset) -> grain.MapDataset:
    """Reads a finite dataset of {"image", "labels"} into memory (stacked numpy arrays)."""
    n = len(ds)
    first = ds[0]
    images = np.empty((n,) + first["image"].shape, np.uint8)
    labels = np.empty((n,) + first["labels"].shape, np.int32)
    for i, ex in enumerate(ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                                                prefetch_buffer_size=64))):
        images[i], labels[i] = ex["image"], ex["labels"]
    return grain.MapDataset.range(n).map(lambda i: {"image": images[i], "labels": labels[i]})


def image_dataset(data_config: Any, split: str, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
    """This host's shard of the examples of `split`, unbatched and unshuffled."""
    data_config = full_config(data_config)
    source = IMAGE_SOURCES.get(data_config.source)
    ds = source(data_config, split)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} out of range for {process_count} processes")
    if process_count > 1:
        ds = ds[process_index::process_count]
    if data_config.cache:
        ds = materialize(ds)
    return ds


def image_batches(data_config: Any, split: str, batch_size: int, *, seed: int = 0,
                  shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator of {"image": uint8 [B,H,W,3], "labels": int32 [B,A]}.

    `batch_size` is the per-host batch. With `repeat`, the iterator never ends and each epoch is
    reshuffled (deterministically from `seed`); without it, it stops after one pass.
    `num_threads` batches are assembled in parallel (prefetch of 2 batches per thread).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    ds = image_dataset(data_config, split, process_index=process_index,
                       process_count=process_count)
    if len(ds) < batch_size and drop_remainder:
        raise UserError(f"split {split!r} has {len(ds)} examples on this host, fewer than one "
                        f"batch of {batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=2 * max(num_threads, 1))
    return iter(ds.to_iter_dataset(options))
