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


def _lof_mask_window(
    values: torch.Tensor, n_neighbors: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[B,N] bool LOF outliers of 1-D rows (scikit-learn ``contamination="auto"`` semantics).

    In 1-D the k nearest other points of a value are a contiguous run of the sorted row: the
    ``l`` nearest on its left and the ``k - l`` nearest on its right, where ``l`` counts the
    ``j`` with ``L_j <= R_(k-1-j)`` (``L``/``R``: ascending distances to the left/right
    neighbours). No pairwise matrix and no per-point sort: O(N log N + N k) per row instead of
    O(N^2). The LOF is ``sum(lrd of neighbours) / (k * lrd)`` (scikit-learn averages the
    ratios; same value up to the last bit). k' = max(1, min(k, n - 1)); rows with fewer than two valid entries have no outliers.
    Among equidistant neighbours the left (lower) one wins: of the simple rules tried this one
    disagreed least with scikit-learn's KD-tree on tied fp16 scores (tests/test_outliers.py).

    Args:
        values: [B,N] scores (computed in float64). n_neighbors: LOF k.
        valid: [B,N] bool point-set membership (ragged rows); default all.
    """
    b, n = values.shape
    device = values.device
    if n < 2:
        return torch.zeros(b, n, dtype=torch.bool, device=device)
    inf = float("inf")
    k = min(n_neighbors, n - 1)
    x = values.double() if valid is None else values.double().masked_fill(~valid, inf)
    xs, order = x.sort(dim=-1, stable=True)  # [B,N] invalid entries last
    pad = xs.new_full((b, k), inf)  # [B,k]
    window = torch.cat([-pad, xs, pad], dim=1).unfold(1, 2 * k + 1, 1)  # [B,N,2k+1] view
    # both[..., j]: j < k the left neighbours, farthest first (distance L_(k-1-j)); j >= k the
    # right neighbours, nearest first (R_(j-k))
    both = torch.cat([xs[..., None] - window[..., :k], window[..., k + 1 :] - xs[..., None]], -1)
    left_desc, right = both[..., :k], both[..., k:]  # [B,N,k] each

    j = torch.arange(k, device=device)  # [k]
    i = torch.arange(n, device=device)[:, None]  # [N,1]
    pos_table = torch.cat([i - k + j, i + 1 + j], dim=1).clamp(0, n - 1)  # [N,2k] sorted pos
    if valid is None:
        k_row = k  # every row has n > k points
        take_left = left_desc <= right  # [B,N,k] L_(k-1-j) <= R_j: the left count is the sum
    else:
        n_valid = valid.sum(-1)  # [B]
        k_row = (n_valid - 1).clamp(min=1, max=k)[:, None, None]  # [B,1,1]
        mirror = (j + k_row - k).clamp(min=0).expand(b, n, k)  # [B,N,k]
        take_left = (left_desc <= right.gather(-1, mirror)) & (j >= k - k_row)  # [B,N,k]
    n_left = take_left.sum(-1, keepdim=True)  # [B,N,1] neighbours taken from the left
    slot = torch.where(j < n_left, k - 1 - j, k + j - n_left)  # [B,N,k] column of `both`
    knn_dist = both.gather(-1, slot)  # [B,N,k]
    knn = pos_table.expand(b, n, 2 * k).gather(-1, slot).reshape(b, -1)  # [B,N*k] sorted pos
    slot_ok = None if valid is None else (j < k_row)  # [B,1,k]
    if slot_ok is not None:
        knn_dist = knn_dist.masked_fill(~slot_ok, 0.0)

    k_dist = knn_dist.amax(-1)  # [B,N] distance to the k'-th neighbour
    reach = torch.maximum(knn_dist, k_dist.gather(1, knn).view(b, n, k))  # [B,N,k]
    if slot_ok is not None:
        reach = reach.masked_fill(~slot_ok, 0.0)
    kf = float(k) if valid is None else k_row.double()[..., 0]  # [B,1]
    lrd = 1.0 / (reach.sum(-1) / kf + LRD_EPS)  # [B,N]
    neigh_lrd = lrd.gather(1, knn).view(b, n, k)  # [B,N,k]
    if slot_ok is not None:
        neigh_lrd = neigh_lrd.masked_fill(~slot_ok, 0.0)
    out_sorted = neigh_lrd.sum(-1) / (kf * lrd) > LOF_THRESHOLD  # [B,N] mean lrd ratio
    if valid is not None:
        row_ok = torch.arange(n, device=device)[None, :] < n_valid[:, None]  # [B,N]
        out_sorted = out_sorted & row_ok & (n_valid >= 2)[:, None]
    return torch.zeros_like(out_sorted).scatter_(1, order, out_sorted)  # [B,N] original order


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
    checked = _valid_mask(values, valid)
    if backend == "torch":
        return _lof_mask_window(values, n_neighbors, valid)  # full rows take the fast path
    if backend == "sklearn":
        return _lof_mask_sklearn(values, n_neighbors, checked)
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
