"""Derived datasets: a new TFDS array_record dataset = a source's records + computed fields.

Later steps add fields to the face records (image codes from the image tokenizer, CLIP / face
embeddings). `derive_dataset` computes them batch by batch and writes a NEW dataset
`dst_data_dir/name[/config]/version` holding every original field unchanged (images keep
their PNG bytes) plus the extra ones, in the source's record order. The source is not touched.

Resumable: each split is cut into chunks of `batch_size * chunk_batches` records; a chunk's
outputs are cached as `work_dir/<split>/chunk_NNNNNN.npz` (written atomically), and a rerun
skips finished chunks. The final dataset is then written from the cache; TFDS writes it into an
`incomplete.*` directory renamed on success, so the dataset only appears when complete. A
`manifest.json` in the work dir guards against mixing chunks of different runs.

`compute_fn(batch) -> outputs`:
  batch: {"index": int64 [B] (record index in the split), and each of `input_fields`:
          "image" uint8 [B, H, W, 3], Text fields as object arrays of str [B], Tensor
          fields stacked}; B is always `batch_size` (the last batch of a split is padded by
          repeating its last record; those rows' outputs are dropped).
  outputs: {name: array [B, *shape]} for every name in `extra_features`, cast to its dtype.

Example::

    derive_dataset(records.load_builder(d, "synthface", "small_64"), d, "synthface_codes",
                   {"image_codes": tfds.features.Tensor(shape=(256,), dtype=np.int32)},
                   lambda b: {"image_codes": encode(b["image"])}, batch_size=64)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from unif2ace_jax.data import records
from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.files import atomic_open, write_json

ComputeFn = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _open_source(src: Any):
    if isinstance(src, tfds.core.DatasetBuilder):
        path = os.fspath(src.data_dir)
    else:
        path = os.fspath(src)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        versions = records.complete_versions(path)
        if not versions:
            raise UserError(f"not a prepared TFDS dataset directory: {path}")
        path = os.path.join(path, versions[-1])
    return tfds.builder_from_directory(path)


def _feature_spec(feature) -> dict:
    return {"class": type(feature).__name__, "shape": list(getattr(feature, "shape", ()) or ()),
            "dtype": str(np.dtype(getattr(feature, "np_dtype", np.float32)))}


def _batch_inputs(
    source, idx: Sequence[int], input_fields: Sequence[str], split: str
) -> dict[str, np.ndarray]:
    rows = [source[i] for i in idx]
    batch: dict[str, np.ndarray] = {"index": np.asarray(idx, np.int64)}
    for field in input_fields:
        values = [r[field] for r in rows]
        if field == records.IMAGE:
            batch[field] = np.stack([
                records.decode_image(bytes(v), source=f"{split} record {i}") for v, i in zip(values, idx)
            ])
        elif isinstance(values[0], (bytes, str)):
            batch[field] = np.array([records.as_str(v) for v in values], dtype=object)
        else:
            batch[field] = np.stack([np.asarray(v) for v in values])
    return batch


def _check_outputs(out: Any, extra_features: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    if not isinstance(out, Mapping):
        raise TypeError(f"compute_fn must return a dict, got {type(out).__name__}")
    missing = sorted(set(extra_features) - set(out))
    if missing:
        raise ValueError(f"compute_fn output lacks fields {missing}")
    checked = {}
    for name, feature in extra_features.items():
        arr = np.asarray(out[name])
        want = (n, *tuple(feature.shape))
        if arr.shape != want:
            raise ValueError(f"compute_fn output {name!r} has shape {arr.shape}, expected {want}")
        checked[name] = arr.astype(feature.np_dtype)
    return checked


def _atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def derive_dataset(
    src: Any,
    dst_data_dir: str,
    name: str,
    extra_features: Mapping[str, Any],
    compute_fn: ComputeFn,
    batch_size: int,
    *,
    work_dir: str | None = None,
    splits: Sequence[str] | None = None,
    input_fields: Sequence[str] = ("id", "image", "caption"),
    chunk_batches: int = 8,
    keep_cache: bool = False,
    progress: bool = True,
) -> str:
    """Writes `dst_data_dir/name[/config]/version` = source records + `extra_features`.

    Args:
      src: a prepared source: a DatasetBuilder, or its version directory (or the directory
        above it).
      dst_data_dir: TFDS data dir of the new dataset.
      name: the new dataset's name (e.g. "synthface_codes"); config and version are the
        source's.
      extra_features: name -> TFDS feature (e.g. `Tensor(shape=(256,), dtype=np.int32)`).
      compute_fn: batched numpy -> batched numpy (module docstring).
      batch_size: records per compute_fn call.
      work_dir: chunk cache; default `dst_data_dir/.derive_work/name[/config]`.
      splits: default: all of the source's splits.
      input_fields: source fields given to compute_fn (besides "index").
      chunk_batches: batches per cached chunk.
      keep_cache: keep the chunk cache after a successful build (default: delete it).
    Returns:
      the directory of the new dataset version.
    """
    if batch_size <= 0 or chunk_batches <= 0:
        raise UserError("batch_size and chunk_batches must be positive")
    src_builder = _open_source(src)
    _check_fields(src_builder.info.features, input_fields, extra_features)
    config_name = src_builder.info.config_name or None
    sub = [config_name] if config_name else []
    final_dir = os.path.join(dst_data_dir, name, *sub, str(src_builder.info.version))
    if os.path.isfile(os.path.join(final_dir, "dataset_info.json")):
        return final_dir
    splits = list(splits) if splits is not None else list(src_builder.info.splits.keys())
    unknown = sorted(set(splits) - set(src_builder.info.splits.keys()))
    if unknown:
        raise UserError(f"source has no split(s) {unknown}")
    work_dir = work_dir or os.path.join(dst_data_dir, ".derive_work", name, *sub)
    os.makedirs(work_dir, exist_ok=True)
    chunk = batch_size * chunk_batches
    sizes = {s: int(src_builder.info.splits[s].num_examples) for s in splits}
    _claim_work_dir(work_dir, {
        "source": os.path.abspath(os.fspath(src_builder.data_dir)),
        "splits": sizes,
        "chunk": chunk,
        "batch_size": batch_size,
        "extra_features": {k: _feature_spec(v) for k, v in extra_features.items()},
    })
    sources = {s: records.encoded_source(src_builder, s) for s in splits}
    # 1. Compute and cache chunks.
    _compute_chunks(sources, sizes, work_dir, chunk, batch_size, input_fields, extra_features,
                    compute_fn, desc=f"deriving {name}", progress=progress)
    # 2. Write the new dataset from the source records and the cache.
    builder = _derived_builder_class(name, src_builder, extra_features, sources, work_dir, chunk)(
        data_dir=dst_data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    _clean_up(dst_data_dir, work_dir, keep_cache)
    return final_dir


def _check_fields(src_features, input_fields: Sequence[str],
                  extra_features: Mapping[str, Any]) -> None:
    for field in input_fields:
        if field not in src_features:
            known = ", ".join(src_features.keys())
            raise UserError(f"input field {field!r} not in the source ({known})")
    clash = sorted(set(extra_features) & set(src_features.keys()))
    if clash:
        raise UserError(f"extra features {clash} already exist in the source")


def _claim_work_dir(work_dir: str, manifest: dict) -> None:
    """Writes `manifest.json` into a new work dir; UserError if it holds another run's chunks."""
    mpath = os.path.join(work_dir, "manifest.json")
    if os.path.exists(mpath):
        if json.load(open(mpath)) != manifest:
            raise UserError(
                f"work dir {work_dir} holds chunks of a different derive run; "
                "delete it or pass another work_dir"
            )
    else:
        write_json(mpath, manifest, indent=1, sort_keys=True)


