"""Outlier-count rules that set adaptive budgets: 1-D LOF (RC) and the IQR fence (PruMerge).

Everything here is batched over rows ``[B,N]``, runs on the input's device and never reads a value
back to the host, except the ``sklearn`` LOF backend, which exists for bit-parity with the released
RC code (it calls scikit-learn once per row on the CPU).

LOF follows scikit-learn's ``LocalOutlierFactor(n_neighbors=k, contamination="auto")`` on the
values of a row treated as 1-D points (method.md section 2):

* ``k' = max(1, min(k, n - 1))`` with ``n`` the number of valid entries of the row;
* ``kdist(p)`` = distance to the k'-th nearest other point;
  ``reach(p, o) = max(kdist(o), |x_p - x_o|)``;
* ``lrd(p) = 1 / (mean_o reach(p, o) + 1e-10)``; ``LOF(p) = mean_o lrd(o) / lrd(p)``;
* outlier iff ``LOF(p) > 1.5``.

It equals scikit-learn exactly when no two pairwise distances of a row tie. With ties (fp16 scores)
scikit-learn's KD-tree picks among equidistant neighbours in traversal order, which a dense
implementation cannot reproduce; ``tests/test_outliers.py`` measures and bounds the disagreement.
"""

from __future__ import annotations

from typing import Literal

import torch

LOF_THRESHOLD = 1.5  # contamination="auto" sets offset_ = -1.5; outlier iff LOF > 1.5
LRD_EPS = 1e-10  # scikit-learn's guard in the reachability density

LOFBackend = Literal["torch", "sklearn"]


