"""DART (arXiv 2502.11494): identity on the vision side, one duplication-aware stage in the LLM.

One file: the config (:class:`DARTConfig`, an :class:`~recomp_eval.llm_methods.base.LLMPruner`
and ``BuiltMethod.llm``), the selection and :func:`build`; the model mechanics live in
:mod:`recomp_eval.inject.llm_attention`. The released rule (``get_retained_image_token``):

1. at the input of decoder layer ``K`` take layer ``K-1``'s output through the decoder's final
   norm (``view.norm(view.hidden)``) and layer ``K-1``'s post-RoPE keys, repeated to the query
   heads and concatenated to ``H*d``;
2. pivots: the ``P_img`` image rows and the ``P_txt`` rows after the image span (question and
   template tail) with the largest key L1 norm;
3. in the CPython iteration order of ``set(image_pivots + text_pivots)`` (the release's quirk,
   over the pivots' indices in the unpadded prompt), each pivot takes, from the image rows that
   are neither pivots nor taken, those with the lowest cosine similarity to it;
4. kept image rows: the image pivots and every taken row, in original order and at their
   original RoPE positions, from layer ``K`` on.

Count rules (content-independent; ``M`` = ``budget_from_ratio(retention, N)``, or
``max_num_trunction`` when retention is None; ``P = pivot_image + pivot_text``):

* ``official``: every pivot takes ``M // P``; kept ``min(N, p + (p + P_txt) (M // P))`` with
  ``p = min(P_img, N)`` (576 image tokens, 4+4 pivots: 64 -> 68, 128 -> 132, 192 -> 196). Where
  the pool runs out the last pivots take what is left (the release would fail in ``topk``).
* ``exact``: kept ``min(N, M)``; ``p = min(P_img, N, M)`` image pivots and the remaining
  ``R = min(N, M) - p`` split over the pivots in iteration order: ``R // n`` each, the first
  ``R % n`` one more (``n = p + P_txt`` pivots).

Letters: ``B`` batch, ``L`` rows, ``E`` LLM width, ``H`` query heads, ``Hkv`` key/value heads,
``d`` head width, ``N`` image rows, ``V`` image rows still free, ``T`` candidate text rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from recomp_eval.llm_methods.base import (
    VARIANTS,
    PositionPolicy,
    PruneView,
    Stage,
    Variant,
    check_k_layer,
    layer_counts,
)
from recomp_eval.methods.base import (
    SignalSpec,
    budget_from_ratio,
    check_options,
    check_retention,
    gather_rows,
)
from recomp_eval.methods.identity import compress

Count = Literal["official", "exact"]
COUNTS: tuple[str, ...] = ("official", "exact")
OPTIONS = (
    "retention",
    "k_layer",
    "pivot_image",
    "pivot_text",
    "count",
    "max_num_trunction",
    "variant",
)

__all__ = [
    "COUNTS",
    "VARIANTS",
    "DARTConfig",
    "build",
    "kept_count",
    "key_l1_norm",
    "select_keep",
    "take_plan",
    "valid_rows",
]


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DART {name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class DARTConfig:
    """DART settings; an :class:`~recomp_eval.llm_methods.base.LLMPruner` with one stage.

    Args:
        k_layer: first decoder layer that sees the pruned sequence (release: ``--pruned_layer
            2``); layer ``k_layer - 1`` gives the keys and hidden states.
        pivot_image, pivot_text: pivot counts ``P_img``/``P_txt`` (release: 4 and 4).
        count: ``official`` (``P_img + (P_img + P_txt) (M // P)`` kept) or ``exact`` (``M``).
        retention: ``M = budget_from_ratio(retention, N)``; None uses ``max_num_trunction``.
        max_num_trunction: ``M`` in tokens when retention is None (the release's default, 128).
        variant: ``prune`` (shorter sequence) or ``mask`` (same length, masked: exact reference).
    """

    name: ClassVar[str] = "dart"
    positions: ClassVar[PositionPolicy] = "original"  # the release: position_ids = keep_indexs

    k_layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    count: Count = "official"
    retention: float | None = None
    max_num_trunction: int = 128
    variant: Variant = "prune"

    def __post_init__(self) -> None:
        _int("k_layer", self.k_layer, 1)
        _int("pivot_image", self.pivot_image, 0)
        _int("pivot_text", self.pivot_text, 0)
        _int("max_num_trunction", self.max_num_trunction, 1)
        if self.pivot_image + self.pivot_text < 1:
            raise ValueError("DART needs at least one pivot (pivot_image + pivot_text >= 1)")
        if self.count not in COUNTS:
            raise ValueError(f"DART count must be one of {COUNTS}, got {self.count!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"DART variant must be one of {VARIANTS}, got {self.variant!r}")
        check_retention(self.retention)

    # -- LLMPruner -------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Keys of layer ``K-1``, hidden states at layer ``K``'s input, prune from layer ``K``."""
        return (Stage(prune_layer=self.k_layer, attention_layer=self.k_layer - 1),)

    def check_depth(self, num_layers: int) -> None:
        """``k_layer`` must leave at least one decoder layer to run on the pruned sequence."""
        check_k_layer("DART", self.k_layer, num_layers)

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        """[B,L] key L1 norm of layer ``K-1`` (the pivot score), in the keys' dtype."""
        return key_l1_norm(view.attention.key, view.attention.query.shape[1])  # [B,L]

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        """[B,L] bool: every non-image row, the image pivots and the rows they took."""
        if view.norm is None:
            raise ValueError("DART needs the decoder's final norm (the text model has no .norm)")
        hidden = view.norm(view.hidden)  # [B,L,E] final-norm hidden states, model dtype
        valid = valid_rows(view.attention.mask, view.image_mask)  # [B,L]
        return select_keep(scores, hidden, view.image_mask, valid, self)

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        """``N`` image tokens at layers ``< K``, :func:`kept_count` from layer ``K`` on."""
        return layer_counts(num_image, num_layers, {self.k_layer: kept_count(num_image, self)})


def take_plan(num_image: int, cfg: DARTConfig) -> tuple[int, tuple[int, ...]]:
    """Image pivots and the rows each pivot takes (in iteration order) out of ``num_image``."""
    if num_image <= 0:
        return 0, ()
    m = cfg.max_num_trunction  # the release's M (its argparse default when no ratio is set)
    if cfg.retention is not None:
        m = budget_from_ratio(cfg.retention, num_image)
    if cfg.count == "exact":
        target = min(num_image, m)
        p = min(cfg.pivot_image, target)
        base, extra = divmod(target - p, p + cfg.pivot_text)
        return p, tuple(base + (j < extra) for j in range(p + cfg.pivot_text))
    p = min(cfg.pivot_image, num_image)
    per, left, takes = m // (cfg.pivot_image + cfg.pivot_text), num_image - p, []
    for _ in range(p + cfg.pivot_text):
        takes.append(min(per, left))
        left -= takes[-1]
    return p, tuple(takes)


def kept_count(num_image: int, cfg: DARTConfig) -> int:
    """Image tokens kept out of ``num_image`` (the module docstring's count rules)."""
    p, takes = take_plan(num_image, cfg)
    return p + sum(takes)


def key_l1_norm(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """L1 norm of each row's keys repeated to ``num_heads`` and concatenated (as released).

    Args:
        key: [B,Hkv,L,d] post-RoPE keys; ``num_heads`` ``H`` a multiple of ``Hkv`` (GQA: the
            norm is ``H/Hkv`` times the un-repeated one, repeated here for identical rounding).
    Returns:
        [B,L] in the keys' dtype.
    """
    b, hkv, n, d = key.shape
    rep = key[:, :, None].expand(b, hkv, num_heads // hkv, n, d).reshape(b, num_heads, n, d)
    flat = rep.permute(0, 2, 1, 3).reshape(b, n, num_heads * d)  # [B,L,H*d]
    return torch.linalg.vector_norm(flat, ord=1, dim=-1)  # [B,L]


def valid_rows(mask: torch.Tensor | None, image_mask: torch.Tensor) -> torch.Tensor:
    """[B,L] bool non-padding rows: the keys the last query row (text, left padding) may attend.

    Args:
        mask: [B|1,1,L,L] bool (True = attend) or additive float mask, or None (no padding).
        image_mask: [B,L] (shape and device).
    """
    if mask is None:
        return torch.ones_like(image_mask, dtype=torch.bool)
    last = mask[:, 0, -1]  # [B|1,L]
    last = last if last.dtype == torch.bool else last == 0
    return last.expand_as(image_mask).to(image_mask.device)  # [B,L]


def _compact(flags: torch.Tensor, width: int) -> torch.Tensor:
    """[B,L] bool -> [B,width] int64 the flagged rows first, each in ascending order."""
    return torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices[:, :width]


def select_keep(
    key_norm: torch.Tensor,
    hidden: torch.Tensor,
    image_mask: torch.Tensor,
    valid: torch.Tensor,
    cfg: DARTConfig,
) -> torch.Tensor:
    """DART's selection, batched; each sample as it would be alone.

    Args:
        key_norm: [B,L] pivot scores (:func:`key_l1_norm`).
        hidden: [B,L,E] layer ``K-1`` outputs through the final norm (cosines in their dtype).
        image_mask: [B,L] bool, the same count ``N`` in every sample.
        valid: [B,L] bool non-padding rows (text pivots come from valid rows after the image
            span; set order uses each row's index among the valid rows, its batch-1 index).
        cfg: pivot counts and the count rule (:func:`take_plan`).
    Returns:
        [B,L] bool with ``L - N + kept_count(N, cfg)`` True entries per row.
    """
    b, length = image_mask.shape
    counts = image_mask.sum(dim=1)  # [B]
    n = int(counts[0])
    if bool((counts != n).any()):
        raise ValueError(
            f"DART needs the same number of image tokens in every sample of a batch, got "
            f"{counts.tolist()}; batch samples with equal image-token counts together"
        )
    keep = ~image_mask  # [B,L]
    p, takes = take_plan(n, cfg)
    if n == 0:
        return keep
    image = _compact(image_mask, n)  # [B,N] image rows in order
    top = key_norm.gather(1, image).topk(p, dim=1).indices  # [B,p] into image
    image_pivots = image.gather(1, top)  # [B,p]
    after = torch.arange(length, device=image.device) > image[:, -1:]  # [B,L]
    text = after & valid  # [B,L] question + template tail
    n_text = text.sum(dim=1)  # [B]
    if bool((n_text < cfg.pivot_text).any()):
        raise ValueError(
            f"DART needs at least pivot_text={cfg.pivot_text} tokens after the image span, got "
            f"{n_text.tolist()} per sample; lower method.pivot_text"
        )
    cand = _compact(text, max(int(n_text.max()), cfg.pivot_text))  # [B,T]
    text_norm = key_norm.gather(1, cand).masked_fill(~text.gather(1, cand), -math.inf)  # [B,T]
    text_pivots = cand.gather(1, text_norm.topk(cfg.pivot_text, dim=1).indices)  # [B,P_txt]
    pivots = torch.cat([image_pivots, text_pivots], dim=1)  # [B,n_piv] release list order
    index = (valid.long().cumsum(dim=1) - 1).gather(1, pivots).tolist()  # batch-1 indices
    order = [[row.index(v) for v in set(row)] for row in index]  # CPython set order
    pivots = pivots.gather(1, torch.tensor(order, device=pivots.device).view(b, -1))  # [B,n_piv]
    free = torch.ones_like(image, dtype=torch.bool).scatter(1, top, False)  # [B,N]
    pool = image[free].view(b, n - p)  # [B,V] free image rows, ascending
    taken = [image_pivots]
    for j, t in enumerate(takes):
        if t == 0:
            continue
        pivot = hidden.gather(1, pivots[:, j, None, None].expand(-1, 1, hidden.shape[-1]))
        sim = F.cosine_similarity(pivot, gather_rows(hidden, pool), dim=-1)  # [B,V]
        low = (-sim).topk(t, dim=1).indices  # [B,t] least similar
        taken.append(pool.gather(1, low))  # [B,t]
        drop = torch.zeros_like(pool, dtype=torch.bool).scatter(1, low, True)  # [B,V]
        pool = pool[~drop].view(b, -1)  # [B,V-t]
    return keep.scatter(1, torch.cat(taken, dim=1), True)  # [B,L]


def build(
    name: str = "dart",
    retention: float | None = None,
    k_layer: int = 2,
    pivot_image: int = 4,
    pivot_text: int = 4,
    count: str = "official",
    max_num_trunction: int = 128,
    variant: str = "prune",
    **kwargs: Any,
):
    """Build DART; the options are those of :class:`DARTConfig`."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, kwargs, OPTIONS)
    config = {
        "retention": retention,
        "k_layer": k_layer,
        "pivot_image": pivot_image,
        "pivot_text": pivot_text,
        "count": count,
        "max_num_trunction": max_num_trunction,
        "variant": variant,
    }
    cfg = DARTConfig(**config)
    return BuiltMethod(name=name, spec=SignalSpec(), fn=compress, config=config, llm=cfg)
