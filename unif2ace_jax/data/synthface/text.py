"""SynthFace captions (varied templates) and question-answer pairs with exact answers.

Captions mention each attribute with probability CAPTION_MENTION_P (about 15 of 18 on average)
and say only true things. Value words are used verbatim (plus a few fixed inflections:
"smile", "braids", "stud earrings", ...); absent accessories are written "no <thing>".

QA types (the `type` field):
  attribute  "What color is the person's hair?" -> an ATTRIBUTES value ("none" for an absent
             accessory).
  yes_no     a statement about one attribute, true or false; answers "yes"/"no", balanced within
             each image.
  count      how many listed items are present -> a number word ("zero" .. "four"). Items are
             PRESENCE_ITEMS: an item is present when its attribute is not "none" (stubble
             counts as a beard).
  which      a choice between two options, exactly one true; the answer is that option's
             value word, or a PRESENCE_ITEMS noun ("glasses", "hat", ...).
The `attribute` field names the attribute the answer depends on; questions over several
attributes join their names with "+" in ATTRIBUTES order (e.g. "glasses+earrings+hat").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from unif2ace_jax.data.synthface.attributes import ATTRIBUTES

CAPTION_MENTION_P = 0.85
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# attribute -> (noun phrase used in questions/captions, answer noun for "which" questions).
PRESENCE_ITEMS: dict[str, tuple[str, str]] = {
    "glasses": ("glasses", "glasses"),
    "beard": ("a beard", "beard"),
    "moustache": ("a moustache", "moustache"),
    "earrings": ("earrings", "earrings"),
    "hat": ("a hat", "hat"),
    "lipstick": ("lipstick", "lipstick"),
    "freckles": ("freckles", "freckles"),
}
ACCESSORIES = ("glasses", "earrings", "hat")
FACIAL_HAIR = ("beard", "moustache")

# Attributes asked about directly ("What ... ?"); freckles is binary and only asked as yes/no,
# count or which.
ATTRIBUTE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "hair_color": ("What color is the person's hair?", "What is the hair color of this person?"),
    "hair_style": ("How is the person's hair styled?", "What hairstyle does the person have?"),
    "eye_color": ("What color are the person's eyes?", "What is the eye color of this person?"),
    "eyebrows": ("What kind of eyebrows does the person have?", "How would you describe the "
                 "person's eyebrows?"),
    "glasses": ("What kind of glasses is the person wearing?", "What type of glasses does the "
                "person have on?"),
    "beard": ("What kind of beard does the person have?", "What type of beard is visible?"),
    "moustache": ("What kind of moustache does the person have?", "What type of moustache is "
                  "visible?"),
    "expression": ("What is the person's facial expression?", "What expression does the person "
                   "have?"),
    "skin_tone": ("What is the person's skin tone?", "How would you describe the skin tone?"),
    "face_shape": ("What shape is the person's face?", "What is the face shape of this person?"),
    "nose": ("What kind of nose does the person have?", "How would you describe the nose?"),
    "earrings": ("What kind of earrings is the person wearing?", "What type of earrings does the "
                 "person have?"),
    "hat": ("What kind of hat is the person wearing?", "What is the person wearing on their "
            "head?"),
    "lipstick": ("What color is the person's lipstick?", "What lipstick color is the person "
                 "wearing?"),
    "background": ("What color is the background?", "What is the background color?"),
    "shirt_color": ("What color is the person's shirt?", "What color shirt is the person "
                    "wearing?"),
    "head_turn": ("Which way is the person facing?", "In which direction is the head turned?"),
}

ANSWER_VOCAB: tuple[str, ...] = tuple(sorted(
    {v for name in ATTRIBUTE_QUESTIONS for v in ATTRIBUTES[name]}
    | {"yes", "no"} | set(NUMBER_WORDS) | {noun for _, noun in PRESENCE_ITEMS.values()}
))

_HAIR_STYLE_NP = {"short": "short hair", "bob": "a bob haircut", "long": "long hair",
                  "curly": "curly hair", "braided": "braided hair"}
_BEARD_NP = {"stubble": "stubble", "goatee": "a goatee", "full": "a full beard"}
_EARRINGS_NP = {"studs": "stud earrings", "hoops": "hoop earrings"}
_EXPRESSION_IS = {"smiling": "smiling", "neutral": "wearing a neutral expression",
                  "frowning": "frowning", "surprised": "looking surprised", "laughing": "laughing"}
_TURN_IS = {"left": ("facing left", "turned to the left", "looking to the left"),
            "frontal": ("facing the camera", "facing forward", "in a frontal pose"),
            "right": ("facing right", "turned to the right", "looking to the right")}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _join(items: list[str], rng: np.random.Generator) -> str:
    """'a', 'a and b', 'a, b and c' (or 'a, b, and c')."""
    if len(items) == 1:
        return items[0]
    conj = _pick(rng, (" and ", ", and ")) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + conj + items[-1]


# ---------------------------------------------------------------------------------------------
# Captions


def _fragments(a: dict[str, str], names: list[str],
               rng: np.random.Generator) -> list[tuple[str, str]]:
    """(kind, text) caption fragments for the attributes in `names`.

    kind: "has" (noun phrase after has/with), "absent" ("no <thing>"), "wears" (noun phrase
    after wears), "is" (predicate after is), "own" (a full sentence about the attribute, with
    {Poss} for the possessive subject and {obj} for the object pronoun).
    """
    out: list[tuple[str, str]] = []
    names = list(names)
    if "hair_color" in names and "hair_style" in names and rng.random() < 0.7:
        names.remove("hair_color")
        names.remove("hair_style")
        c, s = a["hair_color"], a["hair_style"]
        if s == "bob":
            out.append(("has", _pick(rng, (f"{c} hair cut in a bob", _a(f"{c} bob")))))
        elif s == "braided":
            out.append(("has", _pick(rng, (f"{c} braided hair", f"{c} hair in braids"))))
        else:
            out.append(("has", f"{s} {c} hair" if rng.random() < 0.75 else f"{c} {s} hair"))
    for name in names:
        v = a[name]
        if name == "hair_color":
            out.append(_pick(rng, (("has", f"{v} hair"), ("own", f"{{Poss}} hair is {v}."))))
        elif name == "hair_style":
            out.append(("has", _pick(rng, {"short": ("short hair",), "long": ("long hair",),
                                           "curly": ("curly hair",), "bob": ("a bob haircut",),
                                           "braided": ("braids", "braided hair")}[v])))
        elif name == "eye_color":
            out.append(_pick(rng, (("has", f"{v} eyes"), ("own", f"{{Poss}} eyes are {v}."))))
        elif name == "eyebrows":
            out.append(("has", f"{v} {_pick(rng, ('eyebrows', 'brows'))}"))
        elif name == "glasses":
            out.append(("absent", "no glasses") if v == "none" else
                       _pick(rng, (("wears", f"{v} glasses"),
                                   ("wears", f"a pair of {v} glasses"))))
        elif name == "beard":
            out.append(("absent", "no beard") if v == "none" else ("has", _BEARD_NP[v]))
        elif name == "moustache":
            out.append(("absent", "no moustache") if v == "none" else
                       ("has", f"{_a(v)} moustache"))
        elif name == "expression":
            if v == "smiling":
                out.append(_pick(rng, (("is", "smiling"), ("has", "a warm smile"))))
            elif v == "frowning":
                out.append(_pick(rng, (("is", "frowning"), ("has", "a frown"))))
            else:
                out.append(("is", _EXPRESSION_IS[v]))
        elif name == "skin_tone":
            out.append(_pick(rng, (("has", f"{v} skin"), ("has", f"{_a(v)} complexion"),
                                   ("own", f"{{Poss}} skin is {v}."))))
        elif name == "face_shape":
            out.append(("has", f"{_a(v)} face"))
        elif name == "nose":
            out.append(("has", f"{_a(v)} nose"))
        elif name == "earrings":
            out.append(("absent", "no earrings") if v == "none" else
                       ("wears", _pick(rng, (_EARRINGS_NP[v], f"gold {_EARRINGS_NP[v]}"))))
        elif name == "hat":
            out.append(("absent", "no hat") if v == "none" else ("wears", _a(v)))
        elif name == "lipstick":
            out.append(("absent", "no lipstick") if v == "none" else ("wears", f"{v} lipstick"))
        elif name == "freckles":
            out.append(("absent", "no freckles") if v == "none" else
                       ("has", _pick(rng, ("freckles", "freckles on the cheeks",
                                           "freckled cheeks"))))
        elif name == "background":
            out.append(_pick(rng, (("is", f"shown against {_a(v)} background"),
                                   ("own", f"The background is {v}."),
                                   ("own", f"Behind {{obj}} is a plain {v} background."))))
        elif name == "shirt_color":
            out.append(_pick(rng, (("wears", f"{_a(v)} shirt"),
                                   ("own", f"{{Poss}} shirt is {v}."))))
        elif name == "head_turn":
            out.append(("is", _pick(rng, _TURN_IS[v])))
    return out


_SUBJECTS = (  # (subject, possessive, object, verb forms: has, is, wears)
    ("The person", "The person's", "the person", "has", "is", "wears"),
    ("This person", "This person's", "this person", "has", "is", "wears"),
    ("The individual", "Their", "them", "has", "is", "wears"),
    ("They", "Their", "them", "have", "are", "wear"),
    ("The subject", "The subject's", "the subject", "has", "is", "wears"),
)

_SENTENCES: dict[str, tuple[str, ...]] = {
    "has": ("{subj} {has} {body}.", "{subj} {is_} shown with {body}.", "The portrait shows {body}.",
            "Visible features include {body}.", "One can see {body}.",
            "In this image, {subj_l} {has} {body}."),
    "absent": ("{subj} {has} {body}.", "{subj} {is_} shown with {body}.",
               "{subj} {is_} pictured with {body}."),
    "wears": ("{subj} {wears} {body}.", "{subj} {is_} wearing {body}.", "{subj} {has} on {body}.",
              "{subj} {is_} seen wearing {body}."),
    "is": ("{subj} {is_} {body}.", "In the picture, {subj_l} {is_} {body}."),
}

_OPENINGS = (
    "A portrait of a person.",
    "A stylized portrait of a face.",
    "An illustrated headshot.",
    "A cartoon-style face portrait.",
    "A close-up drawing of a person.",
    "",
)


def make_caption(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A dense caption that states a random subset (about 85%) of the attributes truthfully."""
    a = attributes
    names = [n for n in ATTRIBUTES if rng.random() < CAPTION_MENTION_P]
    order = rng.permutation(len(names))
    frags = _fragments(a, [names[i] for i in order], rng)
    rng.shuffle(frags)  # type: ignore[arg-type]
    groups: dict[str, list[str]] = {"has": [], "absent": [], "wears": [], "is": [], "own": []}
    for kind, text in frags:
        groups[kind].append(text)

    sentences: list[str] = []
    opening = _pick(rng, _OPENINGS)
    # Chunk each kind into sentences of 1-4 fragments, then shuffle the sentences.
    chunks: list[tuple[str, list[str]]] = []
    for kind in ("has", "absent", "wears", "is"):
        items = groups[kind]
        while items:
            k = int(rng.integers(1, 5))
            chunks.append((kind, items[:k]))
            items = items[k:]
    for text in groups["own"]:
        chunks.append(("own", [text]))
    rng.shuffle(chunks)  # type: ignore[arg-type]
    # Each kind cycles through its templates in a random order, so a caption rarely repeats one.
    order = {kind: [int(k) for k in rng.permutation(len(t))] for kind, t in _SENTENCES.items()}
    used = {kind: 0 for kind in _SENTENCES}
    for kind, items in chunks:
        subj, poss, obj, has, is_, wears = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
        body = _join(items, rng)
        if kind == "own":
            sentences.append(body.replace("{Poss}", poss).replace("{obj}", obj))
            continue
        template = _SENTENCES[kind][order[kind][used[kind] % len(order[kind])]]
        used[kind] += 1
        subj_l = subj if subj == "They" else subj[0].lower() + subj[1:]
        if subj_l == "They":
            subj_l = "they"
        sentences.append(template.format(subj=subj, subj_l=subj_l, has=has, is_=is_,
                                         wears=wears, body=body))
    text = " ".join(([opening] if opening else []) + sentences)
    return text


