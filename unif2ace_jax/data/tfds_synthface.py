"""TFDS builder `synthface`: the procedural SynthFace data as array_record, shared schema.

Splits `train`, `test`, `test_heldout_combos` (attribute combinations never in train). Record i
of a split is `synthface.generate(seed, n, image_size, split)`'s example i (shuffling on write is
off), stored in the schema of `records` with the image as PNG. `attributes` is the JSON object
of the example's attribute values; `qa` carries each question's type and attribute. The
attribute table (name -> values) is written to the dataset's `metadata.json`.

Configs (name: image size, train / test / held-out examples):

==============  =====  =============================
`tiny_64`        64    320 / 64 / 64 (tests, smoke)
`small_64`       64    20000 / 1000 / 1000 (main job)
`tiny_128`      128    320 / 64 / 64
`small_128`     128    20000 / 1000 / 1000
`tiny_256`      256    320 / 64 / 64
`small_256`     256    20000 / 1000 / 1000
==============  =====  =============================

Custom sizes: `make_synthface_builder(data_dir, image_size, num_train, num_test, num_heldout,
seed)`; its config is named `custom_<size>_<train>_<test>_<heldout>_s<seed>`. With
`num_workers > 1` examples are rendered in that many spawned processes (same records, since
example i depends only on (seed, split, i)).
"""

from __future__ import annotations

import dataclasses
import multiprocessing

import tensorflow_datasets as tfds

from unif2ace_jax.data import records, synthface
from unif2ace_jax.errors import UserError

NAME = "synthface"
SPLIT_NAMES = ("train", "test", "test_heldout_combos")
IMAGE_SIZES = (64, 128, 256)


@dataclasses.dataclass(eq=False)
class SynthFaceConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    num_train: int = 320
    num_test: int = 64
    num_heldout: int = 64
    seed: int = 0

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "test": self.num_test, "test_heldout_combos": self.num_heldout}


def _preset(kind: str, size: int) -> SynthFaceConfig:
    counts = {"tiny": (320, 64, 64), "small": (20000, 1000, 1000)}[kind]
    return SynthFaceConfig(
        name=f"{kind}_{size}",
        description=f"SynthFace {size}px, {counts[0]}/{counts[1]}/{counts[2]} examples",
        image_size=size,
        num_train=counts[0],
        num_test=counts[1],
        num_heldout=counts[2],
    )


class Synthface(tfds.core.GeneratorBasedBuilder):
    """SynthFace: procedural faces with exact attributes, captions and QA."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [_preset(kind, size) for size in IMAGE_SIZES for kind in ("tiny", "small")]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return records.code_path_of(cls)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural faces with known fine-grained attributes (unif2ace_jax).",
            features=records.features_dict(cfg.image_size),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                attributes={k: list(v) for k, v in synthface.ATTRIBUTES.items()},
                seed=cfg.seed,
                image_size=cfg.image_size,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()
            if n > 0
        }

    def __init__(self, *, num_workers: int = 1, **kwargs):
        self.num_workers = max(1, int(num_workers))
        super().__init__(**kwargs)

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        jobs = [(cfg.seed, i, cfg.image_size, split) for i in range(num)]
        if self.num_workers > 1 and num >= 4 * _POOL_CHUNK:
            # spawn: safe even when the parent has started threads (JAX, grain).
            with multiprocessing.get_context("spawn").Pool(self.num_workers) as pool:
                yield from enumerate(pool.imap(_record, jobs, chunksize=_POOL_CHUNK))
        else:
            yield from enumerate(map(_record, jobs))


_POOL_CHUNK = 32


def _record(job: tuple[int, int, int, str]) -> dict:
    """Record `index` of a split (a top-level function so worker processes can run it)."""
    seed, index, image_size, split = job
    ex = synthface.example(seed, index, image_size=image_size, split=split)
    return records.make_record(
        id=ex["id"],
        image_png=records.encode_png(ex["image"]),
        caption=ex["caption"],
        qa=ex["qa"],
        qa_types=ex["qa_types"],
        qa_attributes=ex["qa_attributes"],
        attributes=ex["attributes"],
    )


def config_names() -> list[str]:
    return [c.name for c in Synthface.BUILDER_CONFIGS]


def make_synthface_builder(
    data_dir: str,
    image_size: int = 64,
    num_train: int = 320,
    num_test: int = 64,
    num_heldout: int = 64,
    seed: int = 0,
    config_name: str | None = None,
    num_workers: int = 1,
) -> Synthface:
    """A `synthface` builder: a named preset (`config_name`) or custom sizes.

    Raises UserError for an unknown preset, an unsupported image size or negative counts.
    """
    if config_name is not None:
        if config_name not in config_names():
            raise UserError(
                f"unknown synthface config {config_name!r}; known: {', '.join(config_names())}"
            )
        return Synthface(
            data_dir=data_dir, config=config_name, file_format="array_record", num_workers=num_workers
        )
    if image_size not in IMAGE_SIZES:
        raise UserError(f"synthface image_size must be one of {IMAGE_SIZES}, got {image_size}")
    if min(num_train, num_test, num_heldout) < 0 or num_train == 0:
        raise UserError("synthface split sizes must be >= 0 and num_train > 0")
    cfg = SynthFaceConfig(
        name=f"custom_{image_size}_{num_train}_{num_test}_{num_heldout}_s{seed}",
        description="SynthFace with custom sizes",
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        num_heldout=num_heldout,
        seed=seed,
    )
    return Synthface(data_dir=data_dir, config=cfg, file_format="array_record", num_workers=num_workers)
