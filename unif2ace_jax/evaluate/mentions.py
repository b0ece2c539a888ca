"""Which SynthFace attributes does a caption state? (For scoring generated faces.)

A SynthFace caption states a random subset of the face's attributes (about 85 %), each with a
fixed set of phrasings (`data/synthface/text.py`), and value words are unique across
attributes. Given the face's true attributes, an attribute counts as mentioned when the caption
contains one of the phrasings of its true value. Captions truncated to the model's text width
(a word cut in half included) lose the mentions past the cut, so what is scored is exactly what
the model was told.
"""

from __future__ import annotations

import re
from typing import Mapping

_WORD = r"\b{}\b"

# attribute -> value -> regex alternatives (lower case). Values not listed use the value word.
_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "hair_style": {"braided": (r"\bbraid(s|ed)\b",), "bob": (r"\bbob\b",)},
    "eyebrows": {},
    "glasses": {"none": (r"\bno glasses\b",)},
    "beard": {"none": (r"\bno beard\b",), "full": (r"\bfull beard\b",)},
    "moustache": {"none": (r"\bno moustache\b",)},
    "expression": {"smiling": (r"\bsmiling\b", r"\bsmile\b"),
                   "frowning": (r"\bfrowning\b", r"\bfrown\b")},
    "earrings": {"none": (r"\bno earrings\b",), "studs": (r"\bstud earrings\b",),
                 "hoops": (r"\bhoop earrings\b",)},
    "hat": {"none": (r"\bno hat\b",), "top hat": (r"\btop hat\b",)},
    "lipstick": {"none": (r"\bno lipstick\b",)},
    "freckles": {"none": (r"\bno freckles\b",), "freckled": (r"(?<!no )\bfreckle(s|d)\b",)},
    "head_turn": {"left": (r"\bfacing left\b", r"\bto the left\b"),
                  "right": (r"\bfacing right\b", r"\bto the right\b"),
                  "frontal": (r"\bfacing the camera\b", r"\bfacing forward\b",
                              r"\bfrontal pose\b")},
}

# Attributes whose non-"none" values appear with a fixed noun after them.
_NOUN_AFTER = {"eyebrows": r"(eye)?brows", "glasses": "glasses", "moustache": "moustache",
               "face_shape": "face", "nose": "nose", "lipstick": "lipstick"}


def _patterns(name: str, value: str) -> tuple[str, ...]:
    special = _PHRASES.get(name, {})
    if value in special:
        return special[value]
    word = re.escape(value)
    if name in _NOUN_AFTER:
        return (rf"\b{word} {_NOUN_AFTER[name]}\b",)
    return (_WORD.format(word),)


def mentioned_attributes(caption: str, attributes: Mapping[str, str]) -> dict[str, str]:
    """The subset of `attributes` (name -> true value) that `caption` states."""
    text = " ".join(caption.lower().split())
    out = {}
    for name, value in attributes.items():
        if any(re.search(p, text) for p in _patterns(name, str(value).lower())):
            out[name] = value
    return out
