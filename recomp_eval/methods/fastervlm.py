"""FasterVLM (arXiv 2412.01818; Theia-4869/FasterVLM): keep the top-T patches by CLS attention.

``a`` = head-mean CLS attention of ViT layer -2 over the patches; keep the ``T`` highest in
**raster order**; role ATTENTION. ``T = budget_from_ratio(retention, N)``: retention 0.5/0.25/0.1/
0.05 gives 288/144/58/29 at N = 576 (the published 50/75/90/95 % reductions). Selecting before
the projector is equivalent to the release's selection after it (the projector acts per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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

DEFAULT_RETENTION = 0.1  # 58 of 576 tokens, the setting most papers report

SPEC = SignalSpec(cls_attn="mean_heads", cls_attn_layer=-2)


@dataclass(frozen=True)
class FasterVLMConfig:
    """``retention``: kept fraction of the N patches (T via ``budget_from_ratio``)."""

    retention: float = DEFAULT_RETENTION


def compress(signals: VisionSignals, cfg: FasterVLMConfig) -> Compressed:
    """Top-T patches by CLS attention, raster order.

    Args:
        signals: features [B,N,C], cls_attn [B,N] (head-mean, layer -2).
        cfg: :class:`FasterVLMConfig`.
    Returns:
        Compressed [B,T,C]; stats n_tokens, n_requested.
    """
    signals.require("cls_attn", method="fastervlm")
    signals.check_finite("features", "cls_attn")
    x, a = signals.features, signals.cls_attn
    n = x.shape[1]
    t = budget_from_ratio(cfg.retention, n)
    order = a.argsort(dim=1, descending=True, stable=True)  # [B,N] ties: lower index first
    keep = order[:, :t].sort(dim=1).values  # [B,T] raster order
    out = selection_output(x, keep, Role.ATTENTION)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone()}
    return out


def build(name: str = "fastervlm", retention: float | None = None, **options: Any):
    """Build FasterVLM; ``retention`` None means the default 0.1 (58 tokens at N = 576)."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("retention",))
    check_retention(retention)
    cfg = FasterVLMConfig(retention=DEFAULT_RETENTION if retention is None else retention)
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
