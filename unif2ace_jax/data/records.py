"""The record schema shared by every face dataset, and image/record helpers.

Both TFDS builders (`synthface`, `unif2ace_130k`) write records with the same features, so the
input pipeline treats them alike:

=================  ==========================================================================
`id`               Text. Unique within the dataset.
`image`            Image uint8 [S, S, 3], stored as PNG bytes (S = the builder config's size).
`caption`          Text. Dense caption.
`qa`               Sequence of {`question`: Text, `answer`: Text, `type`: Text,
                   `attribute`: Text}; `type` is one of `QA_TYPES` (unknown types are read as
                   "other"), `attribute` the attribute name the question is about ("" if none).
`attributes`       Text: a JSON object {attribute name: value string}, keys sorted. JSON rather
                   than one feature per attribute so that datasets with different attribute
                   sets share one schema ("{}" when a dataset has none).
=================  ==========================================================================

Derived datasets (`data/derive.py`) add fields next to these, e.g. `image_codes`
(int32 [N], image-tokenizer codes, flattened row-major h*w) and float32 embedding vectors.

Text features read back as `bytes`; use `as_str`. Read a prepared dataset (any name, built by
any builder, without its class or TensorFlow) with `load_builder(data_dir, name, config)`, and
a split with its images still PNG-encoded with `encoded_source(builder, split)`.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from unif2ace_jax.errors import UserError

IMAGE = "image"
IMAGE_CODES = "image_codes"
CAPTION = "caption"
QA = "qa"
ID = "id"
ATTRIBUTES = "attributes"
BASE_FIELDS = (ID, IMAGE, CAPTION, QA, ATTRIBUTES)

# Question types. The first group are the SynthFace question forms; "conversation" and
# "description" are the UniF2ace-130K kinds; anything else reads as "other". The pipeline's
# `qa_type` is an index into this tuple (-1 for examples that are not MMU).
QA_TYPES: tuple[str, ...] = (
    "attribute",
    "yes_no",
    "count",
    "which",
    "conversation",
    "description",
    "other",
)


def qa_type_index(name: str | bytes) -> int:
    """Index of a question type in `QA_TYPES`; unknown names map to "other"."""
    name = as_str(name)
    try:
        return QA_TYPES.index(name)
    except ValueError:
        return QA_TYPES.index("other")


def as_str(value: Any) -> str:
    """A TFDS Text value (bytes when read back) as str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return as_str(value.item())
    return str(value)


def code_path_of(cls) -> epath.Path:
    """The source file of a builder class (TFDS looks for a checksums file next to it).

    TFDS 4.9.10's own `code_path` imports the `importlib_resources` backport on Python >= 3.9,
    where it is not installed; builders here override `code_path` with this instead.
    """
    return epath.Path(sys.modules[cls.__module__].__file__)


def features_dict(image_size: int | None, extra: Mapping[str, Any] | None = None):
    """The TFDS FeaturesDict of the shared schema, plus `extra` features (name -> Feature).

    Args:
      image_size: S for images stored [S, S, 3]; None for any size.
      extra: additional features of a derived dataset; may not reuse a base name.
    """
    import tensorflow_datasets as tfds  # lazy: seconds; ask/generate import this module

    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    feats = {
        ID: tfds.features.Text(),
        IMAGE: tfds.features.Image(shape=shape, encoding_format="png"),
        CAPTION: tfds.features.Text(),
        QA: tfds.features.Sequence(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "type": tfds.features.Text(),
                "attribute": tfds.features.Text(),
            }
        ),
        ATTRIBUTES: tfds.features.Text(),
    }
    for name, feature in (extra or {}).items():
        if name in feats:
            raise ValueError(f"extra feature {name!r} clashes with a base field")
        feats[name] = feature
    return tfds.features.FeaturesDict(feats)


