"""SynthFace attribute schema, sampling weights and the held-out attribute combinations.

Every value is a lowercase word or phrase used verbatim in captions and QA answers. Value words
are unique across attributes (no colour word is shared between hair, eyes, lipstick, background
and shirt), so a caption can be checked by scanning for value words. "none" marks an absent
accessory (glasses, beard, moustache, earrings, hat, lipstick, freckles). head_turn is the
direction the face points as the viewer sees it ("left" = towards the image's left edge).
"""

from __future__ import annotations

import itertools

import numpy as np

from unif2ace_jax.errors import UserError

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair_color": ("black", "brown", "blond", "red", "gray"),
    "hair_style": ("short", "bob", "long", "curly", "braided"),
    "eye_color": ("blue", "green", "amber", "violet"),
    "eyebrows": ("thin", "bushy", "arched"),
    "glasses": ("none", "circular", "rectangular"),
    "beard": ("none", "stubble", "goatee", "full"),
    "moustache": ("none", "pencil", "chevron", "handlebar"),
    "expression": ("smiling", "neutral", "frowning", "surprised", "laughing"),
    "skin_tone": ("fair", "medium", "tan", "dark"),
    "face_shape": ("oval", "round", "square", "heart-shaped"),
    "nose": ("button", "wide", "pointed"),
    "earrings": ("none", "studs", "hoops"),
    "hat": ("none", "beanie", "cap", "top hat"),
    "lipstick": ("none", "crimson", "purple"),
    "freckles": ("none", "freckled"),
    "background": ("white", "yellow", "orange", "teal", "pink"),
    "shirt_color": ("maroon", "olive", "navy", "cream"),
    "head_turn": ("left", "frontal", "right"),
}

# Probability of "none" for the accessory-like attributes; other values share the rest equally.
# All remaining attributes are uniform.
NONE_PROBABILITY: dict[str, float] = {
    "glasses": 0.4,
    "beard": 0.4,
    "moustache": 0.4,
    "earrings": 0.4,
    "hat": 0.4,
    "lipstick": 0.4,
    "freckles": 0.5,
}

# Pairs of (attribute, value) never shown together in the train and test splits; the
# `test_heldout_combos` split contains only faces with at least one of them (compositional
# generalisation). Together they cover about 7.8% of unconstrained samples.
HELDOUT_COMBOS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("hair_color", "blond"), ("beard", "full")),
    (("hat", "top hat"), ("expression", "laughing")),
)


def _probabilities(name: str) -> np.ndarray:
    values = ATTRIBUTES[name]
    n = len(values)
    if name in NONE_PROBABILITY:
        p_none = NONE_PROBABILITY[name]
        probs = np.full(n, (1.0 - p_none) / (n - 1))
        probs[values.index("none")] = p_none
        return probs
    return np.full(n, 1.0 / n)


PROBABILITIES: dict[str, np.ndarray] = {name: _probabilities(name) for name in ATTRIBUTES}
_CUMULATIVE = [np.cumsum(PROBABILITIES[name])[:-1] for name in ATTRIBUTES]


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One face's attributes, each drawn independently (held-out pairs are NOT excluded)."""
    u = rng.random(len(ATTRIBUTES))
    return {
        name: values[int(np.searchsorted(cum, x, side="right"))]
        for (name, values), cum, x in zip(ATTRIBUTES.items(), _CUMULATIVE, u)
    }


def is_heldout(attributes: dict[str, str]) -> bool:
    """True when `attributes` contains at least one pair from HELDOUT_COMBOS."""
    return any(
        attributes.get(a) == va and attributes.get(b) == vb for (a, va), (b, vb) in HELDOUT_COMBOS
    )


def heldout_probability() -> float:
    """Exact probability that `sample_attributes` yields a held-out face (inclusion-exclusion)."""
    total = 0.0
    for k in range(1, len(HELDOUT_COMBOS) + 1):
        for subset in itertools.combinations(HELDOUT_COMBOS, k):
            fixed: dict[str, str] = {}
            consistent = True
            for pair in subset:
                for name, value in pair:
                    if fixed.setdefault(name, value) != value:
                        consistent = False
            if not consistent:
                continue
            p = 1.0
            for name, value in fixed.items():
                p *= PROBABILITIES[name][ATTRIBUTES[name].index(value)]
            total += (-1) ** (k + 1) * p
    return total


def sample_for_split(rng: np.random.Generator, heldout: bool, max_tries: int = 10_000) -> dict:
    """Rejection-samples attributes that are held out (`heldout=True`) or not."""
    for _ in range(max_tries):
        attributes = sample_attributes(rng)
        if is_heldout(attributes) == heldout:
            return attributes
    raise RuntimeError("could not sample attributes for the split; check HELDOUT_COMBOS")


def validate_attributes(attributes: dict[str, str]) -> None:
    """Raises UserError unless `attributes` gives a known value for every attribute."""
    missing = [name for name in ATTRIBUTES if name not in attributes]
    if missing:
        raise UserError(f"attributes missing {missing}")
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise UserError(f"unknown attribute {name!r}; known: {list(ATTRIBUTES)}")
        if value not in ATTRIBUTES[name]:
            raise UserError(f"unknown value {value!r} for {name}; known: {ATTRIBUTES[name]}")
