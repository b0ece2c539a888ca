"""SynthFace: determinism, shapes, schema, caption/QA truthfulness, held-out split, rendering."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from unif2ace_jax.data import synthface as sf
from unif2ace_jax.errors import UserError

# ---------------------------------------------------------------------------------------------
# Independent reference: how each attribute value may be written in text. Written here, not
# imported, so a wrong phrase in text.py is caught. "none" is written "no <thing>".
_W = r"\b{}\b"
VALUE_PATTERNS: dict[str, dict[str, str]] = {
    "hair_color": {v: _W.format(v) for v in ("black", "brown", "blond", "red", "gray")},
    "hair_style": {"short": r"\bshort\b", "bob": r"\bbob\b", "long": r"\blong\b",
                   "curly": r"\bcurly\b", "braided": r"\bbraid(ed|s)\b"},
    "eye_color": {v: _W.format(v) for v in ("blue", "green", "amber", "violet")},
    "eyebrows": {v: _W.format(v) for v in ("thin", "bushy", "arched")},
    "glasses": {"none": r"\bno glasses\b", "circular": r"\bcircular\b",
                "rectangular": r"\brectangular\b"},
    "beard": {"none": r"\bno beard\b", "stubble": r"\bstubble\b", "goatee": r"\bgoatee\b",
              "full": r"\bfull\b"},
    "moustache": {"none": r"\bno moustache\b", "pencil": r"\bpencil\b",
                  "chevron": r"\bchevron\b", "handlebar": r"\bhandlebar\b"},
    "expression": {"smiling": r"\bsmil(e|ing)\b", "neutral": r"\bneutral\b",
                   "frowning": r"\bfrown(ing)?\b", "surprised": r"\bsurprised\b",
                   "laughing": r"\blaughing\b"},
    "skin_tone": {v: _W.format(v) for v in ("fair", "medium", "tan", "dark")},
    "face_shape": {"oval": r"\boval\b", "round": r"\bround\b", "square": r"\bsquare\b",
                   "heart-shaped": r"\bheart-shaped\b"},
    "nose": {v: _W.format(v) for v in ("button", "wide", "pointed")},
    "earrings": {"none": r"\bno earrings\b", "studs": r"\bstuds?\b", "hoops": r"\bhoops?\b"},
    "hat": {"none": r"\bno hat\b", "beanie": r"\bbeanie\b", "cap": r"\bcap\b",
            "top hat": r"\btop hat\b"},
    "lipstick": {"none": r"\bno lipstick\b", "crimson": r"\bcrimson\b", "purple": r"\bpurple\b"},
    "freckles": {"none": r"\bno freckles\b", "freckled": r"(?<!no )\bfreckle"},
    "background": {v: _W.format(v) for v in ("white", "yellow", "orange", "teal", "pink")},
    "shirt_color": {v: _W.format(v) for v in ("maroon", "olive", "navy", "cream")},
    "head_turn": {"left": r"\bleft\b", "right": r"\bright\b",
                  "frontal": r"\bfrontal\b|facing the camera|facing forward"},
}
# Presence nouns used by count / which questions -> attribute; present means value != "none".
PRESENCE_NOUNS = {"glasses": "glasses", "beard": "beard", "moustache": "moustache",
                  "earrings": "earrings", "hat": "hat", "lipstick": "lipstick",
                  "freckles": "freckles"}
NUMBERS = ["zero", "one", "two", "three", "four", "five"]


def mentioned_values(text: str, attribute: str) -> set[str]:
    """Values of `attribute` whose pattern occurs in `text` (lower-cased)."""
    text = text.lower()
    return {v for v, pat in VALUE_PATTERNS[attribute].items() if re.search(pat, text)}


def reference_answer(question: str, qtype: str, attribute: str, attrs: dict[str, str]) -> str:
    """Recomputes a QA answer from the question text and the attributes."""
    q = question.lower()
    if qtype == "attribute":
        return attrs[attribute]
    if qtype == "count":
        nouns = [n for n in PRESENCE_NOUNS if re.search(rf"\b{n}\b", q)]
        assert len(nouns) >= 2, question
        return NUMBERS[sum(attrs[PRESENCE_NOUNS[n]] != "none" for n in nouns)]
    if qtype == "yes_no":
        # Only the pattern text after the subject counts; "the person's hair" is not a value.
        values = mentioned_values(q, attribute) - {"none"}
        assert len(values) <= 1, question
        if values:
            return "yes" if attrs[attribute] in values else "no"
        assert re.search(rf"\b{attribute}\b", q), question  # presence question
        return "yes" if attrs[attribute] != "none" else "no"
    if qtype == "which":
        options = re.search(r"(?:: |\b)([\w -]+?) or ([\w -]+?)\?$", q)
        assert options, question
        if attribute in ATTRIBUTE_NAMES:
            values = mentioned_values(q, attribute)
            assert len(values) == 2, question
            assert attrs[attribute] in values, question
            return attrs[attribute]
        nouns = [n for n in PRESENCE_NOUNS if re.search(rf"\b{n}\b", q)]
        assert len(nouns) == 2, question
        present = [n for n in nouns if attrs[PRESENCE_NOUNS[n]] != "none"]
        assert len(present) == 1, question
        return present[0]
    raise AssertionError(f"unknown QA type {qtype}")


ATTRIBUTE_NAMES = set(VALUE_PATTERNS)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train200():
    return list(sf.generate(seed=3, num=200, image_size=64, split="train"))


def test_schema():
    assert len(sf.ATTRIBUTES) >= 15
    assert set(sf.ATTRIBUTES) == set(VALUE_PATTERNS)
    for name, values in sf.ATTRIBUTES.items():
        assert len(values) >= 2 and len(set(values)) == len(values), name
        assert set(values) == set(VALUE_PATTERNS[name]), name
    # Non-"none" value phrases never match another attribute's pattern (unambiguous captions).
    for name, values in sf.ATTRIBUTES.items():
        for v in values:
            if v == "none":
                continue
            for other in sf.ATTRIBUTES:
                if other != name:
                    assert not mentioned_values(v, other), (name, v, other)
    assert list(sf.ANSWER_VOCAB) == sorted(set(sf.ANSWER_VOCAB))


def test_all_values_reachable():
    rng = np.random.default_rng(0)
    seen = {name: set() for name in sf.ATTRIBUTES}
    for _ in range(2000):
        for name, value in sf.sample_attributes(rng).items():
            seen[name].add(value)
    for name, values in sf.ATTRIBUTES.items():
        assert seen[name] == set(values), name


def test_determinism_and_index_independence():
    a = list(sf.generate(seed=7, num=5, image_size=64))
    b = list(sf.generate(seed=7, num=3, image_size=64))
    c = list(sf.generate(seed=7, num=2, image_size=64, start=3))
    for x, y in zip(a, b + c):
        assert x["id"] == y["id"]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["qa"] == y["qa"]
        assert x["attributes"] == y["attributes"]
    other = list(sf.generate(seed=8, num=5, image_size=64))
    assert [x["caption"] for x in a] != [x["caption"] for x in other]


def test_splits_differ_and_ids_unique():
    by_split = {s: list(sf.generate(seed=0, num=20, split=s)) for s in sf.SPLITS}
    ids = [ex["id"] for exs in by_split.values() for ex in exs]
    assert len(ids) == len(set(ids))
    train, test = by_split["train"], by_split["test"]
    assert sum(x["attributes"] == y["attributes"] for x, y in zip(train, test)) < 3
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(train, test))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes(size):
    (ex,) = sf.generate(seed=0, num=1, image_size=size)
    assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["caption"], str) and ex["caption"]
    assert len(ex["qa"]) == len(ex["qa_types"]) == len(ex["qa_attributes"])
    assert all(isinstance(q, str) and isinstance(a, str) for q, a in ex["qa"])
    assert ex["image"].std() > 10  # not blank


def test_bad_inputs():
    with pytest.raises(UserError, match="split"):
        next(sf.generate(0, 1, split="validation"))
    with pytest.raises(UserError, match="image_size"):
        next(sf.generate(0, 1, image_size=50))
    with pytest.raises(UserError, match="hair_color"):
        sf.render({**sf.sample_attributes(np.random.default_rng(0)), "hair_color": "green"}, 64,
                  np.random.default_rng(0))


def test_captions_true_and_dense(train200):
    counts = []
    for ex in train200:
        attrs = ex["attributes"]
        n = 0
        for name in sf.ATTRIBUTES:
            found = mentioned_values(ex["caption"], name)
            assert found <= {attrs[name]}, (name, attrs[name], found, ex["caption"])
            n += bool(found)
        counts.append(n)
    assert np.mean(counts) >= 12, np.mean(counts)
    assert len({ex["caption"].split(".")[1] for ex in train200}) > 100  # varied


def test_qa_answers_exact(train200):
    num, yes, no = [], 0, 0
    types = set()
    for ex in train200:
        num.append(len(ex["qa"]))
        for (q, ans), t, attr in zip(ex["qa"], ex["qa_types"], ex["qa_attributes"]):
            types.add(t)
            assert ans in sf.ANSWER_VOCAB, (q, ans)
            assert ans == reference_answer(q, t, attr, ex["attributes"]), (q, ans, t, attr)
            yes += ans == "yes"
            no += ans == "no"
        assert len({q for q, _ in ex["qa"]}) == len(ex["qa"])  # no repeated question
    assert np.mean(num) >= 6, np.mean(num)
    assert types == {"attribute", "yes_no", "count", "which"}
    assert abs(yes - no) <= 0.1 * (yes + no)


def test_heldout_split_disjoint():
    for split in ("train", "test"):
        for ex in sf.generate(seed=1, num=150, split=split):
            assert not sf.is_heldout(ex["attributes"])
    held = list(sf.generate(seed=1, num=60, split="test_heldout_combos"))
    for ex in held:
        a = ex["attributes"]
        assert any(a[x] == vx and a[y] == vy for (x, vx), (y, vy) in sf.HELDOUT_COMBOS)
    # Every combination occurs in the held-out split.
    for (x, vx), (y, vy) in sf.HELDOUT_COMBOS:
        assert any(ex["attributes"][x] == vx and ex["attributes"][y] == vy for ex in held)
    rng = np.random.default_rng(0)
    rate = np.mean([sf.is_heldout(sf.sample_attributes(rng)) for _ in range(3000)])
    assert 0.04 < rate < 0.12, rate


def test_every_attribute_value_changes_pixels():
    """Changing one attribute (same nuisance rng) visibly changes the 64-px image."""
    rng = np.random.default_rng(0)
    for base in [sf.sample_attributes(rng) for _ in range(4)]:
        for name, values in sf.ATTRIBUTES.items():
            images = {v: sf.render({**base, name: v}, 64, np.random.default_rng(1)).astype(int)
                      for v in values}
            for v, w in itertools.combinations(values, 2):
                diff = np.abs(images[v] - images[w]).max(-1)
                assert (diff > 30).sum() >= 4, (name, v, w, base)


def test_cli_writes_grid(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "unif2ace_jax.data.synthface", f"--out={out}",
                           "--num=3", "--split=test"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and proc.stdout.count("[") >= 3
    bad = subprocess.run([sys.executable, "-m", "unif2ace_jax.data.synthface", f"--out={out}",
                          "--split=val"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:"), bad.stderr
