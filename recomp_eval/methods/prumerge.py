"""PruMerge and PruMerge+ (arXiv 2403.15388; 42Shawn/LLaVA-PruMerge), batched.

Adaptive budget (``retention=None``, the released behaviour), per sample:

1. ``a`` = CLS attention of the last ViT layer with the heads concatenated into one ``C``-wide head
   (``SignalSpec.cls_attn="concat_heads"``, layer -1), patch columns only.
2. ``ratio`` = fraction of ``a`` above ``Q3 + 1.5 IQR`` (per sample; the release flattens the
   batch), ``k = int(N * ratio)``. **Fallback**: a row with no outlier (``k == 0``, degenerate
   attention) uses the release's non-adaptive path, ``ratio = fallback_ratio`` (1/8) and, for
   PruMerge+, no spatial fill; ``stats["fallback"]`` flags it.
3. Centres = top-``k`` patches by ``a`` in attention order. PruMerge+ appends the lattice patches
   ``0, s, 2s, ... < N - 1`` with ``s = int(1 / ratio) // 3`` that are not already centres, in
   raster order (``s == 0``, i.e. ratio > 1/3, adds nothing; the release crashes there).
4. Each centre absorbs its ``n_neighbors`` nearest other patches by cosine of the full last-layer
   keys (grid-indexed), ``x_i + sum a_j x_j`` with raw weights (:func:`merge_neighbours`).
5. One summary token ``sum a_j x_j`` over the non-centre patches, appended last.

Output: ``[centres (attention order, then fill in raster order), summary]``, right-padded to a
static width (no host sync): ``N + 1`` for PruMerge+, ``max(N - 1 - floor(0.75 (N - 1)),
int(N * fallback_ratio)) + 1`` (145 at N = 576) for PruMerge.

Fixed budget (``retention=r``, a harness definition): ``T = budget_from_ratio(r, N)`` tokens in
total, **the summary counts as one of them**: ``T - 1`` centres + summary (``T = 1``: summary of
all patches only). PruMerge takes the top ``T - 1`` patches by ``a``; PruMerge+ takes
``min(k_iqr, T - 1)`` top patches (its adaptive count) and fills the other slots spatially: lattice
``0, s, 2s, ... < N - 1`` with ``s = max(1, (N - 1) // need)``, non-centre lattice patches first in
raster order, then (if the top-k covered lattice points) the remaining patches in raster order;
the chosen fill is output in raster order.
``T = N`` is the identity (all patches, raster order). Fixed outputs have width exactly ``T``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    VisionSignals,
    budget_from_ratio,
    check_options,
    check_retention,
    selection_output,
)
from recomp_eval.methods.merge_utils import merge_neighbours, weighted_summary
from recomp_eval.methods.outliers import count_from_ratio, iqr_outlier_fraction

NAMES = ("prumerge", "prumerge_plus")
FILL_DIVISOR = 3  # PruMerge+: lattice stride = int(1 / ratio) // 3
Q3 = 0.75  # upper quartile of the IQR rule (bounds the adaptive count)


@dataclass(frozen=True)
class PruMergeConfig:
    """``plus``: PruMerge+ spatial fill. ``retention``: None = adaptive IQR budget, else fixed
    ``T``. ``n_neighbors``: keys merged into each centre. ``fallback_ratio``: ratio for rows with
    no IQR outlier (the release's non-adaptive default)."""

    plus: bool = False
    retention: float | None = None
    n_neighbors: int = 32
    fallback_ratio: float = 1 / 8


SPEC = SignalSpec(cls_attn="concat_heads", cls_attn_layer=-1, keys="full", keys_layer=-1)


def _inverse_rank(order: torch.Tensor) -> torch.Tensor:
    """[B,N] position of every patch in ``order`` [B,N] (inverse permutation)."""
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)  # [B,N]
    return torch.empty_like(order).scatter_(1, order, ar)  # [B,N]


