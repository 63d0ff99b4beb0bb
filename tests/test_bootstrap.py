"""Bootstrap CIs of headline metrics: the vectorised statistic against ``score()`` on resampled
rows, the draws against a plain loop bootstrap and scipy, and the interval's basic properties."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pytest

from recomp_eval.metrics.bootstrap import _bootstrap, _prepare, _resolve, _statistic, metric_ci
from recomp_eval.metrics.gqa import gqa_accuracy
from recomp_eval.metrics.loyalty import BOOTSTRAP_CHUNK
from recomp_eval.metrics.mme import COGNITION, PERCEPTION
from recomp_eval.metrics.scoring import metrics_for, score
from recomp_eval.metrics.vqa import vqa_accuracy

Rows = list[dict]

# Messy generations: what each parser makes of them differs (LLaVA POPE reads "NO" as yes and
# "" as yes; lmms-eval POPE rejects "Yes."; only lmms-eval's MME parser reads "y"/"N").
POPE_YES = ["Yes", "Yes.", "yes", "I think yes", "Yes, there is a dog in the image.", "YES"]
POPE_NO = ["No", "No.", "no", "no, there is not", "There is not a dog.", "NO"]
POPE_ODD = ["", "N", "Maybe", "I cannot tell."]
MME_YES = ["Yes", "Yes.", "yes, it is", "y", "Yes, the image shows it."]
MME_NO = ["No", "No.", "no", "N", "No, it is not."]
MME_ODD = ["", "Sorry, I can't help.", "The answer is yes", " It is unclear."]
# MME-like images per category (2 questions each): 1,187 images, 2,374 questions in all.
MME_IMAGES = dict(
    zip(
        PERCEPTION + COGNITION,
        [30, 30, 30, 30, 147, 170, 200, 200, 200, 20, 70, 20, 20, 20],
        strict=True,
    )
)
POPE_SPLITS = ("adversarial", "popular", "random")


def _answer_text(
    rng: np.random.Generator,
    right: list[str],
    wrong: list[str],
    odd: list[str],
    p_right: float,
    p_odd: float,
) -> str:
    u = rng.random()
    pool = odd if u < p_odd else right if u < p_odd + p_right else wrong
    return pool[rng.integers(len(pool))]


def pope_rows(per_split: int, seed: int = 0, p_right: float = 0.8, p_odd: float = 0.08) -> Rows:
    rng = np.random.default_rng(seed)
    rows = []
    for split in POPE_SPLITS:
        for k in range(per_split):
            gold = "yes" if rng.random() < 0.5 else "no"
            right, wrong = (POPE_YES, POPE_NO) if gold == "yes" else (POPE_NO, POPE_YES)
            rows.append(
                {
                    "sample_id": f"{split}-{k}",
                    "prediction": _answer_text(rng, right, wrong, POPE_ODD, p_right, p_odd),
                    "answers": [gold],
                    "meta": {"category": split, "image_id": f"COCO_{k // 6:06d}.jpg"},
                }
            )
    return rows


def mme_rows(scale: float = 1.0, seed: int = 0, p_right: float = 0.8, p_odd: float = 0.05) -> Rows:
    rng = np.random.default_rng(seed)
    rows = []
    for category, n_images in MME_IMAGES.items():
        for k in range(max(1, round(n_images * scale))):
            for q, gold in enumerate(("Yes", "No")):
                right, wrong = (MME_YES, MME_NO) if gold == "Yes" else (MME_NO, MME_YES)
                rows.append(
                    {
                        "sample_id": f"{category}-{k}-{q}",
                        "prediction": _answer_text(rng, right, wrong, MME_ODD, p_right, p_odd),
                        "answers": [gold],
                        "meta": {"category": category, "image_id": f"{category}/{k:04d}.png"},
                    }
                )
    rng.shuffle(rows)  # the scorer must not rely on the two questions being adjacent
    return rows


def gqa_rows(n: int, seed: int = 0, p_right: float = 0.6) -> Rows:
    rng = np.random.default_rng(seed)
    golds = ["yes", "no", "red", "left", "table", "2"]
    rows = []
    for k in range(n):
        gold = golds[rng.integers(len(golds))]
        if rng.random() < p_right:
            pred = [gold, gold.capitalize() + ".", f"{gold}..", gold.upper()][rng.integers(4)]
        else:
            pred = ["blue", "I think so", "", "right."][rng.integers(4)]
        rows.append({"sample_id": str(k), "prediction": pred, "answers": [gold], "meta": {}})
    return rows


def vqa_rows(n: int, seed: int = 0) -> Rows:
    """Ten answers per question with disagreement, so soft scores are not 0/1."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        n_two = int(rng.integers(0, 11))
        answers = ["two"] * n_two + ["3"] * (10 - n_two)
        pred = ["2", "Two.", "3", "three", "a dog", ""][rng.integers(6)]
        rows.append({"sample_id": str(k), "prediction": pred, "answers": answers, "meta": {}})
    return rows


