"""FastV (arXiv 2403.06764): identity on the vision side, one pruning stage inside the LLM.

One file: the config (:class:`FastVConfig`, which implements
:class:`~recomp_eval.llm_methods.base.LLMPruner` and is ``BuiltMethod.llm``), the scoring rules
and :func:`build`. The vision side hands every patch to the projector
(:func:`recomp_eval.methods.identity.compress`); the model mechanics (registered attention
function, pre-hooks) live in :mod:`recomp_eval.inject.llm_attention`.

The rule: during prefill, score each key position by the attention it receives at layer ``K-1``
(post-RoPE q/k; from the last query, or averaged over all queries), keep the top ``k`` image
positions plus every non-image position in their original order and original RoPE positions,
from layer ``K`` on.

Letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (GQA groups ``G = H / Hkv``),
``Lq`` query length, ``L`` key length, ``d`` head width, ``N`` image positions, ``k`` kept ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from recomp_eval.llm_methods.base import (
    VARIANTS,
    PositionPolicy,
    PruneView,
    Stage,
    Variant,
    check_k_layer,
    layer_counts,
    topk_keep,
)
from recomp_eval.methods.base import SignalSpec, budget_from_ratio, check_options, check_retention
from recomp_eval.methods.identity import compress

Score = Literal["last_query", "mean_queries"]
SCORES: tuple[str, ...] = ("last_query", "mean_queries")
# Query rows processed at once by ``mean_query_scores`` (bounds memory to B*H*chunk*L floats).
QUERY_CHUNK = 256

__all__ = [
    "SCORES",
    "VARIANTS",
    "FastVConfig",
    "build",
    "kept_count",
    "last_query_scores",
    "mean_query_scores",
    "select_keep",
]


@dataclass(frozen=True)
class FastVConfig:
    """FastV settings; an :class:`~recomp_eval.llm_methods.base.LLMPruner` with one stage.

    Args:
        k_layer: first decoder layer that sees the pruned sequence; layer ``k_layer - 1`` scores.
            A value >= the number of decoder layers is an error at injection time.
        ratio: fraction ``R`` of image positions dropped; kept ``k = round(N * (1 - R))``.
        variant: ``prune`` (gather the kept rows: real speed-up) or ``mask`` (same length, dropped
            key columns masked: exact reference, no speed-up).
        score: ``last_query`` (the paper: attention of the last prompt token, head mean) or
            ``mean_queries`` (attention received, averaged over heads and all valid queries).
        retention: if set, overrides ``ratio``: ``k = budget_from_ratio(retention, N)``.
    """

    name: ClassVar[str] = "fastv"
    positions: ClassVar[PositionPolicy] = "original"  # kept rows keep their RoPE positions

    k_layer: int = 2
    ratio: float = 0.5
    variant: Variant = "prune"
    score: Score = "last_query"
    retention: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k_layer, bool) or not isinstance(self.k_layer, int) or self.k_layer < 1:
            raise ValueError(
                f"FastV k_layer must be an int >= 1 (layer k_layer-1 scores), got {self.k_layer!r}"
            )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"FastV ratio must be a number in [0, 1), got {self.ratio!r}")
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ValueError(
                f"FastV ratio={self.ratio} is outside [0, 1): it is the fraction of image tokens "
                f"dropped (0.5 keeps half)"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"FastV variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.score not in SCORES:
            raise ValueError(f"FastV score must be one of {SCORES}, got {self.score!r}")
        check_retention(self.retention)

    # -- LLMPruner -------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Score at layer ``K-1``'s attention, prune from layer ``K``."""
        return (Stage(prune_layer=self.k_layer, attention_layer=self.k_layer - 1),)

    def check_depth(self, num_layers: int) -> None:
        """``k_layer`` must leave at least one decoder layer to run on the pruned sequence."""
        check_k_layer("FastV", self.k_layer, num_layers)

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        """[B,L] float32 attention received by each position at layer ``K-1``."""
        att = view.attention
        if self.score == "last_query":
            return last_query_scores(att.query, att.key, att.mask, att.scaling)  # [B,L]
        return mean_query_scores(att.query, att.key, att.mask, att.scaling)  # [B,L]

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        """[B,L] bool: every non-image position and the top-``k`` image positions."""
        return select_keep(scores, view.image_mask, self)

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        """``N`` image tokens at layers ``< K``, ``k`` from layer ``K`` on."""
        return layer_counts(num_image, num_layers, {self.k_layer: kept_count(num_image, self)})