def _compute_chunks(sources: Mapping[str, Any], sizes: Mapping[str, int], work_dir: str,
                    chunk: int, batch_size: int, input_fields: Sequence[str],
                    extra_features: Mapping[str, Any], compute_fn: ComputeFn, *, desc: str,
                    progress: bool) -> None:
    """Computes and caches every chunk not cached yet, in split then record order."""
    todo = []
    for s in sources:
        os.makedirs(os.path.join(work_dir, s), exist_ok=True)
        for k in range(-(-sizes[s] // chunk)):
            if not os.path.exists(_chunk_path(work_dir, s, k)):
                todo.append((s, k))
    total = sum(min(chunk, sizes[s] - k * chunk) for s, k in todo)
    with tqdm(total=total, desc=desc, unit="ex", disable=not progress) as bar:
        for s, k in todo:
            start, stop = k * chunk, min((k + 1) * chunk, sizes[s])
            parts: dict[str, list[np.ndarray]] = {n: [] for n in extra_features}
            for b0 in range(start, stop, batch_size):
                idx = list(range(b0, min(b0 + batch_size, stop)))
                n = len(idx)
                idx += [idx[-1]] * (batch_size - n)
                inputs = _batch_inputs(sources[s], idx, input_fields, s)
                out = _check_outputs(compute_fn(inputs), extra_features, batch_size)
                for field, arr in out.items():
                    parts[field].append(arr[:n])
                bar.update(n)
            _atomic_savez(_chunk_path(work_dir, s, k), {f: np.concatenate(v) for f, v in parts.items()})


def _clean_up(dst_data_dir: str, work_dir: str, keep_cache: bool) -> None:
    """Removes an empty TFDS downloads dir and, unless `keep_cache`, the chunk cache."""
    downloads = os.path.join(dst_data_dir, "downloads")
    if os.path.isdir(downloads) and not any(files for _, _, files in os.walk(downloads)):
        shutil.rmtree(downloads, ignore_errors=True)
    if not keep_cache:
        shutil.rmtree(work_dir, ignore_errors=True)
        parent = os.path.dirname(os.path.abspath(work_dir))
        stop = os.path.abspath(dst_data_dir)
        while parent.startswith(stop + os.sep) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)


def _chunk_path(work_dir: str, split: str, k: int) -> str:
    return os.path.join(work_dir, split, f"chunk_{k:06d}.npz")


def _derived_builder_class(name, src_builder, extra_features, sources, work_dir, chunk):
    src_info = src_builder.info
    config_name = src_info.config_name or None
    feats = {k: src_info.features[k] for k in src_info.features.keys()}
    feats.update(extra_features)
    metadata = dict(src_info.metadata or {})
    metadata["derived_from"] = src_info.full_name
    metadata["derived_fields"] = sorted(extra_features)
    dataset_name = name

    class Derived(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(str(src_info.version))
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name)] if config_name else []

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return records.code_path_of(cls)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{src_info.full_name} + {', '.join(sorted(extra_features))}",
                features=tfds.features.FeaturesDict(feats),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(metadata),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {s: self._generate_examples(s) for s in sources}

        def _generate_examples(self, split):
            source = sources[split]
            cached = None
            for i in range(len(source)):
                k, r = divmod(i, chunk)
                if r == 0:
                    with np.load(_chunk_path(work_dir, split, k)) as z:
                        cached = {f: z[f] for f in z.files}
                record = dict(source[i])
                for f in extra_features:
                    record[f] = cached[f][r]
                yield i, record

    return Derived
