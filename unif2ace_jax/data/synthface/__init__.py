"""SynthFace: procedural stylised faces with known attributes, dense captions and exact QA.

`generate(seed, num, image_size, split)` yields examples; example i of (seed, split) depends only
on (seed, split, i), so generation can be sharded. Splits: "train" and "test" never contain a
HELDOUT_COMBOS pair; "test_heldout_combos" contains at least one in every example.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from unif2ace_jax.data.synthface.attributes import (
    ATTRIBUTES,
    HELDOUT_COMBOS,
    heldout_probability,
    is_heldout,
    sample_attributes,
    sample_for_split,
    validate_attributes,
)
from unif2ace_jax.data.synthface.render import render
from unif2ace_jax.data.synthface.text import (
    ANSWER_VOCAB,
    PRESENCE_ITEMS,
    make_caption,
    make_qa,
)
from unif2ace_jax.errors import UserError

SPLITS = ("train", "test", "test_heldout_combos")

__all__ = [
    "ANSWER_VOCAB", "ATTRIBUTES", "HELDOUT_COMBOS", "PRESENCE_ITEMS", "SPLITS", "example",
    "generate", "heldout_probability", "is_heldout", "make_caption", "make_qa", "render",
    "sample_attributes", "validate_attributes",
]


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise UserError(f"unknown SynthFace split {split!r}; choose one of {list(SPLITS)}")
    return SPLITS.index(split)


def example(seed: int, index: int, image_size: int = 64, split: str = "train") -> dict:
    """Example `index` of (seed, split); see `generate` for the fields."""
    split_index = _split_index(split)
    if seed < 0 or index < 0:
        raise UserError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), split_index, int(index)])
    attr_rng, image_rng, caption_rng, qa_rng = rng.spawn(4)
    attributes = sample_for_split(attr_rng, heldout=split == "test_heldout_combos")
    qa = make_qa(attributes, qa_rng)
    return {
        "id": f"synthface-{split}-{seed}-{index}",
        "image": render(attributes, image_size, image_rng),
        "caption": make_caption(attributes, caption_rng),
        "qa": [(q["question"], q["answer"]) for q in qa],
        "qa_types": [q["type"] for q in qa],
        "qa_attributes": [q["attribute"] for q in qa],
        "attributes": attributes,
    }


def generate(seed: int, num: int, image_size: int = 64, split: str = "train",
             start: int = 0) -> Iterator[dict]:
    """Yields `num` examples, indices start .. start+num-1, of the given split.

    Each example: id (str, unique per split+seed+index), image uint8 [image_size,
    image_size, 3], caption str, qa list of (question, answer) str tuples, qa_types list[str]
    and qa_attributes list[str] parallel to qa (see text.py), attributes dict name -> value.
    """
    _split_index(split)
    if num < 0:
        raise UserError(f"num must be >= 0, got {num}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 32 or image_size % 32:
        raise UserError(f"image_size must be a positive multiple of 32, got {image_size}")
    for i in range(start, start + num):
        yield example(seed, i, image_size, split)