def _adaptive_count(a: torch.Tensor, cfg: PruMergeConfig) -> tuple[torch.Tensor, ...]:
    """IQR ratio [B] float64, count k [B] int64 and fallback flag [B] bool for CLS attention a."""
    n = a.shape[1]
    ratio = iqr_outlier_fraction(a)  # [B]
    k = count_from_ratio(n, ratio)  # [B]
    fallback = k == 0
    fb = torch.full_like(ratio, cfg.fallback_ratio)
    ratio = torch.where(fallback, fb, ratio)
    k = torch.where(fallback, count_from_ratio(n, fb), k)
    return ratio, k, fallback


def _max_adaptive_count(n: int, cfg: PruMergeConfig) -> int:
    """Static upper bound on the adaptive top-k count, so outputs need no host sync.

    Values above ``Q3 + 1.5 IQR >= Q3 >= v_lo`` (``v`` sorted, ``lo = floor(0.75 (n - 1))``) sit at
    sorted positions ``> lo``: at most ``n - 1 - lo`` of them (144 of 576); the fallback adds
    ``int(n * fallback_ratio)``.
    """
    iqr_max = n - 1 - math.floor(Q3 * (n - 1))
    return min(n, max(iqr_max, int(n * cfg.fallback_ratio)))


def _fill_mask(
    is_top: torch.Tensor, stride: torch.Tensor, need: torch.Tensor | None
) -> torch.Tensor:
    """[B,N] bool spatial-fill patches.

    Lattice = ``p % stride == 0 and p < N - 1`` (stride [B], 0 = no lattice). ``need`` None:
    every lattice patch not in ``is_top``. ``need`` [B]: exactly ``need`` non-top patches,
    lattice first then the rest, each in raster order.
    """
    b, n = is_top.shape
    p = torch.arange(n, device=is_top.device).expand(b, n)  # [B,N]
    lattice = (p % stride.clamp(min=1)[:, None] == 0) & (p < n - 1) & (stride > 0)[:, None]
    if need is None:
        return lattice & ~is_top
    key = torch.where(is_top, 3 * n, torch.where(lattice, p, n + p))  # [B,N] top-k last
    pos = _inverse_rank(key.argsort(dim=1, stable=True))  # [B,N]
    return ~is_top & (pos < need[:, None])