def make_record(
    id: str,
    image_png: bytes,
    caption: str,
    qa: Sequence[tuple[str, str]],
    qa_types: Sequence[str] | None = None,
    qa_attributes: Sequence[str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> dict:
    """One example in the shared schema (the dict a builder yields)."""
    qa_types = list(qa_types) if qa_types is not None else ["other"] * len(qa)
    qa_attributes = list(qa_attributes) if qa_attributes is not None else [""] * len(qa)
    if not len(qa_types) == len(qa_attributes) == len(qa):
        raise ValueError(
            f"qa ({len(qa)}), qa_types ({len(qa_types)}) and qa_attributes "
            f"({len(qa_attributes)}) differ in length"
        )
    return {
        ID: str(id),
        IMAGE: image_png,
        CAPTION: str(caption),
        QA: [
            {"question": str(q), "answer": str(a), "type": str(t), "attribute": str(at)}
            for (q, a), t, at in zip(qa, qa_types, qa_attributes)
        ],
        ATTRIBUTES: json.dumps({str(k): str(v) for k, v in (attributes or {}).items()}, sort_keys=True),
    }


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, *, source: str = "image", size: int | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 [H, W, 3] RGB.

    Args:
      data: the encoded bytes.
      source: names the image (file, record id) in the error message.
      size: if given, center-crop to a square and resize to [size, size] (bicubic).
    Raises:
      UserError: the bytes are not a decodable image, naming `source`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = _square_resize(im, size)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"corrupt image {source}: {' '.join(str(e).split())[:200]}") from None


def _square_resize(im, size: int):
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im.resize((size, size), Image.Resampling.BICUBIC)


def load_builder(
    data_dir: str | os.PathLike, name: str, config: str | None = None, version: str | None = None
):
    """A read-only TFDS builder for a prepared dataset `data_dir/name[/config]/version`.

    Works for any dataset written by these builders or by `derive_dataset`, without importing
    the builder class and without TensorFlow. The newest version is used unless `version` is
    given. Raises UserError listing what is there when the dataset is missing.
    """
    import tensorflow_datasets as tfds  # lazy: seconds; ask/generate import this module

    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory does not exist: {data_dir}")
    path = os.path.join(data_dir, name)
    if not os.path.isdir(path):
        found = ", ".join(list_datasets(data_dir)) or "(nothing)"
        raise UserError(f"no dataset {name!r} in {data_dir}; found: {found}")
    if not config and not complete_versions(path):
        # No version directly under the name: a dataset with configs; take the only built one.
        configs = sorted(c for c in os.listdir(path) if complete_versions(os.path.join(path, c)))
        if len(configs) == 1:
            config = configs[0]
        elif configs:
            raise UserError(
                f"dataset {name!r} in {data_dir} has several configs, name one: {', '.join(configs)}"
            )
    if config:
        path = os.path.join(path, config)
        if not os.path.isdir(path):
            raise UserError(
                f"dataset {name!r} in {data_dir} has no config {config!r}; "
                f"found: {', '.join(list_datasets(data_dir)) or '(nothing)'}"
            )
    versions = complete_versions(path)
    if not versions:
        full = f"{name}/{config}" if config else name
        raise UserError(f"no complete build of {full} in {data_dir} (build it first)")
    if version is None:
        version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    elif version not in versions:
        raise UserError(f"{name} has no version {version} in {data_dir}; found {', '.join(versions)}")
    return tfds.builder_from_directory(os.path.join(path, version))


def encoded_source(builder, split: str):
    """`builder.as_data_source(split)` with images left as PNG bytes (decode with `decode_image`,
    which names the record in its error; other fields are decoded by TFDS)."""
    import tensorflow_datasets as tfds  # lazy: seconds; ask/generate import this module

    decoders = None
    if IMAGE in builder.info.features:
        decoders = {IMAGE: tfds.decode.SkipDecoding()}
    return builder.as_data_source(split=split, decoders=decoders)


def complete_versions(path: str) -> list[str]:
    """Version dirs under `path` that hold a finished build (TFDS writes dataset_info.json last)."""
    if not os.path.isdir(path):
        return []
    out = []
    for v in os.listdir(path):
        parts = v.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            if os.path.isfile(os.path.join(path, v, "dataset_info.json")):
                out.append(v)
    return sorted(out)


def list_datasets(data_dir: str) -> list[str]:
    """`name[/config]` of every complete build in `data_dir`."""
    found = []
    if not os.path.isdir(data_dir):
        return found
    for name in sorted(os.listdir(data_dir)):
        p = os.path.join(data_dir, name)
        if not os.path.isdir(p) or name == "downloads":
            continue
        if complete_versions(p):
            found.append(name)
        for cfg in sorted(os.listdir(p)):
            if complete_versions(os.path.join(p, cfg)):
                found.append(f"{name}/{cfg}")
    return found


def qa_rows(qa: Mapping[str, Iterable]) -> list[dict[str, str]]:
    """A read-back `qa` Sequence (dict of lists of bytes) as a list of dicts of str."""
    keys = list(qa)
    cols = [list(qa[k]) for k in keys]
    n = len(cols[0]) if cols else 0
    return [{k: as_str(c[i]) for k, c in zip(keys, cols)} for i in range(n)]
