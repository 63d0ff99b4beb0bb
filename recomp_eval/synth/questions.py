"""Questions about SynthVQA scenes: open questions, POPE-style yes/no and MME-style pairs.

Every question is answerable from ``Scene.objects`` alone and names its referent by a description
that is unique in the scene (``"the small triangle"`` only when exactly one small triangle
exists). Each question is tagged with its ``family`` and the ``size`` of the object it asks
about, so results can be sliced; ``near_large`` marks small objects that sit next to a large,
salient one (within :data:`NEAR_PX`), the case text-guided token recovery is meant for.

Answers are lower case single words (GQA style); ``variants`` lists other answers a human would
plausibly give (``"grey"`` for ``"gray"``, ``"two"`` for ``"2"``), used to fill VQAv2's ten
answers. All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np

from recomp_eval.synth.scenes import CHARACTERS, COLOURS, IMAGE_SIZE, SHAPES, Scene, SynthObject

NEAR_PX = 16  # a small object is "next to" a large one when their boxes are this close (2 patches)
CENTRE_BAND_PX = 16  # objects whose centre is this close to the image midline have no side
FAMILIES = ("colour", "shape", "size", "exist", "count", "position", "relation", "ocr", "ocr_ref")
MME_CATEGORIES = ("existence", "count", "position", "color", "OCR")
MME_SUFFIX = " Please answer yes or no."
Strategy = Literal["random", "popular", "adversarial"]

PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_VARIANTS = {
    "gray": ("grey",),
    "purple": ("violet",),
    "cross": ("plus",),
    "circle": ("round",),
    "square": ("rectangle",),
    "small": ("little",),
    "large": ("big",),
}


@dataclass(frozen=True)
class SynthQuestion:
    """One question with its answer and slicing tags.

    Attributes:
        question: the question text (MME questions end with ``MME_SUFFIX``).
        answer: canonical lower-case answer ("yes"/"no" for yes/no questions).
        family: one of :data:`FAMILIES`.
        size: size of the object asked about: ``small``, ``large`` or ``none`` (counts, absent
            objects).
        target: full description of that object (``"small red triangle"``), or None.
        variants: other plausible answers (never containing ``answer``).
        near_large: the target is a small object next to a large one.
    """

    question: str
    answer: str
    family: str
    size: str
    target: str | None
    variants: tuple[str, ...] = ()
    near_large: bool = False


# --- geometry and descriptions ------------------------------------------------------------------


def box_gap(a: SynthObject, b: SynthObject) -> int:
    """Gap in pixels between two boxes (0 when they touch or overlap), Chebyshev style."""
    dx = max(a.box[0] - b.box[2], b.box[0] - a.box[2], 0)
    dy = max(a.box[1] - b.box[3], b.box[1] - a.box[3], 0)
    return max(dx, dy)


def is_near_large(obj: SynthObject, objects: Sequence[SynthObject]) -> bool:
    """``obj`` is small and lies within :data:`NEAR_PX` of a large object."""
    return obj.size == "small" and any(
        o.size == "large" and box_gap(obj, o) <= NEAR_PX for o in objects
    )


def side_of(obj: SynthObject) -> tuple[str | None, str | None]:
    """``(left|right|None, top|bottom|None)`` of the centre; None inside the midline band."""
    cx, cy = obj.centre
    mid = IMAGE_SIZE / 2

    def pick(v: float, lo: str, hi: str) -> str | None:
        if v < mid - CENTRE_BAND_PX:
            return lo
        return hi if v > mid + CENTRE_BAND_PX else None

    return pick(cx, "left", "right"), pick(cy, "top", "bottom")


def relation_of(a: SynthObject, b: SynthObject) -> tuple[str, str] | None:
    """``a`` relative to ``b``: ``("left"|"right", axis)`` or ``("above"|"below", axis)`` when the
    boxes are separated along that axis (left/right preferred), else None."""
    if a.box[2] <= b.box[0]:
        return "left", "x"
    if a.box[0] >= b.box[2]:
        return "right", "x"
    if a.box[3] <= b.box[1]:
        return "above", "y"
    if a.box[1] >= b.box[3]:
        return "below", "y"
    return None


_DESC_ORDER = (("shape",), ("size", "shape"), ("colour",), ("size", "colour"), ("colour", "shape"))


def _words(obj: SynthObject, attrs: Sequence[str]) -> str:
    return " ".join(getattr(obj, a) for a in ("size", "colour", "shape") if a in attrs)


def describe_unique(
    obj: SynthObject, objects: Sequence[SynthObject], exclude: str | None = None
) -> str | None:
    """Shortest noun phrase naming ``obj`` uniquely without attribute ``exclude``.

    ``"triangle"``, ``"small triangle"``, ``"red object"``, ``"small red object"`` or
    ``"red triangle"`` (always unique: colour-shape pairs are unique per scene); None if none is.
    """
    for attrs in _DESC_ORDER:
        if exclude in attrs:
            continue
        key = [getattr(obj, a) for a in attrs]
        if sum([getattr(o, a) for a in attrs] == key for o in objects) == 1:
            words = _words(obj, attrs)
            return words if "shape" in attrs else f"{words} object"
    return None


def _number_variants(n: int) -> tuple[str, ...]:
    return (NUMBER_WORDS[n],) if 0 <= n < len(NUMBER_WORDS) else ()


def _char_kind(char: str) -> str:
    return "number" if char.isdigit() else "letter"


def _char_variants(char: str) -> tuple[str, ...]:
    out = (char.upper(),) if char.isalpha() else _number_variants(int(char))
    return tuple(v for v in out if v != char.lower())


def _q(question, answer, family, obj=None, objects=(), variants=None) -> SynthQuestion:
    variants = _VARIANTS.get(answer, ()) if variants is None else variants
    return SynthQuestion(
        question=question,
        answer=answer,
        family=family,
        size=obj.size if obj is not None else "none",
        target=obj.describe() if obj is not None else None,
        variants=tuple(v for v in variants if v != answer),
        near_large=obj is not None and is_near_large(obj, objects),
    )


def absent_pairs(scene: Scene) -> list[tuple[str, str]]:
    """(colour, shape) pairs not in the scene, in canonical order."""
    present = {(o.colour, o.shape) for o in scene.objects}
    return [p for p in product(COLOURS, SHAPES) if p not in present]


# --- open questions -----------------------------------------------------------------------------


def _attribute_questions(obj: SynthObject, objs: Sequence[SynthObject]) -> list[SynthQuestion]:
    out = []
    desc = describe_unique(obj, objs, exclude="colour")
    if desc is not None:
        out.append(_q(f"What color is the {desc}?", obj.colour, "colour", obj, objs))
    desc = describe_unique(obj, objs, exclude="shape")
    if desc is not None:
        out.append(_q(f"What shape is the {desc}?", obj.shape, "shape", obj, objs))
    name = f"{obj.colour} {obj.shape}"
    out.append(_q(f"Is the {name} small or large?", obj.size, "size", obj, objs))
    horizontal, vertical = side_of(obj)
    if horizontal is not None:
        q = f"Is the {name} on the left or right side of the image?"
        out.append(_q(q, horizontal, "position", obj, objs))
    if vertical is not None:
        q = f"Is the {name} at the top or bottom of the image?"
        out.append(_q(q, vertical, "position", obj, objs))
    return out


def _relation_questions(small: SynthObject, large: SynthObject, objs) -> list[SynthQuestion]:
    """Questions about a small object next to a large one, named through the large one."""
    anchor = f"{large.colour} {large.shape}"
    neighbours = [o for o in objs if o.size == "small" and box_gap(o, large) <= NEAR_PX]
    out = []
    if sum(o.shape == small.shape for o in neighbours) == 1:
        q = f"What color is the small {small.shape} next to the large {anchor}?"
        out.append(_q(q, small.colour, "relation", small, objs))
    if sum(o.colour == small.colour for o in neighbours) == 1:
        q = f"What shape is the small {small.colour} object next to the large {anchor}?"
        out.append(_q(q, small.shape, "relation", small, objs))
    rel = relation_of(small, large)
    if rel is not None:
        choices = "to the left or to the right of" if rel[1] == "x" else "above or below"
        q = f"Is the {small.colour} {small.shape} {choices} the {anchor}?"
        out.append(_q(q, rel[0], "relation", small, objs))
    return out


def _ocr_questions(obj: SynthObject, objs: Sequence[SynthObject]) -> list[SynthQuestion]:
    char = obj.char or ""
    kind = _char_kind(char)
    desc = describe_unique(obj, objs) or f"{obj.colour} {obj.shape}"
    out = [
        _q(
            f"What {kind} is written on the {desc}?",
            char.lower(),
            "ocr",
            obj,
            objs,
            _char_variants(char),
        )
    ]
    if sum(o.char == char for o in objs) == 1:
        ref = f"the {kind} {char}"
        out.append(_q(f"What color is the shape with {ref} on it?", obj.colour, "ocr_ref", obj))
        out.append(_q(f"What shape has {ref} on it?", obj.shape, "ocr_ref", obj))
    return out


def _count_questions(scene: Scene, rng: np.random.Generator) -> list[SynthQuestion]:
    objs = scene.objects
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    counts = [
        (f"How many {PLURAL[shape]} are there?", sum(o.shape == shape for o in objs)),
        (f"How many {colour} objects are there?", sum(o.colour == colour for o in objs)),
        ("How many small objects are there?", sum(o.size == "small" for o in objs)),
    ]
    return [_q(q, str(n), "count", variants=_number_variants(n)) for q, n in counts]


def _exist_pair(scene: Scene, rng: np.random.Generator) -> list[SynthQuestion]:
    objs = scene.objects
    obj = objs[int(rng.integers(len(objs)))]
    colour, shape = absent_pairs(scene)[int(rng.integers(len(absent_pairs(scene))))]
    return [
        _q(f"Is there a {obj.colour} {obj.shape} in the image?", "yes", "exist", obj, objs),
        _q(f"Is there a {colour} {shape} in the image?", "no", "exist"),
    ]


def questions_for_scene(scene: Scene, rng: np.random.Generator) -> list[SynthQuestion]:
    """All open questions of every family about ``scene`` (order fixed by the scene and ``rng``).

    Per object: colour, shape, size and position; per small object next to a large one: its
    colour and shape named through the large one, and their relation; per character: reading it
    and finding its object; per scene: three counts and one yes + one no existence question.
    """
    objs = scene.objects
    out: list[SynthQuestion] = []
    for obj in objs:
        out += _attribute_questions(obj, objs)
    for large in (o for o in objs if o.size == "large"):
        for small in (o for o in objs if o.size == "small" and box_gap(o, large) <= NEAR_PX):
            out += _relation_questions(small, large, objs)
    for obj in (o for o in objs if o.char is not None):
        out += _ocr_questions(obj, objs)
    out += _count_questions(scene, rng)
    out += _exist_pair(scene, rng)
    return out


# --- POPE-style yes/no --------------------------------------------------------------------------


def _exist_question(colour: str, shape: str, answer: str, obj=None, objs=()) -> SynthQuestion:
    return _q(f"Is there a {colour} {shape} in the image?", answer, "exist", obj, objs)


def pair_ranking(scenes: Sequence[Scene]) -> list[tuple[str, str]]:
    """All (colour, shape) pairs, most frequent in ``scenes`` first (ties in canonical order)."""
    pairs = list(product(COLOURS, SHAPES))
    counts = {p: 0 for p in pairs}
    for scene in scenes:
        for o in scene.objects:
            counts[(o.colour, o.shape)] += 1
    return sorted(pairs, key=lambda p: -counts[p])  # stable: canonical order breaks ties


def _negatives(
    scene: Scene,
    rng: np.random.Generator,
    strategy: Strategy,
    k: int,
    ranking: Sequence[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    absent = absent_pairs(scene)
    if strategy == "random":
        return [absent[i] for i in rng.permutation(len(absent))[:k]]
    if strategy == "popular":
        order = list(ranking) if ranking is not None else list(product(COLOURS, SHAPES))
        return [p for p in order if p in absent][:k]
    if strategy == "adversarial":
        # Absent pairs sharing a colour or a shape with the most present objects first.
        shuffled = [absent[i] for i in rng.permutation(len(absent))]
        shared = {
            p: sum(o.colour == p[0] or o.shape == p[1] for o in scene.objects) for p in absent
        }
        return sorted(shuffled, key=lambda p: -shared[p])[:k]  # stable: random tie-break
    raise ValueError(f"unknown strategy {strategy!r}; use random, popular or adversarial")


def yes_no_questions(
    scene: Scene,
    rng: np.random.Generator,
    strategy: Strategy,
    n: int = 6,
    ranking: Sequence[tuple[str, str]] | None = None,
) -> list[SynthQuestion]:
    """POPE-style existence questions, exactly half "yes" and half "no", alternating yes/no.

    Positives are distinct objects of the scene (random); negatives are absent (colour, shape)
    pairs chosen by ``strategy``: ``random`` (uniform), ``popular`` (most frequent pairs first,
    from ``ranking``, e.g. :func:`pair_ranking` over the benchmark's scenes; canonical order if
    None) or ``adversarial`` (pairs sharing a colour or shape with the most present objects).
    Returns ``2 * min(n // 2, #objects, #absent pairs)`` questions.
    """
    objs = scene.objects
    half = min(n // 2, len(objs), len(absent_pairs(scene)))
    positives = [objs[i] for i in rng.permutation(len(objs))[:half]]
    negatives = _negatives(scene, rng, strategy, half, ranking)
    out: list[SynthQuestion] = []
    for obj, (colour, shape) in zip(positives, negatives, strict=True):
        out.append(_exist_question(obj.colour, obj.shape, "yes", obj, objs))
        out.append(_exist_question(colour, shape, "no"))
    return out


# --- MME-style pairs ----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _mme(question: str, answer: str, family: str, obj=None, objs=()) -> SynthQuestion:
    return _q(question + MME_SUFFIX, answer, family, obj, objs, variants=())


def mme_pairs(
    scene: Scene, rng: np.random.Generator
) -> dict[str, tuple[SynthQuestion, SynthQuestion]]:
    """One (yes, no) question pair per MME category the scene supports.

    ``existence`` (present vs absent pair), ``count`` (true vs off-by-one count of a shape),
    ``position`` (left/right or above/below of two objects, small-next-to-large preferred),
    ``color`` (true vs another colour of a uniquely described object) and ``OCR`` (true vs
    another character of the same kind; only when a character is drawn). Both questions of a
    pair ask about the same object, the "no" one with one detail changed.
    """
    objs = scene.objects
    out: dict[str, tuple[SynthQuestion, SynthQuestion]] = {}

    obj = _pick(rng, objs)
    colour, shape = _pick(rng, absent_pairs(scene))
    out["existence"] = (
        _mme(f"Is there a {obj.colour} {obj.shape} in this image?", "yes", "exist", obj, objs),
        _mme(f"Is there a {colour} {shape} in this image?", "no", "exist"),
    )

    shape = _pick(rng, SHAPES)
    n = sum(o.shape == shape for o in objs)
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    stem = f"Is the number of {PLURAL[shape]} in this image"
    out["count"] = (_mme(f"{stem} {n}?", "yes", "count"), _mme(f"{stem} {wrong}?", "no", "count"))

    pairs = [(a, b) for a in objs for b in objs if a is not b and relation_of(a, b) is not None]
    near = [(a, b) for a, b in pairs if is_near_large(a, [b]) and b.size == "large"]
    if pairs:
        a, b = _pick(rng, near or pairs)
        rel, _axis = relation_of(a, b)  # type: ignore[misc]
        opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
        prep = {"left": "to the left of", "right": "to the right of"}
        stem = f"Is the {a.colour} {a.shape}"
        tail = f"the {b.colour} {b.shape} in this image?"
        out["position"] = (
            _mme(f"{stem} {prep.get(rel, rel)} {tail}", "yes", "relation", a, objs),
            _mme(f"{stem} {prep.get(opposite, opposite)} {tail}", "no", "relation", a, objs),
        )

    named = [(o, d) for o in objs if (d := describe_unique(o, objs, exclude="colour"))]
    if named:
        obj, desc = _pick(rng, named)
        other = _pick(rng, [c for c in COLOURS if c != obj.colour])
        out["color"] = (
            _mme(f"Is the {desc} {obj.colour}?", "yes", "colour", obj, objs),
            _mme(f"Is the {desc} {other}?", "no", "colour", obj, objs),
        )

    texts = [o for o in objs if o.char is not None]
    if texts:
        obj = _pick(rng, texts)
        char = obj.char or ""
        same_kind = [c for c in CHARACTERS if c.isdigit() == char.isdigit() and c != char]
        other = _pick(rng, same_kind)
        stem = f"Is the {_char_kind(char)} on the {obj.colour} {obj.shape}"
        out["OCR"] = (
            _mme(f'{stem} "{char}"?', "yes", "ocr", obj, objs),
            _mme(f'{stem} "{other}"?', "no", "ocr", obj, objs),
        )
    return out