# ---------------------------------------------------------------------------------------------
# Question answering


def _present(a: dict[str, str], name: str) -> bool:
    return a[name] != "none"


# The yes/no question about value v of an attribute; presence attributes (second table) ask
# about "none" with `PRESENCE_ITEMS`' noun instead, and freckles only that way.
_VALUE_QUESTIONS: dict[str, Callable[[str], str]] = {
    "hair_color": lambda v: f"Does the person have {v} hair?",
    "hair_style": lambda v: f"Does the person have {_HAIR_STYLE_NP[v]}?",
    "eye_color": lambda v: f"Are the person's eyes {v}?",
    "eyebrows": lambda v: f"Does the person have {v} eyebrows?",
    "expression": lambda v: ("Does the person have a neutral expression?" if v == "neutral"
                             else f"Is the person {v}?"),
    "skin_tone": lambda v: f"Does the person have {v} skin?",
    "face_shape": lambda v: f"Does the person have {_a(v)} face?",
    "nose": lambda v: f"Does the person have {_a(v)} nose?",
    "background": lambda v: f"Is the background {v}?",
    "shirt_color": lambda v: f"Is the person wearing {_a(v)} shirt?",
    "head_turn": lambda v: ("Is the person facing the camera?" if v == "frontal"
                            else f"Is the person's head turned to the {v}?"),
}
_PRESENT_VALUE_QUESTIONS: dict[str, Callable[[str], str]] = {
    "glasses": lambda v: f"Is the person wearing {v} glasses?",
    "beard": lambda v: f"Does the person have {_BEARD_NP[v]}?",
    "moustache": lambda v: f"Does the person have {_a(v)} moustache?",
    "earrings": lambda v: f"Is the person wearing {_EARRINGS_NP[v]}?",
    "hat": lambda v: f"Is the person wearing {_a(v)}?",
    "lipstick": lambda v: f"Is the person wearing {v} lipstick?",
}