def _resampled_rows(rows: Rows, members, idx: list[np.ndarray], rename: bool) -> Rows:
    """Rows of one resample: unit ``j`` of stratum ``s`` drawn ``idx[s]`` times; with ``rename``
    every drawn copy of an MME image gets its own image_id (acc+ stays per pair)."""
    out = []
    for units, draws in zip(members, idx, strict=True):
        for copy, j in enumerate(draws):
            for i in units[j]:
                row = rows[i]
                if rename:
                    meta = dict(row["meta"], image_id=f"{row['meta']['image_id']}#{copy}")
                    row = {**row, "meta": meta}
                out.append(row)
    return out


ORACLE_CASES: list[tuple[str, str, Callable[[], Rows], list[str], bool]] = [
    ("gqa", "llava15", lambda: gqa_rows(150), ["gqa/accuracy_llava"], True),
    ("gqa", "lmms_eval", lambda: gqa_rows(150, seed=1), ["gqa/accuracy_lmms_eval"], True),
    ("vqav2", "lmms_eval", lambda: vqa_rows(120), ["vqav2/accuracy_lmms_eval_073"], False),
    ("textvqa", "llava15", lambda: vqa_rows(120, seed=2), ["textvqa/accuracy_m4c"], False),
    (
        "pope",
        "llava15",
        lambda: pope_rows(40),
        [
            "pope/f1_mean_llava",
            "pope/accuracy_llava",
            "pope/adversarial/f1_llava",
            "pope/random/precision_llava",
            "pope/popular/recall_llava",
            "pope/popular/accuracy_llava",
        ],
        True,
    ),
    (
        "pope",
        "lmms_eval",
        lambda: pope_rows(40, seed=3, p_odd=0.25),
        [
            "pope/f1_lmms_eval",
            "pope/accuracy_lmms_eval",
            "pope/precision_lmms_eval",
            "pope/recall_lmms_eval",
        ],
        True,
    ),
    (
        "mme",
        "llava15",
        lambda: mme_rows(0.1),
        ["mme/perception_mme_tool", "mme/cognition_mme_tool", "mme/existence_mme_tool"],
        True,
    ),
    (
        "mme",
        "lmms_eval",
        lambda: mme_rows(0.1, seed=4),
        ["mme/perception_lmms_eval", "mme/cognition_lmms_eval", "mme/OCR_lmms_eval"],
        True,
    ),
]


@pytest.mark.parametrize(("benchmark", "protocol", "make", "keys", "exact"), ORACLE_CASES)
def test_statistic_equals_score_on_resampled_rows(benchmark, protocol, make, keys, exact) -> None:
    rows = make()
    names = metrics_for(benchmark, protocol)
    full = score(benchmark, rows, protocol)
    rng = np.random.default_rng(7)
    for key in keys:
        prepared = _prepare(*_resolve(benchmark, key, names), rows)
        assert prepared is not None, key
        flat = sorted(i for units in prepared.members for unit in units for i in unit)
        assert len(flat) == len(set(flat)) and set(flat) <= set(range(len(rows)))
        sizes = [len(units) for units in prepared.members]
        identity = [np.arange(n) for n in sizes]
        constant = [np.zeros(n, dtype=int) for n in sizes]  # one unit drawn n times: 0/0 cases
        draws = [identity, constant] + [[rng.integers(0, n, n) for n in sizes] for _ in range(4)]
        for idx in draws:
            got = float(_statistic(prepared, [i[None, :] for i in idx])[0])
            resampled = _resampled_rows(rows, prepared.members, idx, rename=benchmark == "mme")
            want = score(benchmark, resampled, protocol)[key]
            assert got == (want if exact else pytest.approx(want, rel=1e-12, abs=1e-15)), key
        # The identity resample is the data itself.
        got = float(_statistic(prepared, [i[None, :] for i in identity])[0])
        assert got == (full[key] if exact else pytest.approx(full[key], rel=1e-12)), key


