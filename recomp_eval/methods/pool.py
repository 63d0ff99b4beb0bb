"""Spatial pooling baseline: average (or strided selection) over the patch grid.

Pools the ``C``-wide ViT features **before** the projector (the projector is a nonlinear MLP, so
pooling after it would be a different method). ``[B,N,C] -> [B,C,H,W] -> pool -> raster flatten``.

* ``stride=s`` (default 2): ``avg_pool2d(s, s)``; s must divide H and W (24: 2/3/4/6 -> 144/64/36/16).
* ``retention=r``: an output grid ``h' x w'`` whose size is closest to
  ``T = budget_from_ratio(r, N)`` among grids with ``h' <= H``, ``w' <= W`` and aspect distortion
  ``max(h'W / w'H, w'H / h'W) <= max_aspect`` (so that e.g. T = 23 gives 4 x 6, not 1 x 23); ties go
  to the smaller distortion, then the smaller ``h'``. Pooled with ``adaptive_avg_pool2d`` (windows
  ``[floor(iH/h'), ceil((i+1)H/h'))``, overlapping when h' does not divide H). The achieved count is
  ``stats["n_tokens"]``, the request ``stats["n_requested"]``.
* ``mode="strided"``: no averaging, each window's top-left patch is kept (role KEPT, members = that
  patch); ``mode="avg"``: role POOLED, members = the window, source -1 (no single source patch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    VisionSignals,
    budget_from_ratio,
    check_options,
    check_retention,
)

DEFAULT_STRIDE = 2
DEFAULT_MAX_ASPECT = 2.0
MODES = ("avg", "strided")


@dataclass(frozen=True)
class PoolConfig:
    """``stride`` (fixed windows) or ``retention`` (adaptive grid); ``mode`` avg | strided."""

    stride: int | None = DEFAULT_STRIDE
    retention: float | None = None
    mode: Literal["avg", "strided"] = "avg"
    max_aspect: float = DEFAULT_MAX_ASPECT


def output_grid(t: int, grid: tuple[int, int], max_aspect: float) -> tuple[int, int]:
    """The ``(h', w')`` of at most ``grid`` closest to ``t`` cells (see module docstring)."""
    h, w = grid
    best = None
    for hp in range(1, h + 1):
        for wp in range(1, w + 1):
            distortion = max(hp * w / (wp * h), wp * h / (hp * w))
            if distortion > max_aspect + 1e-9:
                continue
            key = (abs(hp * wp - t), distortion, hp)
            if best is None or key < best[0]:
                best = (key, (hp, wp))
    return best[1]


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive-pool windows [start, end) along one axis (torch's rule)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def window_members(grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """[h'w', N] bool: the patches in each output cell's window (raster order both ways)."""
    h, w = grid
    rows = torch.zeros(out[0], h, dtype=torch.bool)  # [h',H]
    for i, (s, e) in enumerate(_windows(h, out[0])):
        rows[i, s:e] = True
    cols = torch.zeros(out[1], w, dtype=torch.bool)  # [w',W]
    for j, (s, e) in enumerate(_windows(w, out[1])):
        cols[j, s:e] = True
    cell = rows[:, None, :, None] & cols[None, :, None, :]  # [h',w',H,W]
    return cell.reshape(out[0] * out[1], h * w)  # [h'w',N]


def compress(signals: VisionSignals, cfg: PoolConfig) -> Compressed:
    """Pool or subsample the patch grid.

    Args:
        signals: features [B,N,C], grid (H, W).
        cfg: :class:`PoolConfig`.
    Returns:
        Compressed [B,h'w',C] raster order; stats n_tokens (and n_requested with retention).
    """
    signals.check_finite("features")
    x = signals.features
    b, n, c = x.shape
    h, w = signals.grid
    dev = x.device
    stats: dict[str, torch.Tensor] = {}
    if cfg.retention is not None:
        t = budget_from_ratio(cfg.retention, n)
        out = output_grid(t, (h, w), cfg.max_aspect)
        stats["n_requested"] = torch.full((b,), t, dtype=torch.int64, device=dev)
    else:
        s = cfg.stride
        if h % s or w % s:
            raise ValueError(f"pool stride {s} does not divide the {h}x{w} grid; use retention")
        out = (h // s, w // s)
    m = out[0] * out[1]
    cells = window_members((h, w), out).to(dev)  # [M,N]
    if cfg.mode == "avg":
        fmap = x.transpose(1, 2).reshape(b, c, h, w)  # [B,C,H,W]
        pooled = F.adaptive_avg_pool2d(fmap, out)  # [B,C,h',w']
        feats = pooled.flatten(2).transpose(1, 2)  # [B,M,C]
        source = torch.full((b, m), -1, dtype=torch.int64, device=dev)
        role, members = Role.POOLED, cells.expand(b, m, n)  # [B,M,N]
    else:
        first = cells.to(torch.int8).argmax(dim=1)  # [M] top-left patch of each window
        source = first.expand(b, m)  # [B,M]
        feats = x.gather(1, source.unsqueeze(-1).expand(b, m, c))  # [B,M,C]
        role = Role.KEPT
        members = torch.zeros(b, m, n, dtype=torch.bool, device=dev)
        members.scatter_(2, source.unsqueeze(-1), True)  # [B,M,N]
    lengths = torch.full((b,), m, dtype=torch.int64, device=dev)
    stats["n_tokens"] = lengths
    return Compressed(
        features=feats.contiguous(),
        lengths=lengths,
        source=source.contiguous(),
        role=torch.full((b, m), int(role), dtype=torch.int8, device=dev),
        members=members.contiguous(),
        stats=stats,
    )


def build(name: str = "pool", retention: float | None = None, **options: Any):
    """Build spatial pooling. Options: ``stride`` (int, default 2; not with retention), ``mode``
    (avg | strided), ``max_aspect`` (retention grids only)."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("stride", "mode", "max_aspect"))
    check_retention(retention)
    stride = options.get("stride")
    if retention is not None and stride is not None:
        raise ValueError(f"pool: give stride or retention, not both ({stride}, {retention})")
    if retention is None:
        stride = DEFAULT_STRIDE if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"pool: stride must be a positive int, got {stride!r}")
    mode = options.get("mode", "avg")
    if mode not in MODES:
        raise ValueError(f"pool: mode must be one of {MODES}, got {mode!r}")
    max_aspect = float(options.get("max_aspect", DEFAULT_MAX_ASPECT))
    if max_aspect < 1.0:
        raise ValueError(f"pool: max_aspect must be >= 1, got {max_aspect}")
    cfg = PoolConfig(stride=stride, retention=retention, mode=mode, max_aspect=max_aspect)
    return BuiltMethod(
        name=name, spec=SignalSpec(), fn=lambda s: compress(s, cfg), config=asdict(cfg)
    )