def _yes_no_candidates(a: dict[str, str], name: str) -> list[tuple[str, str]]:
    """All yes/no questions about attribute `name`, with their true answers."""
    qs: list[tuple[str, bool]] = []
    values = ATTRIBUTES[name]
    for v in values:
        if name in _VALUE_QUESTIONS:
            q = _VALUE_QUESTIONS[name](v)
        elif v == "none":
            noun = PRESENCE_ITEMS[name][0]
            worn = name in ("glasses", "earrings", "hat", "lipstick")
            q = f"Is the person wearing {noun}?" if worn else f"Does the person have {noun}?"
            qs.append((q, _present(a, name)))
            continue
        elif name == "freckles":
            continue  # covered by the presence question
        else:  # KeyError for an attribute no table handles
            q = _PRESENT_VALUE_QUESTIONS[name](v)
        qs.append((q, a[name] == v))
    return [(q, "yes" if truth else "no") for q, truth in qs]


def _which_value(a: dict[str, str], name: str, rng: np.random.Generator) -> tuple[str, str] | None:
    v = a[name]
    others = [w for w in ATTRIBUTES[name] if w not in (v, "none")]
    if v == "none" or not others:
        return None
    w = _pick(rng, others)
    x, y = (v, w) if rng.random() < 0.5 else (w, v)
    if name == "hair_color":
        q = f"Is the person's hair {x} or {y}?"
    elif name == "hair_style":
        q = f"Is the person's hairstyle {x} or {y}?"
    elif name == "eye_color":
        q = f"Are the person's eyes {x} or {y}?"
    elif name == "eyebrows":
        q = f"Are the person's eyebrows {x} or {y}?"
    elif name == "expression":
        q = f"Is the person's expression {x} or {y}?"
    elif name == "skin_tone":
        q = f"Is the person's skin tone {x} or {y}?"
    elif name == "face_shape":
        q = f"Is the person's face {x} or {y}?"
    elif name == "nose":
        q = f"Is the person's nose {x} or {y}?"
    elif name == "background":
        q = f"Is the background {x} or {y}?"
    elif name == "shirt_color":
        q = f"Is the person's shirt {x} or {y}?"
    elif name == "head_turn":
        q = f"Is the person's pose {x} or {y}?"
    elif name == "glasses":
        q = f"Are the person's glasses {x} or {y}?"
    elif name == "beard":
        q = f"Is the person's beard {x} or {y}?"
    elif name == "moustache":
        q = f"Is the person's moustache {x} or {y}?"
    elif name == "earrings":
        q = f"Is the person wearing {x} or {y}?"
    elif name == "hat":
        q = f"Is the person wearing {_a(x)} or {_a(y)}?"
    elif name == "lipstick":
        q = f"Is the person's lipstick {x} or {y}?"
    else:
        return None
    return q, v