def test_statistic_is_vectorised_over_resamples() -> None:
    rows = pope_rows(30)
    prepared = _prepare(*_resolve("pope", "pope/f1_mean_llava", ("pope_llava",)), rows)
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(u), size=(5, len(u))) for u in prepared.members]  # S x [5, n]
    batch = _statistic(prepared, idx)
    one_by_one = [float(_statistic(prepared, [i[b : b + 1] for i in idx])[0]) for b in range(5)]
    assert batch.shape == (5,) and batch.tolist() == one_by_one


HEADLINE = [
    ("gqa", "llava15", lambda: gqa_rows(400), "gqa/accuracy_llava"),
    ("vqav2", "lmms_eval", lambda: vqa_rows(400), "vqav2/accuracy_lmms_eval_073"),
    ("textvqa", "lmms_eval", lambda: vqa_rows(400, seed=1), "textvqa/accuracy_m4c"),
    ("pope", "llava15", lambda: pope_rows(200), "pope/f1_mean_llava"),
    ("pope", "lmms_eval", lambda: pope_rows(200), "pope/f1_lmms_eval"),
    ("pope", "lmms_eval", lambda: pope_rows(200), "pope/accuracy_lmms_eval"),
    ("mme", "llava15", lambda: mme_rows(0.5), "mme/perception_mme_tool"),
    ("mme", "lmms_eval", lambda: mme_rows(0.5), "mme/cognition_lmms_eval"),
]


@pytest.mark.parametrize(("benchmark", "protocol", "make", "key"), HEADLINE)
def test_value_is_score_and_interval_brackets_it(benchmark, protocol, make, key) -> None:
    rows = make()
    value, low, high = metric_ci(benchmark, protocol, rows, key, n_boot=400)
    assert value == score(benchmark, rows, protocol)[key]
    assert low < value < high


def test_end_to_end_matches_loop_over_resampled_rows() -> None:
    """metric_ci against score() on every resample, drawn chunk by chunk and stratum by stratum
    as documented, percentiles by np.percentile."""
    n_boot = BOOTSTRAP_CHUNK + 9  # two chunks, the second partial
    for benchmark, protocol, rows, key in [
        ("pope", "llava15", pope_rows(25, seed=5), "pope/f1_mean_llava"),
        ("pope", "lmms_eval", pope_rows(25, seed=6, p_odd=0.3), "pope/f1_lmms_eval"),
        ("mme", "llava15", mme_rows(0.05, seed=7), "mme/perception_mme_tool"),
    ]:
        prepared = _prepare(*_resolve(benchmark, key, metrics_for(benchmark, protocol)), rows)
        sizes = [len(units) for units in prepared.members]
        rng = np.random.default_rng(11)
        stats = []
        for start in range(0, n_boot, BOOTSTRAP_CHUNK):
            chunk = min(BOOTSTRAP_CHUNK, n_boot - start)
            idx = [rng.integers(0, n, size=(chunk, n)) for n in sizes]
            for b in range(chunk):
                draw = [i[b] for i in idx]
                resampled = _resampled_rows(rows, prepared.members, draw, benchmark == "mme")
                stats.append(score(benchmark, resampled, protocol)[key])
        value, low, high = metric_ci(benchmark, protocol, rows, key, n_boot=n_boot, seed=11)
        assert value == score(benchmark, rows, protocol)[key]
        assert (low, high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=1e-12)


