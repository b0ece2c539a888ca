"""Shared steps of the commands that add computed fields to a prepared dataset.

`unif2ace_jax.data.pretokenize` (image codes) and `unif2ace_jax.data.embeddings` (expert
embeddings) both: open ``name[/config]`` in a data dir and name the new dataset
(`open_source`); refuse a finished dataset made by other weights, cache chunks under a
weights-keyed work dir, run `derive_dataset`, and record who made the fields in the new
dataset's ``metadata.json`` (`derive_recorded`); and parse the same command-line shape
(`cli_splits`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import flags

from unif2ace_jax import cli
from unif2ace_jax.data import records
from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.files import write_json


def open_source(data_dir: str, dataset: str, out_data_dir: str, name: str | None,
                suffix: str) -> tuple[Any, str]:
    """``(source builder, new dataset name)`` for ``dataset`` = ``name`` or ``name/config``.

    The new name defaults to ``<source name><suffix>``; UserError if the new dataset would
    replace the source.
    """
    src_name, _, config = dataset.partition("/")
    source = records.load_builder(data_dir, src_name, config or None)
    out_name = name or f"{src_name}{suffix}"
    if os.path.abspath(out_data_dir) == os.path.abspath(data_dir) and out_name == src_name:
        raise UserError("the output dataset would replace the source; choose another --name")
    return source, out_name


def recorded(path: str, key: str) -> dict | None:
    """The `key` entry of a finished dataset's metadata.json (None if absent or unfinished)."""
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(os.path.join(path, "dataset_info.json")) or not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f).get(key)


def record(path: str, key: str, entry: Mapping[str, Any]) -> None:
    """Sets `key` = `entry` in a dataset's metadata.json (where TFDS keeps
    `DatasetInfo.metadata`), written atomically."""
    meta_path = os.path.join(path, "metadata.json")
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    meta[key] = entry
    write_json(meta_path, meta, indent=1)


def derive_recorded(source: Any, out_data_dir: str, out_name: str, extra: Mapping[str, Any],
                    compute: Callable, batch_size: int, *, key: str, entry: Mapping[str, Any],
                    digest: str, digest_field: str, cache_tag: str,
                    other_maker: Callable[[dict], str], input_field: str,
                    splits: Sequence[str] | None, chunk_batches: int, progress: bool) -> str:
    """Derives `out_name` from `source` (`derive_dataset`) and records `entry` under `key`.

    `entry[digest_field]` is `digest`, a hash of the weights that compute the fields: a finished
    dataset whose recorded entry holds another digest is refused (UserError naming
    ``other_maker(recorded entry)``), and the chunk cache is
    ``out_data_dir/.derive_work/out_name[/config]/<cache_tag>-<digest>``. Returns the new
    dataset's version directory.
    """
    # lazy: `derive` imports tensorflow_datasets (seconds); ask/generate import this module
    from unif2ace_jax.data.derive import derive_dataset

    sub = [source.info.config_name] if source.info.config_name else []
    final_dir = os.path.join(out_data_dir, out_name, *sub, str(source.info.version))
    made_by = recorded(final_dir, key)
    if made_by is not None and made_by.get(digest_field) != digest:
        raise UserError(f"{final_dir} already holds {other_maker(made_by)}; choose another "
                        f"--name or --out_data_dir")
    work_dir = os.path.join(out_data_dir, ".derive_work", out_name, *sub, f"{cache_tag}-{digest}")
    path = derive_dataset(source, out_data_dir, out_name, extra, compute, batch_size,
                          work_dir=work_dir, splits=splits, input_fields=(input_field,),
                          chunk_batches=chunk_batches, progress=progress)
    record(path, key, entry)
    return path


def cli_splits(argv: list[str], required: Sequence[str]) -> tuple[Any, list[str] | None]:
    """``(absl FLAGS, --splits as a list or None for all)`` after checking the command line.

    UserError for positional arguments or an empty flag of `required`, in that order.
    """
    cli.no_positional(argv)
    for name in required:
        cli.require(name)
    f = flags.FLAGS
    return f, [s for s in f.splits.split(",") if s] if f.splits else None