def _joined(names) -> str:
    return "+".join(n for n in ATTRIBUTES if n in names)


def make_qa(attributes: dict[str, str], rng: np.random.Generator) -> list[dict]:
    """About 8 QA pairs: 2-4 attribute, 2 yes_no (one yes, one no), 1 count, 1-3 which.

    Returns a list of {"question", "answer", "type", "attribute"} dicts (see module docstring).
    """
    a = attributes
    qa: list[dict] = []

    def add(q: str, ans: str, kind: str, attr: str) -> None:
        if any(item["question"] == q for item in qa):
            return
        qa.append({"question": q, "answer": ans, "type": kind, "attribute": attr})

    names = list(ATTRIBUTE_QUESTIONS)
    for i in rng.choice(len(names), size=int(rng.integers(2, 5)), replace=False):
        name = names[int(i)]
        add(_pick(rng, ATTRIBUTE_QUESTIONS[name]), a[name], "attribute", name)

    attr_names = list(ATTRIBUTES)
    answers = ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"]
    for want in answers:
        for _ in range(100):
            name = attr_names[int(rng.integers(len(attr_names)))]
            cands = [c for c in _yes_no_candidates(a, name) if c[1] == want]
            if cands:
                q, ans = _pick(rng, cands)
                add(q, ans, "yes_no", name)
                break

    form = int(rng.integers(3))
    if form == 0:
        listing = "glasses, earrings, a hat"
        n = sum(_present(a, k) for k in ACCESSORIES)
        add(f"How many of these accessories is the person wearing: {listing}?", NUMBER_WORDS[n],
            "count", _joined(ACCESSORIES))
    elif form == 1:
        n = sum(_present(a, k) for k in FACIAL_HAIR)
        add("How many kinds of facial hair does the person have, counting a beard and a "
            "moustache?", NUMBER_WORDS[n], "count", _joined(FACIAL_HAIR))
    else:
        items = list(PRESENCE_ITEMS)
        chosen = [items[int(i)] for i in rng.choice(len(items), size=int(rng.integers(2, 5)),
                                                    replace=False)]
        n = sum(_present(a, k) for k in chosen)
        listing = _join([PRESENCE_ITEMS[k][0] for k in chosen], rng).replace(", and ", ", ")
        listing = listing.replace(" and ", ", ")
        add(f"How many of the following does the person have: {listing}?", NUMBER_WORDS[n],
            "count", _joined(chosen))

    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.3:
            present = [k for k in PRESENCE_ITEMS if _present(a, k)]
            absent = [k for k in PRESENCE_ITEMS if not _present(a, k)]
            if present and absent:
                p, q_ = _pick(rng, present), _pick(rng, absent)
                x, y = (p, q_) if rng.random() < 0.5 else (q_, p)
                add(f"Which of these does the person have: {PRESENCE_ITEMS[x][0]} or "
                    f"{PRESENCE_ITEMS[y][0]}?", PRESENCE_ITEMS[p][1], "which", _joined((p, q_)))
                continue
        for _ in range(100):
            name = attr_names[int(rng.integers(len(attr_names)))]
            if any(item["type"] == "which" and item["attribute"] == name for item in qa):
                continue
            got = _which_value(a, name, rng)
            if got is not None:
                add(got[0], got[1], "which", name)
                break
    return qa
