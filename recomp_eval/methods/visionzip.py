"""VisionZip (arXiv 2412.04467; dvlab-research/VisionZip): dominant + contextual tokens, batched.

Per sample, with ``D`` dominant tokens (CLS included) and ``C`` contextual tokens:

1. Dominant: ``s`` = head-mean CLS attention of ViT layer -2 over the patches (VisionZip sums over
   heads: same ranking); keep the top ``D - 1`` patches **plus the CLS row** of the feature layer,
   gathered in index order (CLS first, then raster).
2. Contextual over the remaining ``R = N - (D - 1)`` patches in raster order: normalise their
   ``metric`` (layer -2 keys averaged over heads); targets are rest positions
   ``0, step, 2 step, ...`` (first ``C``) with ``step = max(1, R // C)``; every other rest patch
   joins the target with the highest cosine (first on ties); ``ctx_c = h(target_c) +
   mean(h of its members)`` (count clamped to >= 1).
3. Output ``[CLS, dominant patches, contextual]`` (width ``D + C``), before the projector.

Settings: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (``dominant`` counts CLS).
``retention=r`` (a harness definition): ``T = budget_from_ratio(r, N)``,
``C = floor(T * contextual_share + 0.5)`` with ``contextual_share = 10 / 64`` (the published
proportion: exactly 10/20/30 at T = 64/128/192), ``D = T - C``. ``T = N`` is the identity (all
patches, raster order, no CLS) so that a retention sweep ends at the vanilla model.
"""

from __future__ import annotations

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
    gather_rows,
    selection_output,
)

DEFAULT_DOMINANT = 54  # the 64-token setting: 54 dominant (CLS included) + 10 contextual
DEFAULT_CONTEXTUAL = 10
CONTEXTUAL_SHARE = 10 / 64  # C / T of every published setting

SPEC = SignalSpec(
    cls_attn="mean_heads", cls_attn_layer=-2, keys="mean_heads", keys_layer=-2, cls_feature=True
)


@dataclass(frozen=True)
class VisionZipConfig:
    """Either a setting (``dominant`` incl. CLS, ``contextual``) or ``retention`` (fixed total T
    split by ``contextual_share``)."""

    dominant: int | None = DEFAULT_DOMINANT
    contextual: int | None = DEFAULT_CONTEXTUAL
    retention: float | None = None
    contextual_share: float = CONTEXTUAL_SHARE


def split_budget(cfg: VisionZipConfig, n: int) -> tuple[int, int]:
    """(D, C) for ``n`` patches; raises if the setting does not fit."""
    if cfg.retention is not None:
        t = budget_from_ratio(cfg.retention, n)
        c = int(t * cfg.contextual_share + 0.5)
        return t - c, c
    d, c = cfg.dominant, cfg.contextual
    if d - 1 > n or c > n - (d - 1):
        raise ValueError(f"VisionZip dominant={d} (incl. CLS) + contextual={c} exceeds N={n}")
    return d, c


