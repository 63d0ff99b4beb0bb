"""Outlier rules against independent oracles: scikit-learn's LOF and numpy's percentiles."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from recomp_eval.methods.outliers import (
    count_from_ratio,
    iqr_outlier_fraction,
    lof_outlier_count,
    lof_outlier_fraction,
    lof_outlier_mask,
)


def sklearn_lof_mask(row: np.ndarray, k: int = 20) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lof = LocalOutlierFactor(n_neighbors=k, contamination="auto")
        return lof.fit_predict(row.reshape(-1, 1)) == -1


def tie_free_rows(rng: np.random.Generator, count: int, n: int) -> list[np.ndarray]:
    """Smooth, heavy-tailed and attention-like rows in float64 (no distance ties)."""
    rows = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            x = rng.normal(size=n)
        elif kind == 1:
            x = rng.standard_cauchy(size=n)
        else:
            logits = rng.standard_t(2, size=n) * 2.0
            x = np.exp(logits - logits.max())
            x /= x.sum()
        rows.append(x)
    return rows


def attention_rows_fp16(rng: np.random.Generator, count: int, n: int = 576) -> np.ndarray:
    """CLS-attention-like rows rounded to fp16, as the released code scores them: many ties."""
    rows = []
    for _ in range(count):
        logits = rng.standard_t(3, size=n) * rng.uniform(1.0, 3.0)
        x = np.exp(logits - logits.max())
        rows.append((x / x.sum()).astype(np.float16).astype(np.float32))
    return np.stack(rows)


def test_lof_equals_sklearn_on_tie_free_rows() -> None:
    rng = np.random.default_rng(0)
    rows = tie_free_rows(rng, 300, 576)
    values = torch.tensor(np.stack(rows))
    ours = lof_outlier_mask(values, 20).numpy()
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(ours[i], sklearn_lof_mask(row), err_msg=f"row {i}")


@pytest.mark.parametrize("k", [1, 5, 10, 20, 50])
def test_lof_equals_sklearn_for_small_and_ragged_rows(k: int) -> None:
    rng = np.random.default_rng(k)
    for n in (2, 3, 7, 21, 60):
        rows = tie_free_rows(rng, 6, n)
        values = torch.tensor(np.stack(rows))
        ours = lof_outlier_mask(values, k).numpy()
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(ours[i], sklearn_lof_mask(row, k), err_msg=f"n={n}")

    # ragged rows through the valid mask: each row's point set is its valid entries only
    rows = tie_free_rows(rng, 12, 80)
    values = torch.tensor(np.stack(rows))
    valid = torch.rand(12, 80, generator=torch.Generator().manual_seed(k)) < 0.6
    valid[0] = False
    valid[1, :] = False
    valid[1, 3] = True  # one valid entry: no LOF fit possible, zero outliers
    ours = lof_outlier_mask(values, k, valid=valid)
    frac = lof_outlier_fraction(values, k, valid=valid)
    for i, row in enumerate(rows):
        cols = valid[i].nonzero().flatten().numpy()
        expect = np.zeros(80, dtype=bool)
        if cols.size >= 2:
            expect[cols] = sklearn_lof_mask(row[cols], k)
        np.testing.assert_array_equal(ours[i].numpy(), expect)
        assert frac[i].item() == pytest.approx(expect.sum() / max(cols.size, 1))


def test_lof_tied_fp16_rows_disagreement_is_small() -> None:
    """With ties scikit-learn's KD-tree picks among equidistant neighbours in traversal order.

    Measured on 300 seeded fp16 attention-like rows of 576 values: about 15% of rows get a
    different outlier count, by 1 on average over differing rows and at most ~20 of 576. The
    bounds below leave a little room above those figures.
    """
    rng = np.random.default_rng(1)
    rows = attention_rows_fp16(rng, 300)
    ours = lof_outlier_count(torch.tensor(rows), 20).numpy()
    ref = np.array([sklearn_lof_mask(r).sum() for r in rows])
    diff = np.abs(ours - ref)
    assert (diff > 0).mean() <= 0.2, (diff > 0).mean()
    assert diff.mean() <= 1.0, diff.mean()
    assert diff.max() <= 40, diff.max()
    # the sklearn backend is exact by construction
    exact = lof_outlier_count(torch.tensor(rows[:40]), 20, backend="sklearn").numpy()
    np.testing.assert_array_equal(exact, ref[:40])


def test_lof_degenerate_rows() -> None:
    constant = torch.full((2, 50), 0.25)
    assert lof_outlier_count(constant).tolist() == [0, 0]
    assert sklearn_lof_mask(constant[0].numpy()).sum() == 0
    one = torch.tensor([[1.0]])
    assert lof_outlier_fraction(one).tolist() == [0.0]
    with pytest.raises(ValueError, match=r"\[B,N\]"):
        lof_outlier_mask(torch.ones(3))
    with pytest.raises(ValueError, match="lof_backend"):
        lof_outlier_mask(torch.ones(1, 4), backend="kdtree")  # type: ignore[arg-type]


def test_lof_batch_dtype_device() -> None:
    rng = np.random.default_rng(3)
    rows = torch.tensor(np.stack(tie_free_rows(rng, 8, 576))).float()
    batched = lof_outlier_mask(rows)
    for i in range(8):
        assert torch.equal(batched[i], lof_outlier_mask(rows[i : i + 1])[0])
    assert batched.device == rows.device and batched.dtype == torch.bool
    half = lof_outlier_count(rows.half())
    assert half.dtype == torch.int64


def test_iqr_fraction_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    values = rng.standard_t(2, size=(64, 576))
    ours = iqr_outlier_fraction(torch.tensor(values)).numpy()
    q1, q3 = np.percentile(values, [25, 75], axis=1)
    expect = (values > (q3 + 1.5 * (q3 - q1))[:, None]).mean(1)
    np.testing.assert_allclose(ours, expect, rtol=0, atol=0)
    valid = torch.tensor(rng.random((64, 576)) < 0.5)
    ours_masked = iqr_outlier_fraction(torch.tensor(values), valid).numpy()
    for i in range(64):
        v = values[i][valid[i].numpy()]
        q1, q3 = np.percentile(v, [25, 75])
        assert ours_masked[i] == pytest.approx((v > q3 + 1.5 * (q3 - q1)).mean(), abs=0)


def test_count_from_ratio_truncates_like_python_int() -> None:
    ratio = torch.tensor([148 / 576, 0.5, 0.0, 1.0], dtype=torch.float64)
    got = count_from_ratio(432, ratio).tolist()
    assert got == [int(432 * (148 / 576)), 216, 0, 432]
    assert got[0] == 110  # exact integer floor would give 111
    per_row = count_from_ratio(torch.tensor([576, 100, 10, 3]), ratio).tolist()
    assert per_row == [int(b * r) for b, r in zip([576, 100, 10, 3], ratio.tolist())]