def kept_count(num_image: int, cfg: FastVConfig) -> int:
    """Image positions kept out of ``num_image``: ``round(N (1 - R))`` or the retention budget."""
    if num_image <= 0:
        return 0
    if cfg.retention is not None:
        return budget_from_ratio(cfg.retention, num_image)
    return max(0, min(num_image, round(num_image * (1.0 - float(cfg.ratio)))))


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool (True = attend) or additive float mask -> additive float32 mask, same shape."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        return torch.where(mask, zero, torch.full_like(zero, -math.inf))
    return mask.float()


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B,H,Lq,d] -> [B,Hkv,G,Lq,d] so that group g of kv head h is query head h*G + g."""
    b, h, lq, d = query.shape
    return query.view(b, num_kv_heads, h // num_kv_heads, lq, d)  # [B,Hkv,G,Lq,d]


def last_query_scores(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Head-mean softmax attention of the last query row over all keys, in O(H L) memory.

    Args:
        query: [B,H,Lq,d] post-RoPE queries.
        key: [B,Hkv,L,d] post-RoPE keys (H must be a multiple of Hkv).
        mask: [B,1,Lq,L] bool (True = attend) or additive float mask, or None (causal, the last
            query sees every key).
        scaling: softmax scale (``d ** -0.5`` for Llama).
    Returns:
        [B,L] float32, each row sums to 1 over allowed keys.
    """
    q_last = _group_queries(query[:, :, -1:], key.shape[1])[:, :, :, 0]  # [B,Hkv,G,d]
    logits = torch.einsum("bkgd,bkld->bkgl", q_last.float(), key.float()) * scaling  # [B,Hkv,G,L]
    if mask is not None:
        logits = logits + _additive(mask[:, :, -1])[:, :, None, :]  # [B,1,1,L] broadcast
    probs = logits.softmax(dim=-1)  # [B,Hkv,G,L]
    return probs.flatten(1, 2).mean(dim=1)  # [B,L]


def mean_query_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and valid query rows (chunked over queries).

    Args: as :func:`last_query_scores`; query rows with no allowed key (padding) are skipped.
    Returns:
        [B,L] float32.
    """
    b, _, lq, _ = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    grouped = _group_queries(query, hkv)  # [B,Hkv,G,Lq,d]
    offset = kv_len - lq  # query i sits at key position i + offset
    total = torch.zeros(b, kv_len, dtype=torch.float32, device=query.device)  # [B,L]
    rows = torch.zeros(b, dtype=torch.float32, device=query.device)  # [B]
    cols = torch.arange(kv_len, device=query.device)  # [L]
    for start in range(0, lq, chunk):
        stop = min(lq, start + chunk)
        q = grouped[:, :, :, start:stop].float()  # [B,Hkv,G,c,d]
        logits = torch.einsum("bkgcd,bkld->bkgcl", q, key.float()) * scaling  # [B,Hkv,G,c,L]
        if mask is None:
            pos = torch.arange(start, stop, device=query.device) + offset  # [c]
            allowed = (cols[None, :] <= pos[:, None])[None, None]  # [1,1,c,L]
            add = _additive(allowed)  # [1,1,c,L]
        else:
            add = _additive(mask[:, :, start:stop])  # [B,1,c,L]
        logits = logits + add[:, :, None]  # [B,Hkv,G,c,L]
        valid = torch.isfinite(add).any(dim=-1)  # [B|1,1,c]
        probs = logits.softmax(dim=-1).nan_to_num(0.0)  # [B,Hkv,G,c,L]
        probs = probs * valid[:, :, None, :, None]  # padded query rows contribute nothing
        total += probs.mean(dim=(1, 2)).sum(dim=1)  # [B,L]
        rows += valid.flatten(1).sum(dim=1).expand(b).float()  # [B]
    return total / rows.clamp_min(1.0)[:, None]  # [B,L]


def select_keep(scores: torch.Tensor, image_mask: torch.Tensor, cfg: FastVConfig) -> torch.Tensor:
    """Keep every non-image position and the top-``k`` scored image positions.

    Args:
        scores: [B,L] attention scores (higher = more important).
        image_mask: [B,L] bool, True at image positions; every row must hold the same count N
            (fixed-ratio FastV keeps equal lengths so that a batch stays rectangular).
        cfg: gives ``k`` via :func:`kept_count`.
    Returns:
        [B,L] bool keep mask with exactly ``L - N + k`` True entries per row.
    """
    counts = image_mask.sum(dim=1)  # [B]
    n = int(counts[0])
    if bool((counts != n).any()):
        raise ValueError(
            f"FastV needs the same number of image tokens in every sample of a batch, got "
            f"{counts.tolist()}; batch samples with equal image-token counts together"
        )
    return topk_keep(scores, image_mask, kept_count(n, cfg))  # [B,L]


def build(
    name: str = "fastv",
    retention: float | None = None,
    k_layer: int = 2,
    ratio: float = 0.5,
    variant: str = "prune",
    score: str = "last_query",
    **kwargs: Any,
):
    """Build FastV.

    Args:
        retention: if set, the kept image tokens are ``budget_from_ratio(retention, N)`` (overrides
            ``ratio``); None uses ``ratio``.
        k_layer, ratio, variant, score: see :class:`FastVConfig`.
    """
    from recomp_eval.methods import BuiltMethod

    check_options(name, kwargs, ("retention", "k_layer", "ratio", "variant", "score"))
    cfg = FastVConfig(
        k_layer=k_layer, ratio=ratio, variant=variant, score=score, retention=retention
    )
    config = {
        "retention": retention,
        "k_layer": k_layer,
        "ratio": ratio,
        "variant": variant,
        "score": score,
    }
    return BuiltMethod(name=name, spec=SignalSpec(), fn=compress, config=config, llm=cfg)
