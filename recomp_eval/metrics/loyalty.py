"""Loyalty of a compressed run to the matching uncompressed run.

Given per-sample records of both runs (same benchmark, protocol and samples), report:

* ``agreement``: share of samples whose answers are equal after the benchmark config's
  ``answer_pipeline`` (so ``"Yes."`` and ``"yes"`` agree on POPE);
* ``correct_to_wrong`` / ``wrong_to_correct``: flip rates. With per-sample scores ``s_ref`` and
  ``s_cmp`` in [0, 1] these are ``mean(max(0, s_ref - s_cmp))`` and ``mean(max(0, s_cmp - s_ref))``:
  exactly the flip rates for 0/1 scores and the natural extension for VQA soft accuracy, with
  ``wrong_to_correct - correct_to_wrong == accuracy_diff``;
* ``accuracy_diff`` (compressed minus reference, per-question accuracy of the first metric the
  benchmark config names for the protocol) with a paired percentile bootstrap confidence interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recomp_eval.benchmarks.specs import scoring_spec
from recomp_eval.metrics.registry import METRICS, Record, apply_pipeline
from recomp_eval.metrics.scoring import metrics_for, prediction_of

BOOTSTRAP_CHUNK = 64  # resamples drawn per vectorised step (bounds memory at chunk x n)


def paired_bootstrap_ci(
    diffs: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of ``mean(diffs)`` under resampling of the paired samples.

    Args:
        diffs: ``[n]`` per-sample differences (compressed minus reference).
        n_boot: number of bootstrap resamples.
        confidence: two-sided coverage, e.g. 0.95.
        seed: seed of the numpy generator (deterministic results).
    """
    n = diffs.shape[0]
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, BOOTSTRAP_CHUNK):
        stop = min(start + BOOTSTRAP_CHUNK, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # [chunk, n]
        means[start:stop] = diffs[idx].mean(axis=1)  # [chunk]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def loyalty_metrics(
    compressed: Sequence[Record],
    reference: Sequence[Record],
    benchmark: str,
    protocol: str,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    answer_pipeline: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Loyalty of ``compressed`` to ``reference`` (records paired by ``sample_id``).

    Args:
        answer_pipeline: the benchmark config's ``answer_pipeline`` for ``protocol``; None reads
            ``configs/benchmark/<benchmark>.yaml``.
        metrics: the benchmark config's ``metrics`` for ``protocol`` (the first one scores each
            answer); None reads the YAML, as :func:`~recomp_eval.metrics.scoring.score` does.

    Returns keys ``{benchmark}/loyalty/{agreement, correct_to_wrong, wrong_to_correct,
    accuracy_diff, accuracy_diff_low, accuracy_diff_high, n_paired, n_unpaired}``. Samples
    present in only one run, or without answers, are not paired and are counted in ``n_unpaired``.
    """
    ref_by_id = {str(r["sample_id"]): r for r in reference if r.get("answers")}
    pairs = [
        (c, ref_by_id[str(c["sample_id"])]) for c in compressed if str(c["sample_id"]) in ref_by_id
    ]
    n_unpaired = len(compressed) + len(ref_by_id) - 2 * len(pairs)
    steps = scoring_spec(benchmark).pipeline_for(protocol)
    steps = steps if answer_pipeline is None else tuple(answer_pipeline)
    names = metrics_for(benchmark, protocol, metrics)
    if pairs and not names:
        raise ValueError(f"{benchmark}: loyalty needs a metric to score answers; metrics is empty")
    per_sample = METRICS.get(names[0]).per_sample if names else None

    s_cmp = np.array([per_sample(prediction_of(c), c) for c, _ in pairs], dtype=np.float64)  # [n]
    s_ref = np.array([per_sample(prediction_of(r), r) for _, r in pairs], dtype=np.float64)  # [n]
    agree = np.array(
        [
            apply_pipeline(prediction_of(c), steps) == apply_pipeline(prediction_of(r), steps)
            for c, r in pairs
        ],
        dtype=np.float64,
    )
    diffs = s_cmp - s_ref  # [n]
    low, high = paired_bootstrap_ci(diffs, n_boot=n_boot, confidence=confidence, seed=seed)
    mean = lambda x: float(x.mean()) if x.size else 0.0  # noqa: E731
    prefix = f"{benchmark}/loyalty"
    return {
        f"{prefix}/agreement": mean(agree),
        f"{prefix}/correct_to_wrong": mean(np.clip(-diffs, 0.0, None)),
        f"{prefix}/wrong_to_correct": mean(np.clip(diffs, 0.0, None)),
        f"{prefix}/accuracy_diff": mean(diffs),
        f"{prefix}/accuracy_diff_low": low,
        f"{prefix}/accuracy_diff_high": high,
        f"{prefix}/n_paired": float(len(pairs)),
        f"{prefix}/n_unpaired": float(n_unpaired),
    }
