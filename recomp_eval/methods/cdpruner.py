"""CDPruner (arXiv 2506.10967; Theia-4869/CDPruner @ 9541616c, ``llava_arch.py`` L140-186,
``clip_encoder.py`` L38-98): a question-conditioned determinantal point process over the
projected visual tokens, greedy MAP inference, exactly ``T`` tokens.

Signals:

* ``projected`` F [B,N,E]: the projector's output per patch. L2-normalised in the model dtype,
  then the similarity ``S = F̂ F̂ᵀ`` [B,N,N] in fp32.
* ``patch_embeds`` P [B,N,D]: ``visual_projection(post_layernorm(z))`` of the feature-layer
  (layer -2) patches, the layer norm in the tower dtype and the projection in fp32.
* ``text_embeds`` t [B,M,D]: CLIP ``text_embeds`` of the question (the dataset question, no
  answer-format suffix), one per 77-token segment (``text_mask`` [B,M] marks a sample's).

Relevance: ``r_i = mean_m(-cos(P_i, t_m))``, **negated** as released (CLIP patch tokens are
anti-aligned with text), then min-max scaled ``(r - min r + 1e-6) / (max r - min r)``. Kernel
``L = diag(r) S diag(r)``. Selection: the fast greedy MAP of a DPP (incremental Cholesky, Chen et
al. 2018) for T steps, batched over samples (one step = one op over [B,N]): ``j = argmax d``
(first index on ties), ``e = (L_j - Σ_t c_t[j] c_t) / sqrt(d_j)``, ``d -= e²``, ``d_j = -inf``.
Kept tokens are returned in raster order, role KEPT, no merging.

Budget: ``T = budget_from_ratio(r, N)`` (the release takes an absolute ``--visual_token_num``;
64 / 128 / 192 of 576 are ``r = T / 576``); both variants give exactly ``T`` tokens.

Variants:

* ``official`` (the released behaviour): min-max per sample by default (the release runs at
  batch 1, where it is the same); ``batch_global_norm=true`` takes min and max over the whole
  batch tensor as the released line does at B > 1. No guard on ``d_j``: a round-off negative
  gain gives NaN features, as released (never seen on real inputs).
* ``fixed``: per-sample min-max; once a sample's best gain falls to ``GAIN_FLOOR`` (its kept
  set already spans the kernel: duplicate tokens), the remaining picks take the highest
  leftover gains without further updates, so there is no NaN and every pick is unique.
"""

from __future__ import annotations

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

DEFAULT_RETENTION = 64 / 576  # the released scripts' first setting, 64 tokens
VARIANTS = ("official", "fixed")
RELEVANCE_EPS = 1e-6  # the released numerator offset
GAIN_FLOOR = 1e-10  # ``fixed``: gains at or below this stop the Cholesky updates
SPEC = SignalSpec(
    projected=True,
    patch_embeds="ln_in_tower_dtype",
    text=TextSpec(source="question", max_len=77, pool="eot", output="embeddings", segments=True),
)


@dataclass(frozen=True)
class CDPrunerConfig:
    """``retention``: kept fraction; see the module docstring for the variants."""

    retention: float = DEFAULT_RETENTION
    variant: str = "official"
    batch_global_norm: bool = False


def relevance(
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    batch_global: bool,
) -> torch.Tensor:
    """Min-max scaled negated text relevance per patch.

    Args:
        patch_embeds: [B,N,D] fp32 joint-space patches.
        text_embeds: [B,M,D] text embeddings (normalised here in their own dtype).
        text_mask: [B,M] bool valid segments.
        batch_global: min and max over the whole batch (the released line at B > 1).
    Returns:
        [B,N] fp32 in about [0, 1].
    """
    p = patch_embeds.float()
    p = p / p.norm(dim=-1, keepdim=True)  # [B,N,D]
    t = (text_embeds / text_embeds.norm(dim=-1, keepdim=True)).float()  # [B,M,D]
    cos = torch.einsum("bnd,bmd->bnm", p, t)  # [B,N,M]
    weights = text_mask.float() / text_mask.sum(dim=1, keepdim=True).float()  # [B,M]
    r = torch.einsum("bnm,bm->bn", -cos, weights)  # [B,N] mean of -cos over the segments
    if batch_global:
        low, high = r.min(), r.max()
    else:
        low, high = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values  # [B,1]
    return (r - low + RELEVANCE_EPS) / (high - low)  # [B,N]


