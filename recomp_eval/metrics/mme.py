"""MME scores: per-category acc + acc+, perception (10 categories) and cognition (4).

Both the MME toolkit (``calculation.py``, used by LLaVA-1.5) and lmms-eval 0.7.3 score a category
as the mean over images of ``100 * (#correct / 2) + 100 * [both correct]``; they differ only in the
answer parser (:func:`~recomp_eval.metrics.normalize.parse_mme_tool` vs
:func:`~recomp_eval.metrics.normalize.parse_mme_lmms_eval`). Perception and cognition are reported
separately, never only their sum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from recomp_eval.metrics.normalize import parse_mme_lmms_eval, parse_mme_tool

PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
QUESTIONS_PER_IMAGE = 2
PERCENT = 100.0

MmeParser = Literal["lmms_eval", "mme_tool"]
_PARSERS = {"lmms_eval": parse_mme_lmms_eval, "mme_tool": parse_mme_tool}


def mme_correct(prediction: str, answer: str, parser: MmeParser = "lmms_eval") -> float:
    """1.0 when the parsed prediction equals the gold ``Yes``/``No`` answer, else 0.0."""
    gold = answer.lower().strip().replace(".", "")
    if gold not in ("yes", "no"):
        raise ValueError(f"MME answers must be yes/no, got {answer!r}")
    return float(_PARSERS[parser](prediction) == gold)


def mme_scores(
    rows: Iterable[Mapping[str, Any]], parser: MmeParser = "lmms_eval"
) -> dict[str, float]:
    """Aggregate MME rows.

    Args:
        rows: mappings with ``category``, ``image_id`` (the image file; two questions share it),
            ``prediction`` and ``answer``.
        parser: ``lmms_eval`` or ``mme_tool``.

    Returns:
        ``{category}/acc``, ``{category}/acc_plus`` and ``{category}`` (their sum, 0..200) for
        each category present, ``perception`` and ``cognition`` (sums over the categories
        present), ``other_rate`` (share of answers parsed as neither yes nor no) and
        ``unpaired_images`` (images without exactly two questions, e.g. after a ``limit`` or a
        skipped bad record; they are scored over the questions they have).
    """
    per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    n_rows = n_other = 0
    for row in rows:
        category = row["category"]
        if category not in PERCEPTION and category not in COGNITION:
            raise ValueError(f"unknown MME category {category!r}")
        per_image[category][str(row["image_id"])].append(
            mme_correct(row["prediction"], row["answer"], parser)
        )
        n_rows += 1
        n_other += _PARSERS[parser](row["prediction"]) == "other"

    out: dict[str, float] = {}
    unpaired = 0
    for category, images in per_image.items():
        acc = [sum(s) / len(s) * PERCENT for s in images.values()]
        acc_plus = [float(all(s)) * PERCENT for s in images.values()]
        unpaired += sum(len(s) != QUESTIONS_PER_IMAGE for s in images.values())
        out[f"{category}/acc"] = sum(acc) / len(acc)
        out[f"{category}/acc_plus"] = sum(acc_plus) / len(acc_plus)
        out[category] = out[f"{category}/acc"] + out[f"{category}/acc_plus"]
    out["perception"] = sum(out.get(c, 0.0) for c in PERCEPTION)
    out["cognition"] = sum(out.get(c, 0.0) for c in COGNITION)
    out["other_rate"] = n_other / n_rows if n_rows else 0.0
    out["unpaired_images"] = float(unpaired)
    return out
