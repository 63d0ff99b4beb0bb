"""GQA per-question exact match (two variants: lmms-eval 0.7.3 and LLaVA-1.5)."""

from __future__ import annotations

from typing import Literal

from recomp_eval.metrics.normalize import gqa_normalize_llava, gqa_normalize_lmms_eval

GqaVariant = Literal["lmms_eval", "llava"]


def gqa_accuracy(prediction: str, answer: str, variant: GqaVariant = "lmms_eval") -> float:
    """GQA exact match.

    ``lmms_eval``: stripped prediction and gold answer, both lower-cased with all of
    ``string.punctuation`` deleted. ``llava``: stripped prediction with trailing periods removed
    and lower-cased, compared to the gold answer verbatim (official ``eval.py``).
    """
    pred = prediction.strip()
    if variant == "lmms_eval":
        return float(gqa_normalize_lmms_eval(pred) == gqa_normalize_lmms_eval(answer))
    if variant == "llava":
        return float(gqa_normalize_llava(pred) == answer)
    raise ValueError(f"unknown GQA variant '{variant}'; use lmms_eval or llava")