def kernel(projected: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """``L = diag(r) S diag(r)``: projected [B,N,E] (model dtype), rel [B,N] -> [B,N,N] fp32."""
    unit = (projected / projected.norm(dim=-1, keepdim=True)).float()  # [B,N,E]
    similarity = unit @ unit.transpose(1, 2)  # [B,N,N]
    return rel[:, :, None] * similarity * rel[:, None, :]  # [B,N,N]


def greedy_map(L: torch.Tensor, t: int, gain_floor: float | None) -> torch.Tensor:
    """Fast greedy MAP of a DPP with kernel ``L`` [B,N,N]: [B,T] picks in selection order.

    ``gain_floor``: None = the released update (a non-positive gain gives NaN); a float: once a
    sample's best gain ``d_j`` is at or below it (the kept set spans the kernel's range), its
    remaining picks take the highest leftover gains without updates, so every pick is unique and
    finite.
    """
    b, n, _ = L.shape
    rows = torch.arange(b, device=L.device)
    cis = torch.zeros(t, b, n, dtype=L.dtype, device=L.device)  # [T,B,N] Cholesky rows
    gains = torch.diagonal(L, dim1=1, dim2=2).clone()  # [B,N]
    picks = torch.empty(t, b, dtype=torch.int64, device=L.device)  # [T,B]
    for i in range(t):
        j = gains.argmax(dim=1)  # [B] first index on ties
        picks[i] = j
        gain = gains[rows, j]  # [B]
        projected = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])  # [B,N]
        if gain_floor is None:
            e = (L[rows, j] - projected) / gain.sqrt()[:, None]  # [B,N]
        else:
            live = gain > gain_floor  # [B]
            root = torch.where(live, gain, torch.ones_like(gain)).sqrt()  # [B]
            e = torch.where(live[:, None], (L[rows, j] - projected) / root[:, None], 0.0)
        cis[i] = e
        gains = gains - e.square()
        gains[rows, j] = -float("inf")
    return picks.t()  # [B,T]


def compress(signals: VisionSignals, cfg: CDPrunerConfig) -> Compressed:
    """The T tokens of the greedy DPP MAP per sample, raster order.

    Args:
        signals: features [B,N,C] (what is kept), projected [B,N,E], patch_embeds [B,N,D],
            text_embeds [B,M,D] with text_mask [B,M].
        cfg: :class:`CDPrunerConfig`.
    Returns:
        Compressed [B,T,C], role KEPT; stats n_tokens, n_requested.
    """
    signals.require("projected", "patch_embeds", "text_embeds", method="cdpruner")
    signals.check_finite("projected", "patch_embeds", "text_embeds")
    x = signals.features
    t = budget_from_ratio(cfg.retention, x.shape[1])
    official = cfg.variant == "official"
    rel = relevance(signals.patch_embeds, signals.text_embeds, signals.text_mask,
                    batch_global=official and cfg.batch_global_norm)  # fmt: skip
    picks = greedy_map(kernel(signals.projected, rel), t, None if official else GAIN_FLOOR)
    keep = picks.sort(dim=1).values  # [B,T] raster order
    out = selection_output(x, keep, Role.KEPT)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone()}
    out.patch_scores["text"] = rel  # [B,N] the (negated) text relevance the kernel weighs by
    return out


def build(name: str = "cdpruner", retention: float | None = None, **options: Any):
    """Build CDPruner. Options: ``variant`` (official | fixed), ``batch_global_norm``."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("variant", "batch_global_norm"))
    check_retention(retention)
    variant = choice_option(name, options, "variant", VARIANTS, "official")
    batch_global = flag_option(name, options, "batch_global_norm", official_only=variant)
    cfg = CDPrunerConfig(retention=DEFAULT_RETENTION if retention is None else retention,
                         variant=variant, batch_global_norm=batch_global)  # fmt: skip
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
