"""TRIM (arXiv 2409.10994; FreedomIntelligence/TRIM @ f5a232d5, ``clip_encoder.py`` L66-146,
``model_vqa_loader.py`` L98-115): keep the patches the CLIP text score selects, plus one token
that is the mean of all the others.

Signals: ``P`` [B,N,D] = ``visual_projection(post_layernorm(z))`` of the feature-layer patches in
fp32, and ``t`` [B,D] = CLIP ``text_embeds`` of the user turn (question plus the answer-format
suffix, truncated to 77 tokens). Neither is normalised.

1. Score: ``s = softmax_N(-(P . t))`` in fp32 (a raw dot product, **negated** as released).
2. Budget ``keep``:
   * adaptive (``retention=None``, the release's ``TRIM:-1``): ``ratio = #(s > Q3 + 1.5 IQR) /
     len(s)`` with linear-interpolation quartiles (``numpy.percentile``), ``keep = int(N * ratio)``
     in float64. ``batch_global_iqr=false`` (default) computes this per sample, as the release does
     at batch 1. ``true`` is the release's batch behaviour: the quartiles, the count and ``len(s)``
     run over the whole batch flattened ([B*N]), and every sample keeps the same ``keep``;
   * ``official`` with ``retention=r`` (the release's ``TRIM:r``): ``keep = int(N * r)``;
   * ``fixed`` with ``retention=r``: ``keep = budget_from_ratio(r, N) - 1``, so the output has
     exactly ``round(r * N)`` tokens with the mean token (``budget_from_ratio(r, N)`` without it).
3. The ``keep`` highest ``s`` (ties to the lower index; the release's ``topk`` leaves them
   unspecified), in raster order, role TEXT. Then one token, the mean of all non-kept rows of
   ``features`` (computed in fp32 as released, cast to the features' dtype), role SUMMARY,
   members = the non-kept patches. Output length ``keep + 1``, per sample (right padding).

Options: ``mean_token`` (default true; false drops the mean token), ``batch_global_iqr``.

Where this differs from the release, on purpose:
* ``keep = 0`` gives the mean token alone; the release raises there (``view(B, 0, -1)``);
* the quartiles are taken in float64 of the fp32 scores (numpy: in float32); the counts differ
  only if a score lies within float32 rounding of the fence;
* ``official`` with ``retention=1`` and the mean token is refused (the release indexes row N).
Adaptive outputs are padded to the static bound ``int(N * c_max / L) + 1`` (145 at N = 576) with
``c_max = L - 1 - floor(0.75 (L - 1))`` and ``L`` the length the quartiles run over, so no value
is read back to the host.
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
    TextSpec,
    VisionSignals,
    budget_from_ratio,
    check_options,
    check_retention,
    choice_option,
    flag_option,
    selection_output,
)
from recomp_eval.methods.outliers import count_from_ratio, iqr_outlier_fraction

VARIANTS = ("official", "fixed")
OPTIONS = ("variant", "batch_global_iqr", "mean_token")
SPEC = SignalSpec(
    patch_embeds="fp32",
    text=TextSpec(source="user_text", max_len=77, pool="eot", output="embeddings", segments=False),
)


@dataclass(frozen=True)
class TrimConfig:
    """``retention``: None = adaptive IQR budget, else a fixed one (see the module docstring)."""

    retention: float | None = None
    variant: str = "official"
    batch_global_iqr: bool = False
    mean_token: bool = True


def scores(signals: VisionSignals) -> torch.Tensor:
    """``softmax_N(-(P . t))`` [B,N] in fp32 from patch_embeds [B,N,D] and text_embeds [B,1,D]."""
    p, t = signals.patch_embeds.float(), signals.text_embeds
    if t.shape[1] != 1 or t.shape[2] != p.shape[2]:
        raise ValueError(
            f"trim needs one text embedding per sample of width {p.shape[2]} ([B,1,D]), got "
            f"{list(t.shape)}; use TextSpec(segments=False)"
        )
    sim = torch.matmul(p, t.float().transpose(1, 2)).squeeze(2)  # [B,N] raw dot
    return torch.softmax(-sim, dim=-1)  # [B,N]


def adaptive_keep(s: torch.Tensor, batch_global: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """IQR outlier ratio [B] float64 and ``keep = int(N * ratio)`` [B] int64 for scores s [B,N]."""
    b, n = s.shape
    ratio = iqr_outlier_fraction(s.reshape(1, b * n) if batch_global else s)  # [1] or [B]
    ratio = ratio.expand(b)  # [B]
    return ratio, count_from_ratio(n, ratio)


def max_adaptive_keep(n: int, length: int) -> int:
    """Static bound on the adaptive ``keep``: at most ``L - 1 - floor(0.75 (L - 1))`` of ``L``
    scores exceed ``Q3 + 1.5 IQR >= Q3``; ``keep = int(N * count / L)`` grows with the count."""
    top = length - 1 - math.floor(0.75 * (length - 1))
    return min(n, int(n * (top / length)))


def compress(signals: VisionSignals, cfg: TrimConfig) -> Compressed:
    """The ``keep`` patches of highest TRIM score (raster order) plus the mean of the rest.

    Args:
        signals: features [B,N,C] (what is kept and averaged), patch_embeds [B,N,D] fp32,
            text_embeds [B,1,D].
        cfg: :class:`TrimConfig`.
    Returns:
        Compressed [B,M,C]; stats n_tokens, n_requested, n_selected, n_summary, and iqr_ratio
        with the adaptive budget.
    """
    signals.require("patch_embeds", "text_embeds", method="trim")
    signals.check_finite("features", "patch_embeds", "text_embeds")
    x = signals.features
    b, n, _ = x.shape
    dev = x.device
    s = scores(signals)  # [B,N]
    stats: dict[str, torch.Tensor] = {}
    if cfg.retention is None:
        ratio, keep = adaptive_keep(s, cfg.batch_global_iqr)  # [B], [B]
        width = max_adaptive_keep(n, b * n if cfg.batch_global_iqr else n)
        stats["iqr_ratio"] = ratio
    else:
        if cfg.variant == "official":
            width = min(n, int(n * cfg.retention))  # the release's int(N * k)
        else:
            width = budget_from_ratio(cfg.retention, n) - int(cfg.mean_token)
        keep = torch.full((b,), width, dtype=torch.int64, device=dev)
    if cfg.mean_token and width >= n:
        raise ValueError(
            f"trim: keeping all {n} patches leaves nothing for the mean token (the release "
            f"fails here); use variant=fixed, a smaller retention, or mean_token=false"
        )

    order = s.argsort(dim=1, descending=True, stable=True)[:, :width]  # [B,W] ties: lower index
    slot = torch.arange(width, device=dev)[None, :]  # [1,W]
    top = torch.where(slot < keep[:, None], order, n).sort(dim=1).values  # [B,W] raster, pads last
    out = selection_output(x, top, Role.TEXT, lengths=keep)
    stats.update(n_selected=keep.clone(), n_summary=torch.zeros_like(keep))
    if cfg.mean_token:
        kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev).scatter_(1, top, True)[:, :n]
        rest = ~kept  # [B,N]
        total = (x.float() * rest.unsqueeze(-1)).sum(dim=1)  # [B,C] fp32, as released
        mean = (total / rest.sum(dim=1, keepdim=True).clamp(min=1)).to(x.dtype)  # [B,C]
        at = torch.arange(width + 1, device=dev)[None, :] == keep[:, None]  # [B,W+1]
        feats = torch.cat([out.features, x.new_zeros(b, 1, x.shape[2])], dim=1)  # [B,W+1,C]
        members = torch.cat([out.members, rest.new_zeros(b, 1, n)], dim=1)  # [B,W+1,N]
        role = torch.cat([out.role, out.role.new_zeros(b, 1)], dim=1)  # [B,W+1]
        out = Compressed(
            features=torch.where(at.unsqueeze(-1), mean.unsqueeze(1), feats),
            lengths=keep + 1,
            source=torch.cat([out.source, out.source.new_full((b, 1), -1)], dim=1),
            role=torch.where(at, int(Role.SUMMARY), role).to(torch.int8),
            members=torch.where(at.unsqueeze(-1), rest.unsqueeze(1), members),
        )
        stats["n_summary"] = torch.ones_like(keep)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone(), **stats}
    out.patch_scores["text"] = s  # [B,N] the score the selection ranks
    return out


def build(name: str = "trim", retention: float | None = None, **options: Any):
    """Build TRIM. Options: ``variant`` (official | fixed), ``batch_global_iqr``, ``mean_token``."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, OPTIONS)
    check_retention(retention)
    variant = choice_option(name, options, "variant", VARIANTS, "official")
    flags = {key: flag_option(name, options, key, default)
             for key, default in (("batch_global_iqr", False), ("mean_token", True))}  # fmt: skip
    if flags["batch_global_iqr"] and retention is not None:
        raise ValueError(
            f"trim: batch_global_iqr applies to the adaptive budget only (retention=null), got "
            f"retention={retention}"
        )
    if variant == "official" and flags["mean_token"] and retention is not None and retention >= 1:
        raise ValueError(
            "trim official: retention=1 keeps every patch and leaves nothing for the mean token "
            "(the release indexes past the end); use variant=fixed or mean_token=false"
        )
    cfg = TrimConfig(retention=None if retention is None else float(retention), variant=variant,
                     **flags)  # fmt: skip
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