def compress(signals: VisionSignals, cfg: PruMergeConfig) -> Compressed:
    """PruMerge / PruMerge+ on one batch.

    Args:
        signals: features [B,N,C], cls_attn [B,N] (concat-heads, last layer), keys [B,N,C] (full
            last-layer ``k_proj`` output, patch rows).
        cfg: :class:`PruMergeConfig`.
    Returns:
        Compressed [B,M,C], M = static bound + 1 (adaptive) or T (fixed); stats n_tokens, n_attention,
        n_fill, n_summary, fallback, iqr_ratio (when computed), n_requested (fixed).
    """
    method = "prumerge_plus" if cfg.plus else "prumerge"
    signals.require("cls_attn", "keys", method=method)
    signals.check_finite("features", "cls_attn", "keys")
    x, a, keys = signals.features, signals.cls_attn, signals.keys
    b, n, _ = x.shape
    dev = x.device
    stats: dict[str, torch.Tensor] = {}
    if cfg.retention is not None:
        t = budget_from_ratio(cfg.retention, n)
        stats["n_requested"] = torch.full((b,), t, dtype=torch.int64, device=dev)
        if t == n:  # identity: every patch in raster order
            out = selection_output(x, torch.arange(n, device=dev).expand(b, n), Role.KEPT)
            out.stats = {**stats, "n_tokens": out.lengths.clone()}
            return out

    order = a.argsort(dim=1, descending=True, stable=True)  # [B,N] attention order
    rank = _inverse_rank(order)  # [B,N]
    zeros = torch.zeros(b, dtype=torch.int64, device=dev)
    if cfg.retention is None or cfg.plus:
        ratio, k_iqr, fallback = _adaptive_count(a, cfg)
        stats["iqr_ratio"], stats["fallback"] = ratio, fallback
    if cfg.retention is None:
        width, k_att = (n if cfg.plus else _max_adaptive_count(n, cfg)), k_iqr  # static bound
        if cfg.plus:
            step = torch.floor(1.0 / ratio).to(torch.int64)  # [B] int(1 / ratio)
            stride = torch.where(fallback, zeros, step // FILL_DIVISOR)  # [B]
            fill = _fill_mask(rank < k_att[:, None], stride, None)  # [B,N]
    else:
        width = t - 1
        k_att = torch.clamp(k_iqr, max=width) if cfg.plus else torch.full_like(zeros, width)
        if cfg.plus:
            need = width - k_att  # [B]
            stride = torch.clamp((n - 1) // need.clamp(min=1), min=1)  # [B]
            fill = _fill_mask(rank < k_att[:, None], stride, need)  # [B,N]
    is_top = rank < k_att[:, None]  # [B,N]
    if not cfg.plus:
        fill = torch.zeros_like(is_top)
    n_fill = fill.sum(-1)  # [B]
    n_centres = k_att + n_fill  # [B]

    p = torch.arange(n, device=dev).expand(b, n)  # [B,N]
    centre_key = torch.where(is_top, rank, torch.where(fill, n + p, 2 * n + p))  # [B,N]
    centres = centre_key.argsort(dim=1)[:, :width]  # [B,K] attention order, then fill
    row = torch.arange(width, device=dev)[None, :]  # [1,K]
    centre_valid = row < n_centres[:, None]  # [B,K]
    merged, members = merge_neighbours(x, keys, a, centres, centre_valid, cfg.n_neighbors)

    pruned = ~(is_top | fill)  # [B,N]
    summary = weighted_summary(x, a, pruned)  # [B,C]
    m = width + 1
    out_row = torch.arange(m, device=dev)[None, :]  # [1,M]
    at_summary = out_row == n_centres[:, None]  # [B,M]
    pad = merged.new_zeros(b, 1, merged.shape[-1])  # [B,1,C]
    feats = torch.cat([merged, pad], dim=1)  # [B,M,C]
    feats = torch.where(at_summary.unsqueeze(-1), summary.unsqueeze(1), feats)  # [B,M,C]
    mem = torch.cat([members, members.new_zeros(b, 1, n)], dim=1)  # [B,M,N]
    mem = torch.where(at_summary.unsqueeze(-1), pruned.unsqueeze(1), mem)  # [B,M,N]
    is_centre_row = out_row < n_centres[:, None]  # [B,M]
    src = torch.cat([centres, centres.new_full((b, 1), -1)], dim=1)  # [B,M]
    src = torch.where(is_centre_row, src, torch.full_like(src, -1))
    role = torch.where(is_centre_row, int(Role.KEPT), int(Role.PAD))  # [B,M] fill rows KEPT
    role = torch.where(out_row < k_att[:, None], int(Role.ATTENTION), role)
    role = torch.where(at_summary, int(Role.SUMMARY), role).to(torch.int8)  # [B,M]
    lengths = n_centres + 1
    stats.update(n_tokens=lengths, n_attention=k_att, n_fill=n_fill, n_summary=lengths.new_ones(b))
    if "fallback" not in stats:
        stats["fallback"] = torch.zeros(b, dtype=torch.bool, device=dev)
    return Compressed(feats, lengths, src, role, mem, stats)


def build(name: str = "prumerge", retention: float | None = None, **options: Any):
    """Build PruMerge (``name="prumerge"``) or PruMerge+ (``name="prumerge_plus"``)."""
    from recomp_eval.methods import BuiltMethod

    if name not in NAMES:
        raise ValueError(f"prumerge.build handles {NAMES}, got '{name}'")
    check_options(name, options, ("n_neighbors", "fallback_ratio"))
    check_retention(retention)
    cfg = PruMergeConfig(plus=name == "prumerge_plus", retention=retention, **options)
    if cfg.n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {cfg.n_neighbors}")
    if not 0.0 < cfg.fallback_ratio <= 1.0:
        raise ValueError(f"fallback_ratio must be in (0, 1], got {cfg.fallback_ratio}")
    return BuiltMethod(
        name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg), llm=None
    )
