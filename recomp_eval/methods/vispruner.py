"""VisPruner (ICCV 2025; Theia-4869/VisPruner @ aefa01ad, ``llava_arch.py`` L140-186): keep the
tokens the CLS token attends to most, then a diverse subset of the rest.

Signals: the head-mean CLS attention of ViT layer -2, ``a`` [B,N] (``mean_heads``), and the
layer -2 patch features, L2-normalised in their dtype.

Budget: ``T = budget_from_ratio(r, N)`` (the release takes T as a count: 64/128/192 are
``r = T / 576``). ``T_imp = floor(T * important_ratio)``, ``T_div = T - T_imp``.

1. Important: the ``T_imp`` highest ``a``.
2. The residual list R (the rest, in descending attention) shrinks while ``|R| > T_div``:
   * ``r = min(step, |R| - T_div)``;
   * the even positions of R form side A and the odd positions side B;
   * each A token scores its maximum cosine to any B token, and the ``r`` highest are dropped;
   * R becomes the surviving A tokens (in descending score) followed by all of B.
3. The output is important ∪ R, in raster order (the release scatters a mask). Important tokens
   get role ATTENTION, the diverse ones KEPT.

Variants:

* ``official`` raises the release's error as one line when ``|R|`` is odd. The release indexes
  ``R // 2 - r`` survivors out of ``ceil(R / 2) - r``, which raises IndexError. It happens e.g. at
  T = 64 with ``important_ratio=0.8``, never for even ``T_imp`` with step 8.
* ``fixed`` (the default) keeps all ``ceil(R / 2) - r`` survivors, so any T works. Wherever
  the release runs (even residual lists), both variants give the same tokens (tested).

Ties: the release sorts with a non-stable argsort (ties in arbitrary order); here ties go to
the lower index or the earlier list position, the same on every device.
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
    choice_option,
    selection_output,
)

DEFAULT_RETENTION = 64 / 576  # the release's T = 64 at N = 576
VARIANTS = ("official", "fixed")
SPEC = SignalSpec(cls_attn="mean_heads", cls_attn_layer=-2)


@dataclass(frozen=True)
class VisPrunerConfig:
    """``retention`` (T), ``important_ratio`` (share of T by attention), ``step`` (tokens dropped
    per matching round), ``variant``."""

    retention: float = DEFAULT_RETENTION
    important_ratio: float = 0.5
    step: int = 8
    variant: str = "fixed"


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,N,...] at index [B,K] -> [B,K,...]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, index]


def diverse(unit: torch.Tensor, residual: torch.Tensor, keep: int, cfg: VisPrunerConfig):
    """Shrink the residual list [B,R] to ``keep`` tokens by bipartite matching rounds."""
    while (size := residual.shape[1]) > keep:
        r = min(cfg.step, size - keep)
        if size % 2 and cfg.variant == "official":
            raise ValueError(
                f"vispruner official: the residual list has an odd length ({size}) and the "
                f"released code fails there (IndexError); use variant=fixed, or a budget whose "
                f"important share T * important_ratio leaves an even residual"
            )
        side_a, side_b = residual[:, ::2], residual[:, 1::2]  # [B,ceil(R/2)], [B,floor(R/2)]
        scores = _rows(unit, side_a) @ _rows(unit, side_b).transpose(1, 2)  # [B,|A|,|B|]
        best = scores.max(dim=-1).values  # [B,|A|] each A token's closest B token
        order = best.argsort(dim=-1, descending=True, stable=True)[:, r:]  # survivors
        residual = torch.cat([side_a.gather(1, order), side_b], dim=1)  # [B,R-r]
    return residual


def compress(signals: VisionSignals, cfg: VisPrunerConfig) -> Compressed:
    """Important tokens by CLS attention plus diverse ones, raster order.

    Args:
        signals: features [B,N,C] (layer -2), cls_attn [B,N] (head-mean, layer -2).
        cfg: :class:`VisPrunerConfig`.
    Returns:
        Compressed [B,T,C]; stats n_tokens, n_requested, n_important.
    """
    signals.require("cls_attn", method="vispruner")
    signals.check_finite("features", "cls_attn")
    x, a = signals.features, signals.cls_attn
    n = x.shape[1]
    t = budget_from_ratio(cfg.retention, n)
    t_imp = int(t * cfg.important_ratio)
    order = a.argsort(dim=1, descending=True, stable=True)  # [B,N]
    important, residual = order[:, :t_imp], order[:, t_imp:]
    unit = x / x.norm(dim=-1, keepdim=True)  # [B,N,C] in the features' dtype
    residual = diverse(unit, residual, t - t_imp, cfg)  # [B,T_div]
    chosen = torch.cat([important, residual], dim=1)  # [B,T]
    keep, where = chosen.sort(dim=1)  # raster order
    role = torch.where(where < t_imp, int(Role.ATTENTION), int(Role.KEPT)).to(torch.int8)
    out = selection_output(x, keep, role)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone(),
                 "n_important": torch.full_like(out.lengths, t_imp)}  # fmt: skip
    return out


def build(name: str = "vispruner", retention: float | None = None, **options: Any):
    """Build VisPruner. Options: ``important_ratio`` (0.5), ``step`` (8), ``variant``."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("important_ratio", "step", "variant"))
    check_retention(retention)
    variant = choice_option(name, options, "variant", VARIANTS, "fixed")
    ratio = options.get("important_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"vispruner: important_ratio={ratio!r}; use a number in [0, 1]")
    step = options.get("step", 8)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"vispruner: step={step!r}; use an integer >= 1")
    cfg = VisPrunerConfig(retention=DEFAULT_RETENTION if retention is None else retention,
                          important_ratio=float(ratio), step=step, variant=variant)  # fmt: skip
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