def test_mean_ci_matches_plain_loop_bootstrap() -> None:
    rows = gqa_rows(300, seed=8)
    scores = np.array(
        [gqa_accuracy(r["prediction"].strip(), r["answers"][0], variant="llava") for r in rows]
    )
    n, n_boot, seed = len(scores), 500, 3
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, n, size=(min(BOOTSTRAP_CHUNK, n_boot - start), n))
        means.extend(float(np.mean(scores[row])) for row in idx)
    want = np.percentile(means, [5.0, 95.0])
    value, low, high = metric_ci(
        "gqa", "llava15", rows, "gqa/accuracy_llava", n_boot=n_boot, confidence=0.9, seed=seed
    )
    assert value == pytest.approx(scores.mean())
    assert (low, high) == pytest.approx(tuple(want), abs=1e-12)


def test_mean_ci_agrees_with_scipy_bootstrap() -> None:
    stats = pytest.importorskip("scipy.stats")
    rows = vqa_rows(400, seed=9)
    _, low, high = metric_ci(
        "vqav2", "lmms_eval", rows, "vqav2/accuracy_lmms_eval_073", n_boot=4000, seed=1
    )
    scores = np.array([vqa_accuracy(r["prediction"].strip(), r["answers"]) for r in rows])
    res = stats.bootstrap(
        (scores,),
        np.mean,
        n_resamples=4000,
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(2),
    )
    width = high - low
    assert res.confidence_interval.low == pytest.approx(low, abs=0.1 * width)
    assert res.confidence_interval.high == pytest.approx(high, abs=0.1 * width)


def _tiled(rows: Rows, times: int) -> Rows:
    """``times`` copies of every row (MME images keep their pairs under a new image_id)."""
    out = []
    for t in range(times):
        for r in rows:
            meta = dict(r["meta"], image_id=f"{r['meta'].get('image_id')}~{t}")
            out.append(dict(r, sample_id=f"{r['sample_id']}~{t}", meta=meta))
    return out


@pytest.mark.parametrize(
    ("benchmark", "protocol", "rows", "key"),
    [
        ("gqa", "lmms_eval", gqa_rows(300), "gqa/accuracy_lmms_eval"),
        ("textvqa", "llava15", vqa_rows(300), "textvqa/accuracy_m4c"),
        ("pope", "llava15", pope_rows(100), "pope/f1_mean_llava"),
        ("pope", "lmms_eval", pope_rows(100), "pope/f1_lmms_eval"),
        ("mme", "llava15", mme_rows(0.5), "mme/perception_mme_tool"),
    ],
)
def test_interval_shrinks_like_one_over_sqrt_n(benchmark, protocol, rows, key) -> None:
    """Four copies of the data have the same empirical distribution and 4x the size, so the
    interval should be about half as wide (loose bounds: Monte Carlo noise, discreteness)."""
    v1, lo1, hi1 = metric_ci(benchmark, protocol, rows, key, n_boot=800)
    v4, lo4, hi4 = metric_ci(benchmark, protocol, _tiled(rows, 4), key, n_boot=800)
    assert v4 == pytest.approx(v1)
    assert 0.4 < (hi4 - lo4) / (hi1 - lo1) < 0.62


POPE_F1 = "pope/f1_mean_llava"


def _all_right(rows: Rows, yes: str, no: str) -> Rows:
    return [dict(r, prediction=yes if r["answers"][0].lower() == "yes" else no) for r in rows]


@pytest.mark.parametrize(
    ("benchmark", "protocol", "rows", "key"),
    [
        ("gqa", "llava15", gqa_rows(50, p_right=1.0), "gqa/accuracy_llava"),
        ("pope", "llava15", _all_right(pope_rows(20), "Yes.", "no, there is not"), POPE_F1),
        ("pope", "lmms_eval", _all_right(pope_rows(20), "yes", "NO"), "pope/f1_lmms_eval"),
        ("pope", "lmms_eval", pope_rows(20, p_odd=1.0), "pope/f1_lmms_eval"),  # all unparseable
        ("mme", "lmms_eval", _all_right(mme_rows(0.1), "Yes.", "No"), "mme/perception_lmms_eval"),
    ],
)
def test_constant_scores_give_a_point_interval(benchmark, protocol, rows, key) -> None:
    value, low, high = metric_ci(benchmark, protocol, rows, key, n_boot=200)
    assert low == high == value


