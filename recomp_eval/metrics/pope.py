"""POPE metrics: LLaVA-1.5 (per split, parsed) and lmms-eval 0.7.3 (pooled, strict).

Differences that change numbers (all asserted in ``tests/test_metrics.py``):

* parsing: LLaVA maps every answer to yes/no (first sentence, any ``No``/``not``/``no`` word
  means no); lmms-eval requires the whole stripped, lower-cased answer to be ``yes``/``no`` and
  drops other answers from precision/recall/F1 (they still count as wrong in accuracy);
* pooling: the LLaVA paper reports F1 per split (adversarial, popular, random) and their mean;
  lmms-eval's ``pope`` task pools the 9,000 questions;
* yes-ratio: LLaVA's is the share of *predicted* yes; lmms-eval's ``pope_yes_ratio`` counts
  *ground-truth* yes (a bug: 0.5 on balanced data). We report the predicted share as
  ``yes_ratio`` and keep the lmms-eval number only under the explicit key ``gt_yes_ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence

from recomp_eval.metrics.normalize import parse_pope_llava, parse_pope_strict


def _check_labels(labels: Sequence[str]) -> list[str]:
    gts = [label.lower().strip() for label in labels]
    bad = sorted({g for g in gts if g not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be yes/no, got {bad[:5]}")
    return gts


def _ratio(num: float, den: float) -> float:
    """num / den, 0 when the denominator is 0 (lmms-eval's convention; LLaVA would crash)."""
    return num / den if den > 0 else 0.0


def binary_metrics(preds: Sequence[str | None], gts: Sequence[str]) -> dict[str, float]:
    """Confusion-matrix metrics with ``yes`` as the positive class.

    ``preds`` entries that are neither yes nor no (``None``) count as wrong in ``accuracy`` and
    are left out of precision/recall (lmms-eval semantics; never happens with LLaVA parsing).
    """
    pairs = list(zip(preds, gts, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(p == "yes" for p in preds), len(pairs)),
        "unparseable_rate": _ratio(sum(p is None for p in preds), len(pairs)),
    }


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """LLaVA ``eval_pope`` metrics for one split.

    Args:
        predictions: raw generations (stripped or not).
        labels: ground truth ``yes``/``no`` (any case).

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (share of predictions
        parsed as yes), plus ``unparseable_rate`` (always 0 with this parser).
    """
    return binary_metrics([parse_pope_llava(p) for p in predictions], _check_labels(labels))


def pope_metrics_by_split(
    predictions: Sequence[str], labels: Sequence[str], splits: Sequence[str]
) -> dict[str, float]:
    """LLaVA-1.5 paper protocol: :func:`pope_metrics` per split as ``{split}/{metric}``, then
    ``f1_mean`` (mean of the split F1s, the paper number) and pooled ``accuracy``."""
    out: dict[str, float] = {}
    f1s: list[float] = []
    for split in sorted(set(splits)):
        idx = [i for i, s in enumerate(splits) if s == split]
        metrics = pope_metrics([predictions[i] for i in idx], [labels[i] for i in idx])
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
        f1s.append(metrics["f1"])
    out["f1_mean"] = _ratio(sum(f1s), len(f1s))
    pooled = pope_metrics(predictions, labels)
    out["accuracy"] = pooled["accuracy"]
    out["yes_ratio"] = pooled["yes_ratio"]
    return out


def pope_metrics_lmms_eval(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """lmms-eval 0.7.3 ``pope`` aggregation over the given (pooled) rows.

    Returns ``accuracy``, ``precision``, ``recall``, ``f1`` with strict parsing,
    ``unparseable_rate``, ``yes_ratio`` (share of predictions that are exactly yes: our fix) and
    ``gt_yes_ratio`` (what lmms-eval reports as ``pope_yes_ratio``: the ground-truth share).
    """
    gts = _check_labels(labels)
    out = binary_metrics([parse_pope_strict(p) for p in predictions], gts)
    out["gt_yes_ratio"] = _ratio(sum(g == "yes" for g in gts), len(gts))
    return out