def _contextual(
    hidden: torch.Tensor, metric: torch.Tensor, c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contextual tokens from the rest set.

    Args:
        hidden: [B,R,C] rest features (raster order). metric: [B,R,Ck] rest keys. c: targets.
    Returns:
        ctx [B,c,C], target positions [c] (into the rest set), assign [B,R,c] bool (member of).
    """
    r = hidden.shape[1]
    step = max(1, r // c)
    target_list = list(range(0, r, step))[:c]  # static: depends on R and c only
    other_list = sorted(set(range(r)) - set(target_list))
    targets = torch.tensor(target_list, dtype=torch.int64, device=hidden.device)  # [c]
    others = torch.tensor(other_list, dtype=torch.int64, device=hidden.device)  # [R-c]
    c = len(target_list)  # fewer than requested only if R < c
    mn = metric / metric.norm(dim=-1, keepdim=True)  # [B,R,Ck]
    sim = mn[:, others] @ mn[:, targets].transpose(1, 2)  # [B,R-c,c]
    choice = sim.argmax(dim=2)  # [B,R-c]
    onehot = torch.zeros(*choice.shape, c, dtype=hidden.dtype, device=hidden.device)
    onehot.scatter_(2, choice.unsqueeze(-1), 1)  # [B,R-c,c]
    counts = onehot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B,c,1]
    agg = onehot.transpose(1, 2) @ hidden[:, others] / counts  # [B,c,C]
    ctx = hidden[:, targets] + agg  # [B,c,C]
    assign = torch.zeros(hidden.shape[0], r, c, dtype=torch.bool, device=hidden.device)
    assign[:, others] = onehot.bool()
    assign[:, targets] |= torch.eye(c, dtype=torch.bool, device=hidden.device)
    return ctx, targets, assign


def compress(signals: VisionSignals, cfg: VisionZipConfig) -> Compressed:
    """VisionZip on one batch.

    Args:
        signals: features [B,N,C] (layer -2, patches), cls_feature [B,C] (layer -2 CLS row),
            cls_attn [B,N] (head-mean, layer -2), keys [B,N,Ck] (head-mean keys, layer -2).
        cfg: :class:`VisionZipConfig`.
    Returns:
        Compressed [B,D+C,C]: CLS, dominant patches (raster), contextual; stats n_tokens,
        n_dominant (incl. CLS), n_contextual, n_requested (retention mode).
    """
    signals.require("cls_attn", "keys", "cls_feature", method="visionzip")
    signals.check_finite("features", "cls_attn", "keys", "cls_feature")
    x, a = signals.features, signals.cls_attn
    b, n, _ = x.shape
    dev = x.device
    d, c = split_budget(cfg, n)

    def full(v: int) -> torch.Tensor:
        return torch.full((b,), v, dtype=torch.int64, device=dev)

    if cfg.retention is not None and d + c == n:
        out = selection_output(x, torch.arange(n, device=dev).expand(b, n), Role.KEPT)
        out.stats = {"n_requested": full(n), "n_tokens": full(n)}
        out.stats.update(n_dominant=full(0), n_contextual=full(0))
        return out

    order = a.argsort(dim=1, descending=True, stable=True)  # [B,N]
    dom = order[:, : d - 1].sort(dim=1).values  # [B,D-1] raster order
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, dom, True)  # [B,N]
    p = torch.arange(n, device=dev).expand(b, n)  # [B,N]
    rest = torch.where(is_dom, n + p, p).argsort(dim=1)[:, : n - (d - 1)]  # [B,R] raster order

    feats = [signals.cls_feature.to(x.dtype).unsqueeze(1), gather_rows(x, dom)]  # [B,1,C],[B,D-1,C]
    source = [torch.full((b, 1), -1, dtype=torch.int64, device=dev), dom]
    role = [torch.full((b, 1), int(Role.CLS)), torch.full((b, d - 1), int(Role.ATTENTION))]
    members = [torch.zeros(b, 1, n, dtype=torch.bool, device=dev)]
    own = torch.zeros(b, d - 1, n, dtype=torch.bool, device=dev)  # [B,D-1,N]
    members.append(own.scatter_(2, dom.unsqueeze(-1), True))
    if c > 0:
        ctx, targets, assign = _contextual(gather_rows(x, rest), gather_rows(signals.keys, rest), c)
        n_ctx = ctx.shape[1]
        feats.append(ctx)
        source.append(rest[:, targets])  # [B,c] the target patch anchors the token
        role.append(torch.full((b, n_ctx), int(Role.CONTEXTUAL)))
        mem = torch.zeros(b, n_ctx, n, dtype=torch.bool, device=dev)  # [B,c,N]
        mem.scatter_(2, rest.unsqueeze(1).expand(b, n_ctx, -1), assign.transpose(1, 2))
        members.append(mem)
    else:
        n_ctx = 0
    lengths = full(d + n_ctx)
    stats = {"n_tokens": lengths, "n_dominant": full(d), "n_contextual": full(n_ctx)}
    if cfg.retention is not None:
        stats["n_requested"] = full(d + c)
    return Compressed(
        features=torch.cat(feats, dim=1),
        lengths=lengths,
        source=torch.cat(source, dim=1),
        role=torch.cat(role, dim=1).to(device=dev, dtype=torch.int8),
        members=torch.cat(members, dim=1),
        stats=stats,
    )


def build(name: str = "visionzip", retention: float | None = None, **options: Any):
    """Build VisionZip. Options: ``dominant`` + ``contextual`` (a setting, default 54 + 10) or
    ``retention`` (with ``contextual_share``); giving both forms raises."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("dominant", "contextual", "contextual_share"))
    check_retention(retention)
    d, c = options.get("dominant"), options.get("contextual")
    share = options.get("contextual_share", CONTEXTUAL_SHARE)
    if retention is not None:
        if d is not None or c is not None:
            raise ValueError(
                "visionzip: give either retention or dominant+contextual, not both "
                f"(got retention={retention}, dominant={d}, contextual={c})"
            )
        if not 0.0 <= share < 1.0:
            raise ValueError(f"contextual_share must be in [0, 1), got {share}")
    else:
        if (d is None) != (c is None):
            raise ValueError("visionzip: give both dominant and contextual, or neither")
        d, c = (DEFAULT_DOMINANT, DEFAULT_CONTEXTUAL) if d is None else (int(d), int(c))
        if d < 1 or c < 0:
            raise ValueError(
                f"visionzip needs dominant >= 1 (CLS) and contextual >= 0, got {d}+{c}"
            )
    cfg = VisionZipConfig(dominant=d, contextual=c, retention=retention, contextual_share=share)
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
