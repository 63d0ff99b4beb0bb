"""Per-sample diagnostics of where a compression method looks, given the target object's patches.

Letters: ``N`` visual patches (raster order, as in :mod:`recomp_eval.keepmap`).

Inputs per sample:

* ``codes``: ``[N]`` keep-map codes (``recomp_eval.keepmap.decode(row["keep_map"])``): 0 dropped,
  1 kept (no score / pooled / CLS-adjacent), 2 kept by attention, 3 recovered by text, 4 merge
  centre, 5 absorbed into a merged or contextual token, 6 absorbed only by the summary token;
* ``mask``: ``[N]`` bool, True on the target object's patches (SynthVQA knows it);
* ``scores``: ``[N]`` float per-patch text score of a method (RC's question-patch similarity,
  TRIM's score, CDPruner's relevance), higher = more relevant.

Conventions:

* A patch is *own-token* when its code is 1-4: the LLM sees it as a token of its own.
  ``recall_seen = recall_kept + recall_absorbed``; the summary token (code 6) is reported
  separately as ``recall_summary`` and **not** counted as seen (one token averaging every leftover
  patch carries next to nothing of one object).
* A sample without target patches (empty mask) has no diagnostics: every value is None, so
  :func:`aggregate` skips it.
* :func:`auroc` counts ties as 1/2 (Mann-Whitney U with average ranks).
* :func:`first_target_rank` breaks ties **against** the method: at equal scores non-target patches
  come first, so a constant score ranks the first target after every non-target patch.

numpy only (scipy's ``rankdata`` is used when importable; the fallback gives the same ranks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Real

import numpy as np

# Same values as recomp_eval.keepmap (not imported: that module pulls in torch).
DROPPED, KEPT, ATTENTION, TEXT, CENTRE, ABSORBED, SUMMARY_ONLY = range(7)
OWN_TOKEN = (KEPT, ATTENTION, TEXT, CENTRE)

TARGET_STATS = (
    "n_target",
    "recall_kept",
    "recall_absorbed",
    "recall_summary",
    "recall_seen",
    "precision",
    "text_on_target",
    "n_text",
)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """``[N]`` 1-based ranks of ``x`` (``[N]``), tied values sharing their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], xs.size]  # one past its last
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


try:
    from scipy.stats import rankdata as _scipy_rankdata

    def _rankdata(x: np.ndarray) -> np.ndarray:
        return np.asarray(_scipy_rankdata(x, method="average"), dtype=np.float64)

except ImportError:  # pragma: no cover - scipy is in the venv
    _rankdata = _average_ranks


def _as_mask(mask, n: int | None, what: str) -> np.ndarray:
    """``mask`` as a 1-D bool array (0/1 integers accepted), checked against length ``n``."""
    m = np.asarray(mask)
    if m.ndim != 1:
        raise ValueError(f"{what}: mask must be 1-D [N], got shape {list(m.shape)}")
    if n is not None and m.shape[0] != n:
        raise ValueError(f"{what}: mask has {m.shape[0]} patches, expected {n}")
    if m.dtype != np.bool_:
        if m.size and not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
            raise ValueError(f"{what}: mask must be bool (or 0/1), got dtype {m.dtype}")
        m = m.astype(bool)
    return m


def _as_scores(scores, mask, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{what}: scores must be 1-D [N], got shape {list(s.shape)}")
    m = _as_mask(mask, s.shape[0], what)
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    return s, m


def target_stats(codes: np.ndarray | str, mask: np.ndarray) -> dict[str, float | None]:
    """How a keep map treats the target object.

    Args:
        codes: ``[N]`` uint8 keep-map codes 0-6 (or the keep-map string itself).
        mask: ``[N]`` bool, True on target patches.
    Returns:
        ``n_target`` (int), ``recall_kept`` (share of target patches with an own token, codes
        1-4), ``recall_absorbed`` (code 5), ``recall_summary`` (code 6), ``recall_seen``
        (kept + absorbed; summary not counted), ``precision`` (share of own-token patches on the
        target; None when there are none), ``text_on_target`` (share of text-recovered patches,
        code 3, on the target; None when none were recovered), ``n_text`` (int, code-3 count).
        Every value is None when the mask is empty.
    Raises:
        ValueError: shapes differ, or a code is outside 0-6.
    """
    if isinstance(codes, str):
        codes = np.frombuffer(codes.encode(), dtype=np.uint8) - ord("0")
    c = np.asarray(codes)
    if c.ndim != 1:
        raise ValueError(f"target_stats: codes must be 1-D [N], got shape {list(c.shape)}")
    m = _as_mask(mask, c.shape[0], "target_stats")
    if c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() > 6):
        raise ValueError("target_stats: keep-map codes must be integers 0-6")
    n_target = int(m.sum())
    if n_target == 0:
        return dict.fromkeys(TARGET_STATS)
    on = c[m]
    own = np.isin(c, OWN_TOKEN)
    text = c == TEXT
    recall_kept = float(np.isin(on, OWN_TOKEN).mean())
    recall_absorbed = float((on == ABSORBED).mean())
    n_own, n_text = int(own.sum()), int(text.sum())
    return {
        "n_target": n_target,
        "recall_kept": recall_kept,
        "recall_absorbed": recall_absorbed,
        "recall_summary": float((on == SUMMARY_ONLY).mean()),
        "recall_seen": recall_kept + recall_absorbed,
        "precision": float((own & m).sum() / n_own) if n_own else None,
        "text_on_target": float((text & m).sum() / n_text) if n_text else None,
        "n_text": n_text,
    }


