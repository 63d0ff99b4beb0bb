"""Target diagnostics: AUROC against sklearn, first-target rank against a brute-force sort with
ties placed against the method, keep-map target stats on hand-built maps, and aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from recomp_eval import keepmap
from recomp_eval.methods.base import Role
from recomp_eval.metrics import targets
from recomp_eval.metrics.targets import (
    TARGET_STATS,
    aggregate,
    auroc,
    first_target_rank,
    localisation,
    target_stats,
)


def _random_case(rng: np.random.Generator, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 80))
    mask = rng.random(n) < rng.uniform(0.05, 0.95)
    mask[rng.integers(n)] = True  # at least one of each class
    mask[(np.flatnonzero(mask)[0] + 1) % n] = False
    scores = rng.normal(size=n) + 0.7 * mask
    if ties:
        scores = np.round(scores, int(rng.integers(0, 2)))  # few distinct values
    return scores, mask


# --- AUROC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(ties):
    rng = np.random.default_rng(1234 + ties)
    n_tied = 0
    for _ in range(300):
        scores, mask = _random_case(rng, ties)
        n_tied += len(np.unique(scores)) < len(scores)
        assert auroc(scores, mask) == pytest.approx(roc_auc_score(mask, scores), abs=1e-12)
    assert (n_tied >= 280) if ties else (n_tied == 0)  # tiny rounded cases may lack ties


def test_auroc_fallback_ranks_match_scipy(monkeypatch):
    rng = np.random.default_rng(7)
    for _ in range(200):
        x = np.round(rng.normal(size=int(rng.integers(1, 60))), 1)
        np.testing.assert_array_equal(targets._average_ranks(x), rankdata(x, method="average"))
    monkeypatch.setattr(targets, "_rankdata", targets._average_ranks)
    for _ in range(100):
        scores, mask = _random_case(rng, ties=True)
        assert auroc(scores, mask) == pytest.approx(roc_auc_score(mask, scores), abs=1e-12)


def test_auroc_extremes():
    mask = np.zeros(36, dtype=bool)
    mask[[3, 4, 9, 10]] = True
    perfect = mask.astype(float) + np.linspace(0, 0.5, 36)
    assert auroc(perfect, mask) == 1.0
    assert auroc(-perfect, mask) == 0.0
    assert auroc(np.full(36, 0.3), mask) == 0.5
    assert auroc(np.ones(4), np.array([1, 0, 0, 1])) == 0.5  # 0/1 masks accepted


def test_auroc_random_scores_average_half():
    rng = np.random.default_rng(0)
    mask = np.zeros(64, dtype=bool)
    mask[:16] = True
    values = [auroc(rng.random(64), mask) for _ in range(500)]
    # one draw's sd is about 0.084, so the mean of 500 has sd about 0.004
    assert abs(np.mean(values) - 0.5) < 0.02
    assert 0.05 < np.std(values) < 0.12


def test_auroc_undefined_and_errors():
    assert auroc(np.arange(5.0), np.zeros(5, dtype=bool)) is None
    assert auroc(np.arange(5.0), np.ones(5, dtype=bool)) is None
    assert auroc(np.array([]), np.array([], dtype=bool)) is None
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite") as err:
            auroc(np.array([0.1, bad, 0.3]), np.array([True, False, False]))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected 3"):
        auroc(np.arange(3.0), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="1-D"):
        auroc(np.zeros((2, 2)), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        auroc(np.arange(3.0), np.array([0.5, 0.0, 1.0]))


# --- first target rank -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "mask", "rank"),
    [
        ([0.9, 0.5, 0.7, 0.1], [0, 1, 0, 0], 3),  # two non-targets above
        ([0.2, 0.9, 0.7, 0.1], [0, 1, 0, 0], 1),  # target on top
        ([0.5, 0.5, 0.2], [0, 1, 0], 2),  # tie with a non-target goes against the method
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 0], 4),  # constant score: after every non-target
        ([0.5, 0.5, 0.2], [1, 1, 0], 1),  # targets tied with each other do not push back
        ([0.3, 0.9, 0.8, 0.8, 0.1], [1, 0, 0, 1, 0], 3),  # best target 0.8: 0.9 and 0.8 ahead
        ([0.3, 0.1], [1, 1], 1),  # all target
    ],
)
def test_first_target_rank_hand_cases(scores, mask, rank):
    assert first_target_rank(np.array(scores), np.array(mask, dtype=bool)) == rank


def test_first_target_rank_matches_pessimistic_sort():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scores, mask = _random_case(rng, ties=bool(rng.integers(2)))
        order = np.lexsort((mask, -scores))  # descending score, non-targets first at ties
        expected = 1 + int(np.flatnonzero(mask[order])[0])
        assert first_target_rank(scores, mask) == expected


def test_first_target_rank_none_and_errors():
    assert first_target_rank(np.arange(4.0), np.zeros(4, dtype=bool)) is None
    with pytest.raises(ValueError, match="non-finite"):
        first_target_rank(np.array([np.nan, 1.0]), np.array([True, False]))
    with pytest.raises(ValueError, match="expected 2"):
        first_target_rank(np.arange(2.0), np.ones(3, dtype=bool))


def test_localisation():
    mask = np.array([False, True, False, False])
    out = localisation(np.array([0.9, 0.5, 0.7, 0.1]), mask)
    assert out == {"auroc": pytest.approx(1 / 3), "first_rank": 3, "n_patches": 4}
    assert localisation(np.zeros(4), np.zeros(4, dtype=bool)) == {
        "auroc": None,
        "first_rank": None,
        "n_patches": 4,
    }


# --- keep-map target stats -------------------------------------------------------------------


def _grid_mask(grid: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros(grid, dtype=bool)
    m[rows, cols] = True
    return m.reshape(-1)


TARGET_2X2 = _grid_mask((4, 4), slice(1, 3), slice(1, 3))  # patches 5, 6, 9, 10


def test_codes_match_keepmap():
    assert (
        targets.DROPPED,
        targets.KEPT,
        targets.ATTENTION,
        targets.TEXT,
        targets.CENTRE,
        targets.ABSORBED,
        targets.SUMMARY_ONLY,
    ) == (
        keepmap.DROPPED,
        keepmap.KEPT,
        keepmap.ATTENTION,
        keepmap.TEXT,
        keepmap.CENTRE,
        keepmap.ABSORBED,
        keepmap.SUMMARY_ONLY,
    )


def test_target_stats_hand_built():
    # row 0: kept, dropped, dropped, centre | row 1: dropped, ATTENTION, TEXT, absorbed
    # row 2: dropped, ABSORBED, DROPPED, dropped | row 3: text, dropped, absorbed, summary
    # (capitals: the 2x2 target)
    text = "1004" + "0235" + "0500" + "3056"
    codes = keepmap.decode(text)
    expected = {
        "n_target": 4,
        "recall_kept": 0.5,  # 5 (attention), 6 (text)
        "recall_absorbed": 0.25,  # 9
        "recall_summary": 0.0,
        "recall_seen": 0.75,
        "precision": 0.4,  # own tokens 0, 3, 5, 6, 12: two on the target
        "text_on_target": 0.5,  # text 6 (on), 12 (off)
        "n_text": 2,
    }
    assert target_stats(codes, TARGET_2X2) == pytest.approx(expected)
    assert target_stats(text, TARGET_2X2) == pytest.approx(expected)  # the string works too
    assert isinstance(target_stats(codes, TARGET_2X2)["n_target"], int)


def test_target_stats_summary_and_none_cases():
    # target: centre, summary, summary, dropped; no text anywhere
    codes = keepmap.decode("0000" + "0460" + "0600" + "1000")
    stats = target_stats(codes, TARGET_2X2)
    assert stats == pytest.approx(
        {
            "n_target": 4,
            "recall_kept": 0.25,
            "recall_absorbed": 0.0,
            "recall_summary": 0.5,
            "recall_seen": 0.25,  # the summary token is not counted as seen
            "precision": 0.5,  # own tokens 6 (on), 12 (off)
            "text_on_target": None,
            "n_text": 0,
        }
    )
    no_own = target_stats(keepmap.decode("0000" + "0560" + "0600" + "5000"), TARGET_2X2)
    assert no_own["precision"] is None
    assert no_own["recall_kept"] == 0.0
    assert no_own["recall_seen"] == 0.25
    assert no_own["text_on_target"] is None
    off_target_text = target_stats(keepmap.decode("3" + "0" * 15), TARGET_2X2)
    assert off_target_text["text_on_target"] == 0.0
    assert off_target_text["precision"] == 0.0
    assert target_stats(codes, np.zeros(16, dtype=bool)) == dict.fromkeys(TARGET_STATS)


def test_target_stats_real_keep_maps():
    n = 16
    idx = torch.arange(n)
    # "none": every patch kept as its own token
    everything = keepmap.keep_map(
        torch.full((n,), int(Role.KEPT), dtype=torch.int8), idx, torch.eye(n, dtype=torch.bool)
    )
    assert (everything == 1).all()
    stats = target_stats(everything, TARGET_2X2)
    assert stats["recall_kept"] == 1.0
    assert stats["recall_seen"] == 1.0
    assert stats["precision"] == 0.25

    # a method forced to keep the target by attention, the rest merged into one contextual token
    target = torch.from_numpy(TARGET_2X2)
    keep = idx[target]
    rest = ~target
    role = torch.tensor([int(Role.ATTENTION)] * 4 + [int(Role.CONTEXTUAL)], dtype=torch.int8)
    source = torch.cat([keep, idx[rest][:1]])
    members = torch.zeros(5, n, dtype=torch.bool)
    members[torch.arange(4), keep] = True
    members[4, rest] = True
    forced = keepmap.keep_map(role, source, members)
    stats = target_stats(forced, TARGET_2X2)
    assert stats["recall_kept"] == 1.0
    assert stats["recall_absorbed"] == 0.0
    assert stats["precision"] == 0.8  # the contextual centre is an own token off the target
    assert stats["text_on_target"] is None


def test_target_stats_errors():
    codes = keepmap.decode("1" * 16)
    with pytest.raises(ValueError, match="expected 16") as err:
        target_stats(codes, np.zeros(15, dtype=bool))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="1-D"):
        target_stats(codes.reshape(4, 4), TARGET_2X2)
    with pytest.raises(ValueError, match="1-D"):
        target_stats(codes, TARGET_2X2.reshape(4, 4))
    with pytest.raises(ValueError, match="0-6"):
        target_stats(keepmap.decode("7" + "0" * 15), TARGET_2X2)


# --- aggregation -----------------------------------------------------------------------------


def test_aggregate_ignores_none():
    rows = [
        {"id": "a", "recall_kept": 1.0, "precision": None, "first_rank": 3, "flag": True},
        {"id": "b", "recall_kept": 0.5, "precision": 0.25, "first_rank": np.int64(1)},
        {"id": "c", "recall_kept": None, "precision": np.float64(0.75), "text_on_target": None},
    ]
    out = aggregate(rows)
    assert out == {
        "recall_kept": 0.75,
        "recall_kept_n": 2,
        "precision": 0.5,
        "precision_n": 2,
        "first_rank": 2.0,
        "first_rank_n": 2,
        "text_on_target": None,
        "text_on_target_n": 0,
    }
    assert list(out)[:2] == ["recall_kept", "recall_kept_n"]
    assert aggregate([]) == {}


def test_aggregate_of_real_stats():
    rng = np.random.default_rng(5)
    rows = []
    for _ in range(20):
        codes = rng.integers(0, 7, size=16).astype(np.uint8)
        mask = rng.random(16) < 0.3
        rows.append({**target_stats(codes, mask), **localisation(rng.random(16), mask)})
    rows.append({**target_stats(codes, np.zeros(16, dtype=bool)), "auroc": None})
    out = aggregate(rows)
    kept = [r["recall_kept"] for r in rows if r["recall_kept"] is not None]
    assert out["recall_kept_n"] == len(kept) <= 20
    assert out["recall_kept"] == pytest.approx(np.mean(kept))
    assert out["auroc_n"] == sum(r["auroc"] is not None for r in rows)
    assert out["n_patches"] == 16.0
