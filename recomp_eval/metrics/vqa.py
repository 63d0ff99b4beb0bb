"""Per-question soft accuracies for VQAv2 and TextVQA.

All functions take one generation (already stripped by the answer pipeline or not: each does the
stripping its reference implementation does) and return a float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from recomp_eval.metrics.normalize import (
    evalai_digit_article,
    evalai_normalize,
    evalai_punctuation,
)

# A prediction matching this many *other* annotators scores 1 (VQA soft accuracy).
VQA_MATCHES_FOR_FULL_CREDIT = 3

VqaVariant = Literal["lmms_eval_073", "lmms_eval_legacy"]


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the annotators i of ``min(1, #{j != i : answers[j] == prediction} / 3)``.

    Inputs are compared verbatim: normalise them first. Empty ``answers`` score 0.
    """
    if not answers:
        return 0.0
    total_matches = sum(a == prediction for a in answers)
    # Leaving out annotator i removes one match exactly when answers[i] matches.
    accs = [
        min(1.0, (total_matches - (a == prediction)) / VQA_MATCHES_FOR_FULL_CREDIT) for a in answers
    ]
    return sum(accs) / len(accs)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(
    prediction: str, answers: Sequence[str], variant: VqaVariant = "lmms_eval_073"
) -> float:
    """VQAv2 soft accuracy with EvalAI normalisation.

    ``lmms_eval_073`` (default; lmms-eval 0.7.3 ``vqav2_val``): the prediction and all ten
    answers are whitespace-cleaned, then go through punctuation and digit/article processing.
    ``lmms_eval_legacy`` (lmms-eval before Aug 2025, shape of the official VQA script): the
    punctuation + digit/article processing is applied to prediction and answers only when the
    answers are not all identical; otherwise the prediction is compared verbatim (after
    whitespace clean-up), so ``"Yes"`` scores 0 against ten ``"yes"``.
    """
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if variant == "lmms_eval_073" or (variant == "lmms_eval_legacy" and len(set(gts)) > 1):
        pred = evalai_digit_article(evalai_punctuation(pred))
        gts = [evalai_digit_article(evalai_punctuation(a)) for a in gts]
    elif variant != "lmms_eval_legacy":
        raise ValueError(f"unknown VQA variant '{variant}'; use lmms_eval_073 or lmms_eval_legacy")
    return leave_one_out_accuracy(pred, gts)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """m4c ``TextVQAAccuracyEvaluator`` semantics (LLaVA and lmms-eval 0.7.3 agree): the full
    EvalAI processor on the prediction and each answer, then leave-one-out soft accuracy."""
    return leave_one_out_accuracy(
        evalai_normalize(prediction), [evalai_normalize(a) for a in answers]
    )
