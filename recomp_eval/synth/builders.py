"""Rows of the five synthetic benchmarks in their hub schemas, plus one tag row per sample.

Each builder takes ``[(scene_index, scene, rng)]`` and a PNG encoder and returns ``(rows, tags,
images)``: ``rows`` in the benchmark's hub schema (``schemas.hub_features``), ``tags`` keyed by
the ``sample_id`` the real loader will build from that row, ``images`` (GQA only) the image
table. Open questions are picked per image with the least-used family first (weighted), so each
benchmark mixes families evenly and about a third of its questions concern small objects next to
a large one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from recomp_eval.metrics.normalize import evalai_normalize
from recomp_eval.synth.questions import (
    MME_CATEGORIES,
    SynthQuestion,
    mme_pairs,
    pair_ranking,
    questions_for_scene,
    yes_no_questions,
)
from recomp_eval.synth.scenes import IMAGE_SIZE, Scene
from recomp_eval.synth.schemas import POPE_CATEGORIES

Item = tuple[int, Scene, np.random.Generator]
Png = Callable[[Any], dict[str, Any]]

VQA_ANSWERS = 10  # annotators per VQAv2 / TextVQA question
VARIANT_SLOTS = 3  # of the ten answers, at most this many are variants (the canonical keeps 7)
QID_STRIDE = 1000  # VQAv2 question_id = image_id * 1000 + k, as in the real data
TEXTVQA_QID_STRIDE = 10
PER_IMAGE = {"gqa": 3, "vqav2": 3, "textvqa": 3}
POPE_PER_IMAGE = 2  # questions per image and POPE split: one yes, one no
# Family weights per benchmark (a family with weight 2 is picked twice as often).
FAMILY_WEIGHTS: dict[str, dict[str, float]] = {
    "gqa": {"colour": 3, "shape": 3, "relation": 2, "size": 1, "position": 1, "exist": 1},
    "vqav2": {
        "colour": 2, "shape": 2, "count": 2, "exist": 2, "relation": 1, "size": 1, "position": 1,
    },
    "textvqa": {"ocr": 2, "ocr_ref": 1},
}  # fmt: skip
GQA_TYPES = {  # family -> (structural, semantic) in GQA's vocabulary
    "colour": ("query", "attr"), "shape": ("query", "attr"), "size": ("choose", "attr"),
    "position": ("choose", "rel"), "relation": ("query", "rel"), "exist": ("verify", "obj"),
    "count": ("query", "obj"),
}  # fmt: skip


def ten_answers(q: SynthQuestion) -> list[str]:
    """Ten annotator answers: the canonical one at least 7 times, then variants in turn."""
    n_var = VARIANT_SLOTS if q.variants else 0
    return [q.answer] * (VQA_ANSWERS - n_var) + [
        q.variants[k % len(q.variants)] for k in range(n_var)
    ]


def scorable(q: SynthQuestion) -> bool:
    """The answer survives EvalAI normalisation (the letter "a" is dropped as an article)."""
    return bool(evalai_normalize(q.answer))


def pick_balanced(
    questions: Sequence[SynthQuestion],
    k: int,
    used: Counter,
    weights: Mapping[str, float],
    rng: np.random.Generator,
) -> list[SynthQuestion]:
    """Up to ``k`` questions, least used family (per weight) first, distinct families first and
    repeats only when the scene offers fewer than ``k`` families; updates ``used``. Ties are
    broken at random."""
    pool = [q for q in questions if q.family in weights]
    order = rng.permutation(len(pool))
    ranked = sorted(order, key=lambda i: used[pool[i].family] / weights[pool[i].family])
    first = {pool[i].family: i for i in reversed(ranked)}  # best-ranked question per family
    chosen = [i for i in ranked if first[pool[i].family] == i][:k]
    chosen += [i for i in ranked if i not in chosen][: k - len(chosen)]
    out = [pool[i] for i in chosen]
    used.update(q.family for q in out)
    return out


def tag(sample_id: str, scene: Scene, q: SynthQuestion) -> dict[str, Any]:
    return {
        "sample_id": sample_id, "scene_id": scene.scene_id, "family": q.family, "size": q.size,
        "near_large": q.near_large, "target": q.target, "question": q.question, "answer": q.answer,
    }  # fmt: skip


def _open_questions(name: str, items: Sequence[Item]):
    used: Counter = Counter()
    for index, scene, rng in items:
        candidates = [q for q in questions_for_scene(scene, rng) if scorable(q)]
        yield (
            index,
            scene,
            pick_balanced(candidates, PER_IMAGE[name], used, FAMILY_WEIGHTS[name], rng),
        )


def build_gqa(items: Sequence[Item], png: Png):
    rows, tags, images = [], [], {}
    for index, scene, picked in _open_questions("gqa", items):
        images[scene.scene_id] = png(scene.image)
        for k, q in enumerate(picked):
            qid = f"{index:06d}{k:02d}"
            structural, semantic = GQA_TYPES[q.family]
            rows.append(
                {
                    "id": qid, "imageId": scene.scene_id, "question": q.question,
                    "answer": q.answer, "fullAnswer": f"The answer is {q.answer}.",
                    "isBalanced": True, "groups": {"global": None, "local": q.family},
                    "entailed": "", "equivalent": "",
                    "types": {"structural": structural, "semantic": semantic, "detailed": q.family},
                    "annotations": {"answer": "", "question": "", "fullAnswer": ""},
                    "semantic": [
                        {"operation": "select", "argument": q.target or "", "dependencies": []},
                        {"operation": f"{structural} {q.family}", "argument": "", "dependencies": [0]},
                    ],
                    "semanticStr": f"select: {q.target or ''}->{structural} {q.family}",
                }
            )  # fmt: skip
            tags.append(tag(qid, scene, q))
    return rows, tags, images


def _vqa_question_type(question: str) -> str:
    words = question.lower().rstrip("?").split()
    for prefix in ("how many", "is there a", "is the"):
        if " ".join(words).startswith(prefix):
            return prefix
    return " ".join(words[:4])


def _vqa_answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def build_vqav2(items: Sequence[Item], png: Png):
    rows, tags = [], []
    for index, scene, picked in _open_questions("vqav2", items):
        cell = png(scene.image)
        for k, q in enumerate(picked):
            qid = index * QID_STRIDE + k
            answers = [
                {"answer": a, "answer_confidence": "yes" if a == q.answer else "maybe", "answer_id": j + 1}
                for j, a in enumerate(ten_answers(q))
            ]  # fmt: skip
            rows.append(
                {
                    "question_type": _vqa_question_type(q.question),
                    "multiple_choice_answer": q.answer, "answers": answers, "image_id": index,
                    "answer_type": _vqa_answer_type(q.answer), "question_id": qid,
                    "question": q.question, "image": cell,
                }
            )  # fmt: skip
            tags.append(tag(str(qid), scene, q))
    return rows, tags, {}


def ocr_tokens(scene: Scene) -> list[str]:
    """The characters drawn in the scene, in reading order (top to bottom, left to right)."""
    texts = [o for o in scene.objects if o.char is not None]
    return [o.char for o in sorted(texts, key=lambda o: (o.centre[1], o.centre[0]))]


def build_textvqa(items: Sequence[Item], png: Png):
    rows, tags = [], []
    for index, scene, picked in _open_questions("textvqa", items):
        cell = png(scene.image)
        for k, q in enumerate(picked):
            qid = index * TEXTVQA_QID_STRIDE + k
            question = q.question[0].lower() + q.question[1:]
            rows.append(
                {
                    "image_id": scene.scene_id, "question_id": qid, "question": question,
                    "question_tokens": question.rstrip("?").split(), "image": cell,
                    "image_width": IMAGE_SIZE, "image_height": IMAGE_SIZE,
                    "flickr_original_url": "", "flickr_300k_url": "", "answers": ten_answers(q),
                    "image_classes": sorted({o.shape for o in scene.objects}),
                    "set_name": "val", "ocr_tokens": ocr_tokens(scene),
                }
            )  # fmt: skip
            tags.append(tag(str(qid), scene, q))
    return rows, tags, {}


def build_pope(items: Sequence[Item], png: Png):
    ranking = pair_ranking([scene for _, scene, _ in items])
    cells = {scene.scene_id: png(scene.image) for _, scene, _ in items}
    rows, tags = [], []
    for category in POPE_CATEGORIES:
        n_in_category = 0
        for _, scene, rng in items:
            for q in yes_no_questions(scene, rng, category, POPE_PER_IMAGE, ranking):
                n_in_category += 1
                qid = str(n_in_category)
                rows.append(
                    {
                        "id": str(len(rows)), "question_id": qid, "question": q.question,
                        "answer": q.answer, "image_source": scene.scene_id,
                        "image": cells[scene.scene_id], "category": category,
                    }
                )  # fmt: skip
                tags.append(tag(f"{category}/{qid}", scene, q))
    return rows, tags, {}


def build_mme(items: Sequence[Item], png: Png):
    """One MME category per image: the least used one the scene supports (MME order on ties)."""
    used: Counter = Counter()
    rows, tags = [], []
    for _, scene, rng in items:
        pairs = mme_pairs(scene, rng)
        category = min(pairs, key=lambda c: (used[c], MME_CATEGORIES.index(c)))
        used[category] += 1
        qid = f"{category}/{scene.scene_id}.png"
        cell = png(scene.image)
        for rank, q in enumerate(pairs[category]):
            rows.append(
                {
                    "question_id": qid, "image": cell, "question": q.question,
                    "answer": q.answer.capitalize(), "category": category,
                }
            )  # fmt: skip
            tags.append(tag(f"{qid}#{rank}", scene, q))
    return rows, tags, {}


def _has_text(scene: Scene) -> bool:
    return any(o.char is not None for o in scene.objects)


BUILDERS = {
    "gqa": build_gqa, "vqav2": build_vqav2, "textvqa": build_textvqa, "pope": build_pope,
    "mme": build_mme,
}  # fmt: skip
ACCEPT: dict[str, Callable[[Scene], bool]] = {"textvqa": _has_text}  # others: every scene
