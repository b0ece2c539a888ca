"""Building the face datasets by name (used by the data CLI and the main job).

`build_dataset("synthface", data_dir, config_name="small_64")` or
`build_dataset("unif2ace_130k", data_dir, manual_dir=COPY)` prepares the TFDS array_record
dataset (with TFDS's progress bars) and returns its directory. TFDS writes into an
`incomplete.*` directory that is renamed only when the build succeeds and removed when it
fails; `build_dataset` also removes every directory a failed build created (TFDS leaves e.g.
`<name>/.config/`), so a failed build never leaves anything that reads as a dataset.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds

from unif2ace_jax.data import records
from unif2ace_jax.data.tfds_synthface import make_synthface_builder
from unif2ace_jax.data.tfds_unif2ace import Unif2ace130k, make_unif2ace_builder
from unif2ace_jax.errors import UserError
from unif2ace_jax.registry import Registry

DATASET_BUILDERS: Registry[Callable[..., Any]] = Registry("dataset")


@DATASET_BUILDERS.register("synthface")
def _synthface(data_dir: str, *, config_name: str | None = None, image_size: int = 64,
               num_train: int = 320, num_test: int = 64, num_heldout: int = 64, seed: int = 0,
               num_workers: int = 1, **unused):
    _no_unused("synthface", unused)
    return make_synthface_builder(
        data_dir, image_size, num_train, num_test, num_heldout, seed,
        config_name=config_name or None, num_workers=num_workers,
    ), None


@DATASET_BUILDERS.register("unif2ace_130k")
def _unif2ace(data_dir: str, *, config_name: str | None = None, manual_dir: str | None = None,
              image_size: int | None = None, skip_corrupt: bool = False, test_fraction: float = 0.01,
              **unused):
    _no_unused("unif2ace_130k", unused)
    if not manual_dir:
        raise UserError("unif2ace_130k needs --manual_dir (the downloaded copy of UniF2ace-130K)")
    if not os.path.isdir(manual_dir):
        raise UserError(f"manual directory does not exist: {manual_dir}")
    if config_name:
        known = [c.name for c in Unif2ace130k.BUILDER_CONFIGS]
        if config_name not in known:
            raise UserError(f"unknown unif2ace_130k config {config_name!r}; known: {', '.join(known)}")
        image_size = int(config_name.split("_")[1])
    builder = make_unif2ace_builder(
        data_dir, image_size or 256, skip_corrupt=skip_corrupt, test_fraction=test_fraction
    )
    return builder, manual_dir


def _no_unused(name: str, unused: dict) -> None:
    given = {k: v for k, v in unused.items() if v not in (None, False, "")}
    if given:
        raise UserError(f"options {sorted(given)} do not apply to dataset {name}")


def build_dataset(dataset: str, data_dir: str, **options) -> str:
    """Prepares `dataset` under `data_dir` (reused if already complete); returns its directory.

    Options are those of the dataset's builder function (config_name, image_size, num_train,
    ..., manual_dir, skip_corrupt). Raises UserError for bad input, leaving no partial dataset.
    """
    factory = DATASET_BUILDERS.get(dataset)
    if not data_dir:
        raise UserError("--data_dir is required")
    parent = os.path.dirname(os.path.abspath(data_dir))
    if not os.path.isdir(parent):
        raise UserError(f"parent of the data directory does not exist: {parent}")
    data_dir = os.path.normpath(data_dir)
    before = set(_dirs_under(data_dir))
    try:
        builder, manual_dir = factory(data_dir, **options)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    except BaseException:
        _remove_new_dirs(data_dir, before)
        raise
    _remove_new_empty_dirs(os.path.join(data_dir, "downloads"), before)
    return os.fspath(builder.data_dir)


def _dirs_under(root: str) -> Iterator[str]:
    if os.path.isdir(root):
        yield root
        for r, dirs, _ in os.walk(root):
            for d in dirs:
                yield os.path.join(r, d)


def _remove_new_dirs(root: str, before: set[str]) -> None:
    """Removes every directory under `root` (and root) that a failed build created."""
    for path in sorted(_dirs_under(root), key=len):
        if path not in before and os.path.dirname(path) in before | {os.path.dirname(root)}:
            shutil.rmtree(path, ignore_errors=True)


def _remove_new_empty_dirs(root: str, before: set[str]) -> None:
    """Removes directories under `root` created by this build that hold no files."""
    for path in sorted(_dirs_under(root), key=len, reverse=True):
        if path in before:
            continue
        if not any(files for _, _, files in os.walk(path)):
            shutil.rmtree(path, ignore_errors=True)


def dataset_names() -> list[str]:
    return DATASET_BUILDERS.names()


def read_texts(
    data_dir: str, dataset: str, config_name: str | None = None, split: str = "train"
) -> Iterator[str]:
    """Captions, questions and answers of a prepared split (the SentencePiece corpus)."""
    builder = records.load_builder(data_dir, dataset, config_name)
    if split not in builder.info.splits:
        raise UserError(f"{dataset} has no split {split!r}; splits: {', '.join(builder.info.splits)}")
    source = records.encoded_source(builder, split)
    for i in range(len(source)):
        rec = source[i]
        yield records.as_str(rec[records.CAPTION])
        for row in records.qa_rows(rec[records.QA]):
            yield row["question"]
            yield row["answer"]