def auroc(scores: np.ndarray, mask: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for target (positive) vs non-target patches, ties counted as 1/2.

    ``AUC = (R_pos - P (P + 1) / 2) / (P Q)`` with ``R_pos`` the sum of the targets' average ranks,
    ``P`` targets and ``Q`` non-targets (Mann-Whitney U / (P Q)); equals
    ``sklearn.metrics.roc_auc_score(mask, scores)``. A constant score gives 0.5.

    Args:
        scores: ``[N]`` float, higher = more target-like.
        mask: ``[N]`` bool, True on target patches.
    Returns:
        AUC in [0, 1], or None when the mask is all False or all True.
    Raises:
        ValueError: shapes differ, or a score is NaN / inf.
    """
    s, m = _as_scores(scores, mask, "auroc")
    p = int(m.sum())
    q = m.size - p
    if p == 0 or q == 0:
        return None
    r_pos = float(_rankdata(s)[m].sum())
    return (r_pos - p * (p + 1) / 2.0) / (p * q)


def first_target_rank(scores: np.ndarray, mask: np.ndarray) -> int | None:
    """1-based rank of the best-scored target patch, patches sorted by descending score.

    Ties go against the method: ``rank = 1 + #(non-target patches scoring >= the best target
    score)``, i.e. at equal scores non-target patches are placed first (targets tied with the best
    target do not count; the first of them is the one ranked). Every patch scoring strictly higher
    than the best target is a non-target, so this is the worst position the best target can take
    under any tie-break. 1 = a target patch strictly tops every non-target patch.

    Args:
        scores: ``[N]`` float, higher = more target-like.
        mask: ``[N]`` bool, True on target patches.
    Returns:
        Rank in ``1 .. N - n_target + 1``, or None when the mask is empty.
    Raises:
        ValueError: shapes differ, or a score is NaN / inf.
    """
    s, m = _as_scores(scores, mask, "first_target_rank")
    if not m.any():
        return None
    best = s[m].max()
    return 1 + int((s[~m] >= best).sum())


def localisation(scores: np.ndarray, mask: np.ndarray) -> dict[str, float | int | None]:
    """``auroc``, ``first_rank`` (:func:`first_target_rank`) and ``n_patches`` (``N``) of a score.

    Args:
        scores: ``[N]`` float per-patch score.
        mask: ``[N]`` bool, True on target patches.
    """
    return {
        "auroc": auroc(scores, mask),
        "first_rank": first_target_rank(scores, mask),
        "n_patches": int(np.asarray(scores).shape[0]),
    }


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def aggregate(rows: Iterable[Mapping[str, object]]) -> dict[str, float | int | None]:
    """Mean of each numeric stat over the rows where it is not None, with the count used.

    Args:
        rows: per-sample dicts (e.g. :func:`target_stats` merged with :func:`localisation`).
    Returns:
        For every key holding a number (not a bool) in some row, in first-seen order: ``<name>``
        (float mean over those rows) and ``<name>_n`` (int count). A key that is None in every row
        it appears in is reported as ``<name>: None, <name>_n: 0``. Other values (strings, lists,
        bools) are skipped like None, and a key holding only such values (and None) is left out.
    """
    sums: dict[str, float] = {}  # insertion order = first-seen order of candidate keys
    counts: dict[str, int] = {}
    other: set[str] = set()  # keys seen holding something that is neither a number nor None
    for row in rows:
        for key, value in row.items():
            sums.setdefault(key, 0.0)
            counts.setdefault(key, 0)
            if _is_number(value):
                sums[key] += float(value)
                counts[key] += 1
            elif value is not None:
                other.add(key)
    out: dict[str, float | int | None] = {}
    for key, total in sums.items():
        n = counts[key]
        if n == 0 and key in other:
            continue
        out[key] = total / n if n else None
        out[f"{key}_n"] = n
    return out
