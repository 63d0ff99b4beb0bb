"""Percentile bootstrap confidence intervals of a benchmark's headline metric.

``metric_ci(benchmark, protocol, rows, key)`` returns the point estimate (``score()[key]``) and a
percentile bootstrap interval. Every prediction is parsed once into a small array per stratum;
each resample's statistic is then pure numpy on index arrays (chunks of resamples, as in
:func:`~recomp_eval.metrics.loyalty.paired_bootstrap_ci`, bound the memory at chunk x n).

What is resampled (the resampling unit and the strata follow the structure of the metric):

* mean accuracies (GQA, VQAv2, TextVQA): the questions, with replacement;
* POPE, LLaVA protocol: the questions *within each split* (stratified), so every resample keeps
  the three splits at their sizes, as ``f1_mean`` (mean of per-split F1s) assumes;
* POPE, lmms-eval protocol: the pooled questions; unparseable answers stay in the resample and,
  as in :func:`~recomp_eval.metrics.pope.binary_metrics`, count as wrong in accuracy and are left
  out of precision/recall/F1;
* MME: the images (both questions of an image together, since acc+ needs the pair) within each
  category.

Letters in shape comments: ``R`` resamples in a chunk, ``n`` units of a stratum (questions or
images), ``S`` strata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from recomp_eval.metrics.loyalty import BOOTSTRAP_CHUNK
from recomp_eval.metrics.mme import COGNITION, PERCENT, PERCEPTION
from recomp_eval.metrics.normalize import parse_pope_llava, parse_pope_strict
from recomp_eval.metrics.registry import METRICS, MetricSpec, Record
from recomp_eval.metrics.scoring import (
    _answer,
    _has_answers,
    _meta,
    metrics_for,
    prediction_of,
    score,
)

# Registered metrics whose value is the mean of ``spec.per_sample`` over the rows.
MEAN_METRICS = frozenset(
    {
        "gqa_exact_match_llava",
        "gqa_exact_match_lmms_eval",
        "vqa_accuracy_lmms_eval_073",
        "textvqa_accuracy_m4c",
    }
)
# POPE metric -> (answer parser, stratified by split).
POPE_METRICS = {
    "pope_llava": (parse_pope_llava, True),
    "pope_lmms_eval": (parse_pope_strict, False),
}
MME_METRICS = frozenset({"mme_mme_tool", "mme_lmms_eval"})
BINARY = ("accuracy", "precision", "recall", "f1")
SUPPORTED = (
    "accuracy of gqa/vqav2/textvqa; pope f1_mean, accuracy and <split>/{accuracy,precision,"
    "recall,f1} (pope_llava), accuracy/precision/recall/f1 (pope_lmms_eval); mme perception, "
    "cognition and <category>"
)

# POPE confusion cells: code = pred (0 no, 1 yes, 2 unparseable) + 3 * [gold is yes].
_PRED_CODE = {"no": 0, "yes": 1, None: 2}
_N_CELLS = 6
_TN, _FP, _FN, _TP = 0, 1, 3, 4

Kind = Literal["mean", "pope", "mme"]


@dataclass(frozen=True)
class Prepared:
    """Parsed rows of one metric, grouped into strata of resampling units.

    Attributes:
        kind: ``mean`` (per-question scores), ``pope`` (confusion cells) or ``mme`` (images).
        metric: the statistic: ``accuracy`` for ``mean``; ``f1_mean`` or one of :data:`BINARY`
            for ``pope`` (pooled over the strata); ``sum`` for ``mme`` (sum over the strata of
            category acc + acc+).
        strata: stratum names (``all``, POPE splits in sorted order, MME categories in the
            toolkit's order).
        values: per stratum, ``mean``: ``[n]`` float scores; ``pope``: ``[n]`` int cell codes;
            ``mme``: ``[n, 2]`` float (acc, acc+) of each image, in points.
        members: per stratum, per unit, the indices of its rows in the scored rows.
    """

    kind: Kind
    metric: str
    strata: tuple[str, ...]
    values: tuple[np.ndarray, ...]
    members: tuple[tuple[tuple[int, ...], ...], ...]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (as :func:`recomp_eval.metrics.pope._ratio`)."""
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    return np.divide(num, den, out=out, where=den > 0)


def _cell_counts(codes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Confusion-cell counts ``[R, 6]`` of resamples ``idx`` ``[R, n]`` of cell ``codes`` ``[n]``."""
    r = idx.shape[0]
    flat = (codes[idx] + _N_CELLS * np.arange(r)[:, None]).ravel()  # [R * n]
    return np.bincount(flat, minlength=r * _N_CELLS).reshape(r, _N_CELLS)  # [R, 6]


def _binary(counts: np.ndarray, metric: str) -> np.ndarray:
    """One of :data:`BINARY` from cell counts ``[R, 6]``, in the order of ``binary_metrics``."""
    tp, fp, tn, fn = counts[:, _TP], counts[:, _FP], counts[:, _TN], counts[:, _FN]  # [R] each
    if metric == "accuracy":
        return _ratio(tp + tn, counts.sum(axis=1))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)  # [R] each
    if metric == "precision":
        return precision
    if metric == "recall":
        return recall
    return _ratio(2 * precision * recall, precision + recall)


def _statistic(prepared: Prepared, idx: Sequence[np.ndarray]) -> np.ndarray:
    """The metric on explicit resamples.

    Args:
        prepared: output of :func:`_prepare`.
        idx: per stratum, ``[R, n]`` int unit indices in ``[0, n)`` (``n`` units of that stratum).

    Returns:
        ``[R]`` float: the metric as ``score()`` computes it on the resampled rows.
    """
    p = prepared
    if p.kind == "mean":
        (x,), (i,) = p.values, idx
        return x[i].sum(axis=1) / x.shape[0]  # [R]
    if p.kind == "pope":
        per_split = [_cell_counts(c, i) for c, i in zip(p.values, idx, strict=True)]
        counts = np.stack(per_split)  # [S, R, 6]
        if p.metric != "f1_mean":
            return _binary(counts.sum(axis=0), p.metric)  # pooled over the strata
        total = np.zeros(counts.shape[1])  # [R], summed split by split like sum(f1s)
        for c in counts:
            total = total + _binary(c, "f1")
        return total / counts.shape[0]
    total = np.zeros(idx[0].shape[0])  # [R]
    for images, i in zip(p.values, idx, strict=True):
        means = images[i].sum(axis=1) / images.shape[0]  # [R, n, 2] -> [R, 2]
        total = total + (means[:, 0] + means[:, 1])  # category acc + acc+
    return total


def _group(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Row indices per key, keys in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def _prepare_pope(spec: MetricSpec, name: str, rows: Sequence[Record]) -> Prepared | None:
    parser, by_split = POPE_METRICS[spec.name]
    gold_yes = [_answer(r).lower().strip() == "yes" for r in rows]
    codes = np.array(
        [_PRED_CODE[parser(prediction_of(r))] + 3 * g for r, g in zip(rows, gold_yes, strict=True)],
        dtype=np.intp,
    )  # [n_rows]
    splits = _group([_meta(r, "category") for r in rows] if by_split else ["all"] * len(rows))
    split, _, metric = name.rpartition("/")
    if split:  # a per-split result: LLaVA protocol only
        names = tuple(s for s in splits if by_split and f"{s}" == split and metric in BINARY)
    elif metric in (("f1_mean", "accuracy") if by_split else BINARY):
        names = tuple(sorted(splits))  # the order of pope_metrics_by_split
    else:
        names = ()
    if not names:
        return None
    return Prepared(
        kind="pope",
        metric=metric,
        strata=names,
        values=tuple(codes[splits[s]] for s in names),
        members=tuple(tuple((i,) for i in splits[s]) for s in names),
    )


def _prepare_mme(spec: MetricSpec, name: str, rows: Sequence[Record]) -> Prepared | None:
    if name == "perception":
        wanted = PERCEPTION
    elif name == "cognition":
        wanted = COGNITION
    elif name in PERCEPTION or name in COGNITION:
        wanted = (name,)
    else:
        return None
    correct = [spec.per_sample(prediction_of(r), r) for r in rows]  # parsed once per row
    images: dict[str, dict[str, list[int]]] = {}  # category -> image_id -> row indices
    for i, r in enumerate(rows):
        per_image = images.setdefault(_meta(r, "category"), {})
        per_image.setdefault(str(_meta(r, "image_id")), []).append(i)
    names = tuple(c for c in wanted if c in images)
    if not names:  # score() reports 0.0 for an absent group; nothing to resample
        return None
    values, members = [], []
    for c in names:
        groups = list(images[c].values())
        scores = [[correct[i] for i in g] for g in groups]
        # The expressions of mme_scores, so that resampled sums match it exactly.
        values.append(
            np.array(
                [[sum(s) / len(s) * PERCENT, float(all(s)) * PERCENT] for s in scores],
                dtype=np.float64,
            )  # [n_images, 2]
        )
        members.append(tuple(tuple(g) for g in groups))
    return Prepared("mme", "sum", names, tuple(values), tuple(members))


def _prepare(spec: MetricSpec, name: str, rows: Sequence[Record]) -> Prepared | None:
    """Parse ``rows`` (all with answers) for the result ``name`` of ``spec`` (e.g. ``f1_mean``);
    ``None`` when that result has no bootstrap here."""
    if spec.name in MEAN_METRICS and name == "accuracy":
        scores = np.array([spec.per_sample(prediction_of(r), r) for r in rows])  # [n_rows]
        units = tuple((i,) for i in range(len(rows)))
        return Prepared("mean", "accuracy", ("all",), (scores,), (units,))
    if spec.name in POPE_METRICS:
        return _prepare_pope(spec, name, rows)
    if spec.name in MME_METRICS:
        return _prepare_mme(spec, name, rows)
    return None


def _bootstrap(prepared: Prepared, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot]`` statistics of resamples drawn within each stratum, ``BOOTSTRAP_CHUNK`` at a
    time (per chunk and stratum, ``rng.integers(0, n, size=(R, n))``)."""
    rng = np.random.default_rng(seed)
    sizes = [v.shape[0] for v in prepared.values]
    stats = np.empty(n_boot, dtype=np.float64)  # [n_boot]
    for start in range(0, n_boot, BOOTSTRAP_CHUNK):
        stop = min(start + BOOTSTRAP_CHUNK, n_boot)
        idx = [rng.integers(0, n, size=(stop - start, n)) for n in sizes]  # S x [R, n]
        stats[start:stop] = _statistic(prepared, idx)
    return stats


def _resolve(benchmark: str, key: str, names: Sequence[str]) -> tuple[MetricSpec, str] | None:
    """The spec whose result ``key`` is (the last one, as ``score()`` lets later ones win)."""
    prefix = f"{benchmark}/"
    for spec_name in reversed(names):
        spec = METRICS.get(spec_name)
        suffix = f"_{spec.variant}" if spec.variant else ""
        if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix + suffix):
            return spec, key[len(prefix) : len(key) - len(suffix)]
    return None


def metric_ci(
    benchmark: str,
    protocol: str,
    rows: Sequence[Record],
    key: str,
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(value, low, high)``: the metric ``key`` of ``score(benchmark, rows, protocol, metrics)``
    (e.g. ``gqa/accuracy_llava``, ``pope/f1_mean_llava``, ``pope/f1_lmms_eval``,
    ``mme/perception_mme_tool``) and its percentile bootstrap interval.

    Resampling follows the metric (see the module docstring): questions for mean accuracies;
    questions within each split (stratified) for LLaVA's POPE ``f1_mean`` and per-split
    metrics; pooled questions for lmms-eval's POPE; images within each category for MME.

    Args:
        benchmark, protocol, rows, metrics: as for :func:`~recomp_eval.metrics.scoring.score`;
            rows without answers are not scored.
        key: a result key of ``score()``.
        n_boot: number of resamples.
        confidence: two-sided coverage, e.g. 0.95.
        seed: seed of the numpy generator (the result is deterministic for a seed).

    Returns:
        ``value`` is exactly ``score(...)[key]``. ``low``/``high`` are NaN when ``key`` has no
        bootstrap here (diagnostics such as ``yes_ratio``, counts). A metric key on input with
        no scored rows gives ``(nan, nan, nan)``.

    Raises:
        KeyError: ``key`` is not a result of ``score()`` for these rows and metrics.
    """
    if n_boot < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    out = score(benchmark, rows, protocol, metrics)
    names = metrics_for(benchmark, protocol, metrics)
    scored = [r for r in rows if _has_answers(r)]
    nan = float("nan")
    if key not in out:
        if not scored and _resolve(benchmark, key, names) is not None:
            return (nan, nan, nan)
        raise KeyError(
            f"'{key}' is not a result of score({benchmark!r}, {protocol!r}); supported: {SUPPORTED}"
        )
    value = out[key]
    resolved = _resolve(benchmark, key, names)
    prepared = _prepare(*resolved, scored) if resolved is not None else None
    if prepared is None:
        return (value, nan, nan)
    stats = _bootstrap(prepared, n_boot, seed)  # [n_boot]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return (value, float(low), float(high))