def test_deterministic_for_a_seed() -> None:
    rows = mme_rows(0.3)
    key = "mme/perception_mme_tool"
    first = metric_ci("mme", "llava15", rows, key, n_boot=300, seed=5)
    assert metric_ci("mme", "llava15", rows, key, n_boot=300, seed=5) == first
    assert metric_ci("mme", "llava15", rows, key, n_boot=300, seed=6) != first


def test_unknown_key_raises() -> None:
    rows = pope_rows(10)
    with pytest.raises(KeyError, match="supported"):
        metric_ci("pope", "llava15", rows, "pope/f1_llava")  # pooled F1 is not a LLaVA result
    with pytest.raises(KeyError, match="supported"):
        metric_ci("pope", "lmms_eval", rows, "pope/f1_mean_llava")  # the other protocol's key
    with pytest.raises(KeyError, match="supported"):
        metric_ci("gqa", "llava15", gqa_rows(5), "accuracy")


@pytest.mark.parametrize(
    ("benchmark", "protocol", "rows", "key"),
    [
        ("pope", "llava15", pope_rows(10), "pope/yes_ratio_llava"),
        ("pope", "lmms_eval", pope_rows(10), "pope/unparseable_rate_lmms_eval"),
        ("pope", "lmms_eval", pope_rows(10), "pope/gt_yes_ratio_lmms_eval"),
        ("mme", "llava15", mme_rows(0.1), "mme/other_rate_mme_tool"),
        ("mme", "llava15", mme_rows(0.1), "mme/existence/acc_mme_tool"),
        ("gqa", "llava15", gqa_rows(10), "gqa/n_scored"),
    ],
)
def test_unsupported_existing_key_gives_nan_interval(benchmark, protocol, rows, key) -> None:
    value, low, high = metric_ci(benchmark, protocol, rows, key, n_boot=50)
    assert value == score(benchmark, rows, protocol)[key]
    assert math.isnan(low) and math.isnan(high)


def test_empty_and_unscored_rows() -> None:
    assert all(math.isnan(x) for x in metric_ci("pope", "llava15", [], "pope/f1_mean_llava"))
    unscored = [dict(r, answers=[]) for r in gqa_rows(5)]
    assert all(math.isnan(x) for x in metric_ci("gqa", "llava15", unscored, "gqa/accuracy_llava"))
    rows = pope_rows(30)
    key = "pope/f1_mean_llava"
    with_test_split = rows + [dict(r, answers=[]) for r in pope_rows(5, seed=1)]
    assert metric_ci("pope", "llava15", with_test_split, key) == metric_ci(
        "pope", "llava15", rows, key
    )


@pytest.mark.slow
def test_speed_full_size() -> None:
    """POPE (9,000 questions) and MME (2,374) at n_boot=1000, each well under 2 s."""
    for benchmark, protocol, rows, key in [
        ("pope", "llava15", pope_rows(3000), "pope/f1_mean_llava"),
        ("pope", "lmms_eval", pope_rows(3000), "pope/f1_lmms_eval"),
        ("mme", "llava15", mme_rows(1.0), "mme/perception_mme_tool"),
    ]:
        assert len(rows) in (9000, 2374)
        start = time.perf_counter()
        metric_ci(benchmark, protocol, rows, key, n_boot=1000)
        total = time.perf_counter() - start
        prepared = _prepare(*_resolve(benchmark, key, metrics_for(benchmark, protocol)), rows)
        start = time.perf_counter()
        _bootstrap(prepared, 1000, 0)
        resampling = time.perf_counter() - start
        print(f"{key}: {len(rows)} rows, {total:.3f} s total, {resampling:.3f} s resampling")
        assert total < 2.0