def _valid_mask(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if values.dim() != 2:
        raise ValueError(f"outlier rules take [B,N] rows, got shape {tuple(values.shape)}")
    if valid is None:
        return torch.ones_like(values, dtype=torch.bool)
    if valid.shape != values.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool mask of shape {tuple(values.shape)}, got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    return valid


def _window_offsets(k: int, device: torch.device) -> torch.Tensor:
    """Rank offsets of the 2k neighbour candidates of a point in a sorted row.

    Left side first: with a stable sort on distance, an equidistant neighbour with the lower value
    wins. Of the simple rules tried this one disagreed least with scikit-learn's KD-tree on tied
    fp16 attention scores (see tests/test_outliers.py).
    """
    left = torch.arange(-k, 0, device=device)
    right = torch.arange(1, k + 1, device=device)
    return torch.cat([left, right])  # [2k]


def lof_scores(
    values: torch.Tensor, n_neighbors: int = 20, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Local outlier factor of every entry, rows treated as independent 1-D point sets.

    In 1-D the k nearest neighbours of a point lie within k ranks of it in sorted order, so each
    row is sorted once and only 2k candidates per point are scored: O(N k) memory, not O(N^2).

    Args:
        values: [B,N] scores (any float dtype; computed in float64).
        n_neighbors: k of scikit-learn's LocalOutlierFactor.
        valid: [B,N] bool, entries that belong to the row's point set (ragged rows); default all.

    Returns:
        [B,N] float64 LOF values; 0 at invalid entries and in rows with fewer than 2 valid entries.
    """
    valid = _valid_mask(values, valid)
    b, n = values.shape
    if n < 2:
        return torch.zeros_like(values, dtype=torch.float64)
    device = values.device
    x = values.to(torch.float64).masked_fill(~valid, float("inf"))  # invalid sort last
    xs, perm = x.sort(dim=-1, stable=True)  # [B,N] sorted values, perm: rank -> index
    n_valid = valid.sum(-1)  # [B]
    k_max = min(n_neighbors, n - 1)
    # per-row k' = max(1, min(k, n_valid - 1)); rows with n_valid < 2 are zeroed at the end
    k_row = (n_valid - 1).clamp(min=1, max=k_max)  # [B]

    cand = torch.arange(n, device=device)[:, None] + _window_offsets(k_max, device)  # [N,2k]
    in_range = (cand >= 0) & (cand < n)  # [N,2k]
    cand = cand.clamp(0, n - 1)
    cand_b = cand.expand(b, n, 2 * k_max)  # [B,N,2k] candidate ranks
    cand_x = xs.gather(1, cand_b.reshape(b, -1)).view(b, n, 2 * k_max)  # [B,N,2k]
    dist = (cand_x - xs[:, :, None]).abs()  # [B,N,2k]
    dist = dist.nan_to_num(nan=float("inf")).masked_fill(~in_range, float("inf"))
    knn_dist, order = dist.sort(dim=-1, stable=True)  # [B,N,2k]
    knn_dist = knn_dist[..., :k_max]  # [B,N,k]
    knn = cand_b.gather(-1, order[..., :k_max])  # [B,N,k] neighbour ranks
    slot_ok = torch.arange(k_max, device=device)[None, :] < k_row[:, None]  # [B,k]
    slot_ok = slot_ok[:, None, :].expand(b, n, k_max)  # [B,N,k]

    kth = (k_row - 1).view(b, 1, 1).expand(b, n, 1)  # [B,N,1]
    k_dist = knn_dist.gather(-1, kth).squeeze(-1)  # [B,N] distance to the k'-th neighbour
    neigh_k_dist = k_dist.gather(1, knn.reshape(b, -1)).view(b, n, k_max)  # [B,N,k]
    reach = torch.maximum(knn_dist, neigh_k_dist).masked_fill(~slot_ok, 0.0)  # [B,N,k]
    kf = k_row.to(torch.float64)[:, None, None]  # [B,1,1]
    lrd = 1.0 / (reach.sum(-1) / kf[..., 0] + LRD_EPS)  # [B,N]
    neigh_lrd = lrd.gather(1, knn.reshape(b, -1)).view(b, n, k_max)  # [B,N,k]
    # scikit-learn averages the ratios lrd(o)/lrd(p), not the lrds
    lof_sorted = ((neigh_lrd / lrd[:, :, None]).masked_fill(~slot_ok, 0.0) / kf).sum(-1)  # [B,N]
    lof = torch.empty_like(lof_sorted).scatter_(1, perm, lof_sorted)  # [B,N] back to index order
    keep = valid & (n_valid >= 2)[:, None]  # [B,N]
    return torch.where(keep & torch.isfinite(lof), lof, torch.zeros_like(lof))


def _lof_mask_sklearn(values: torch.Tensor, n_neighbors: int, valid: torch.Tensor) -> torch.Tensor:
    """Reference backend: scikit-learn per row on the CPU (host round trip by design)."""
    import numpy as np
    from sklearn.neighbors import LocalOutlierFactor

    x = values.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # the released code hands scikit-learn float32-cast fp16 scores
    x_np = x.cpu().numpy()
    valid_np = valid.cpu().numpy()
    out = np.zeros(x_np.shape, dtype=bool)
    for row in range(x_np.shape[0]):
        cols = np.flatnonzero(valid_np[row])
        if cols.size < 2:
            continue
        lof = LocalOutlierFactor(n_neighbors=n_neighbors, contamination="auto")
        import warnings

        with warnings.catch_warnings():
            # exact duplicates make scikit-learn warn; the count is still what the release gets
            warnings.simplefilter("ignore", UserWarning)
            labels = lof.fit_predict(x_np[row, cols].reshape(-1, 1))
        out[row, cols] = labels == -1
    return torch.from_numpy(out).to(values.device)


def lof_outlier_mask(
    values: torch.Tensor,
    n_neighbors: int = 20,
    valid: torch.Tensor | None = None,
    backend: LOFBackend = "torch",
) -> torch.Tensor:
    """[B,N] bool: entries scikit-learn's LOF (contamination="auto") labels as outliers.

    Args:
        values: [B,N] scores.
        n_neighbors: LOF k.
        valid: [B,N] bool point-set membership per row (default: all entries).
        backend: ``torch`` (batched, on device) or ``sklearn`` (CPU, exact parity on ties).
    """
    valid = _valid_mask(values, valid)
    if backend == "torch":
        return (lof_scores(values, n_neighbors, valid) > LOF_THRESHOLD) & valid
    if backend == "sklearn":
        return _lof_mask_sklearn(values, n_neighbors, valid)
    raise ValueError(f"unknown lof_backend '{backend}'; use 'torch' or 'sklearn'")


def lof_outlier_count(
    values: torch.Tensor,
    n_neighbors: int = 20,
    valid: torch.Tensor | None = None,
    backend: LOFBackend = "torch",
) -> torch.Tensor:
    """[B] int64 number of LOF outliers per row."""
    return lof_outlier_mask(values, n_neighbors, valid, backend).sum(-1)


def lof_outlier_fraction(
    values: torch.Tensor,
    n_neighbors: int = 20,
    valid: torch.Tensor | None = None,
    backend: LOFBackend = "torch",
) -> torch.Tensor:
    """[B] float64 fraction of a row's valid entries that LOF labels as outliers.

    Equals ``mean(LocalOutlierFactor(n_neighbors, contamination="auto").fit_predict(row) == -1)``.
    Rows with fewer than two valid entries give 0 (scikit-learn cannot fit them).
    """
    valid = _valid_mask(values, valid)
    count = lof_outlier_count(values, n_neighbors, valid, backend).to(torch.float64)  # [B]
    return count / valid.sum(-1).clamp(min=1).to(torch.float64)


def _quantile_masked(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile with linear interpolation (numpy default) over valid entries.

    Args:
        x: [B,N] float64. valid: [B,N] bool.
    Returns:
        [B] float64.
    """
    n_valid = valid.sum(-1)  # [B]
    filled = x.masked_fill(~valid, float("inf"))
    ordered = filled.sort(dim=-1).values  # [B,N] valid entries first
    pos = q * (n_valid - 1).clamp(min=0).to(torch.float64)  # [B]
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n_valid - 1).clamp(min=0))
    lo_v = ordered.gather(-1, lo[:, None]).squeeze(-1)  # [B]
    hi_v = ordered.gather(-1, hi[:, None]).squeeze(-1)  # [B]
    frac = pos - lo.to(torch.float64)
    # numpy's lerp form: lo + (hi - lo) * frac
    return lo_v + (hi_v - lo_v) * frac


def iqr_outlier_fraction(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B] float64 fraction of entries above ``Q3 + 1.5 * (Q3 - Q1)`` (PruMerge's rule).

    Quartiles are per row with linear interpolation (``numpy.percentile`` default); the lower fence
    is not used, as in PruMerge.
    """
    valid = _valid_mask(values, valid)
    x = values.to(torch.float64)
    q1 = _quantile_masked(x, valid, 0.25)  # [B]
    q3 = _quantile_masked(x, valid, 0.75)  # [B]
    fence = q3 + 1.5 * (q3 - q1)  # [B]
    above = (x > fence[:, None]) & valid  # [B,N]
    return above.sum(-1).to(torch.float64) / valid.sum(-1).clamp(min=1).to(torch.float64)


def count_from_ratio(base: int | torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``int(base * ratio)`` in float64, truncating, as the released code counts tokens.

    Args:
        base: int or [B] tensor (e.g. N, N - K_v, or the feature width).
        ratio: [B] outlier fraction.
    Returns:
        [B] int64.
    """
    base_t = torch.as_tensor(base, dtype=torch.float64, device=ratio.device)
    return torch.floor(base_t * ratio.to(torch.float64)).to(torch.int64)
