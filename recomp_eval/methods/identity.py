"""No compression: every patch, in raster order (the vanilla baseline)."""

from __future__ import annotations

from typing import Any

import torch

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    VisionSignals,
    check_options,
    selection_output,
)


def compress(signals: VisionSignals) -> Compressed:
    """Return all N patches unchanged.

    Args:
        signals: features [B,N,C].
    Returns:
        Compressed with features [B,N,C], lengths N, role KEPT.
    """
    b, n, _ = signals.features.shape
    index = torch.arange(n, device=signals.features.device).expand(b, n)  # [B,N]
    return selection_output(signals.features, index, Role.KEPT)


def build(name: str = "none", retention: float | None = None, **kwargs: Any):
    from recomp_eval.methods import BuiltMethod

    check_options(name, kwargs, ())
    if retention not in (None, 1, 1.0):
        raise ValueError(
            f"method 'none' keeps every token; retention={retention} is not meaningful "
            f"(use method=pool, fastervlm or random for a fixed budget)"
        )
    return BuiltMethod(name=name, spec=SignalSpec(), fn=compress, config={})
