"""TFDS builder `unif2ace_130k`: a manually downloaded copy of UniF2ace-130K as array_record.

The copy (any common layout, see `manual_layout`) is read from `manual_dir`; every image is
decoded, center-cropped to a square, resized to the config's size and stored as PNG in the
shared record schema (`records`). QA types from the data are kept when given ("conversation"
for chat turns, "other" otherwise); `attributes` is "{}" (the copy has no attribute table).

Configs: `res_64`, `res_128`, `res_256` (default; the paper's resolution), `res_512`.

A corrupt image stops the build with a UserError naming the file (or parquet row); with
`skip_corrupt=True` such examples are skipped and their count is logged per split.

Example::

    b = Unif2ace130k(data_dir=DIR, config="res_256", file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=COPY))
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds
from absl import logging

from unif2ace_jax.data import manual_layout, records
from unif2ace_jax.errors import UserError

NAME = "unif2ace_130k"


@dataclasses.dataclass(eq=False)
class Unif2aceConfig(tfds.core.BuilderConfig):
    image_size: int = 256
    test_fraction: float = 0.01  # used only when the copy has no test split


def _config(size: int) -> Unif2aceConfig:
    return Unif2aceConfig(
        name=f"res_{size}", image_size=size, description=f"UniF2ace-130K at {size}x{size} px"
    )


class Unif2ace130k(tfds.core.GeneratorBasedBuilder):
    """UniF2ace-130K (manual download), shared face-record schema."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [_config(256), _config(64), _config(128), _config(512)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return records.code_path_of(cls)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the dataset from https://huggingface.co/datasets/tulvgengenr/UniF2ace-130K "
        "(e.g. `huggingface-cli download tulvgengenr/UniF2ace-130K --repo-type dataset "
        "--local-dir DIR`) and pass DIR as manual_dir (parquet, or json/jsonl + images)."
    )

    def __init__(self, *, skip_corrupt: bool = False, **kwargs):
        self.skip_corrupt = skip_corrupt
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="UniF2ace-130K face images with dense captions and VQA pairs.",
            features=records.features_dict(self.builder_config.image_size),
            disable_shuffling=True,
            homepage="https://huggingface.co/datasets/tulvgengenr/UniF2ace-130K",
        )

    def _split_generators(self, dl_manager):
        # `dl_manager.manual_dir` asserts with TFDS's own message; read the raw value instead.
        raw = dl_manager._manual_dir  # noqa: SLF001
        manual_dir = os.fspath(raw) if raw else None
        if not manual_dir or not os.path.isdir(manual_dir):
            raise UserError(
                f"unif2ace_130k needs --manual_dir, a directory holding the downloaded copy "
                f"(got {manual_dir!r}). {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        layout = manual_layout.scan_manual_dir(manual_dir, self.builder_config.test_fraction)
        counts = layout.split_counts()
        if not counts:
            raise UserError(f"no examples found in {manual_dir} ({', '.join(layout.files[:5])})")
        return {split: self._generate_examples(layout, split) for split in sorted(counts)}

    def _generate_examples(self, layout: manual_layout.ManualLayout, split: str):
        size = self.builder_config.image_size
        seen: set[str] = set()
        skipped = 0
        for ex in layout.examples(split):
            if ex.image_bytes is not None:
                data, source = ex.image_bytes, ex.source
            else:
                source = ex.image_path
                try:
                    data = open(ex.image_path, "rb").read()
                except OSError as e:
                    raise UserError(f"cannot read image {ex.image_path}: {e}") from None
            try:
                image = records.decode_image(data, source=source, size=size)
            except UserError:
                if not self.skip_corrupt:
                    raise
                skipped += 1
                continue
            if ex.id in seen:
                raise UserError(f"duplicate id {ex.id!r} in split {split} ({ex.source})")
            seen.add(ex.id)
            yield ex.id, records.make_record(
                id=ex.id,
                image_png=records.encode_png(image),
                caption=ex.caption,
                qa=[(q, a) for q, a, _ in ex.qa],
                qa_types=[t for _, _, t in ex.qa],
                qa_attributes=[""] * len(ex.qa),
                attributes={},
            )
        if skipped and not seen:
            raise UserError(f"unif2ace_130k {split}: all {skipped} images are corrupt")
        if skipped:
            logging.warning("unif2ace_130k %s: skipped %d corrupt images", split, skipped)
            print(f"warning: unif2ace_130k {split}: skipped {skipped} corrupt images")


def make_unif2ace_builder(
    data_dir: str,
    image_size: int = 256,
    *,
    skip_corrupt: bool = False,
    test_fraction: float = 0.01,
) -> Unif2ace130k:
    """A builder for one of the `res_*` configs, or a custom size / test fraction."""
    name = f"res_{image_size}"
    known = {c.name: c for c in Unif2ace130k.BUILDER_CONFIGS}
    if name in known and test_fraction == known[name].test_fraction:
        config: str | Unif2aceConfig = name
    else:
        if image_size < 8:
            raise UserError(f"image_size must be >= 8, got {image_size}")
        config = Unif2aceConfig(
            name=f"res_{image_size}_test{test_fraction:g}", image_size=image_size,
            test_fraction=test_fraction,
        )
    return Unif2ace130k(
        data_dir=data_dir, config=config, file_format="array_record", skip_corrupt=skip_corrupt
    )
