"""PyramidDrop (arXiv 2410.17247): identity on the vision side, several pruning stages in the LLM.

One file: the config (:class:`PDropConfig`, an :class:`~recomp_eval.llm_methods.base.LLMPruner`,
``BuiltMethod.llm``), scoring, stage budgets, :func:`build`. The mechanics (hooks, renumbered
positions, decode shift) live in :mod:`recomp_eval.inject.llm_attention`.

The rule (released ``pdrop_rank_drop``, Cooperx521/PyramidDrop @ 6444f304): at each stage layer
``l`` of ``layer_list``, the hidden states entering decoder layer ``l`` go through that layer's
``input_layernorm``, ``q_proj`` and ``k_proj`` and RoPE at the current (renumbered) positions;
the query is only the last prompt row (the last instruction token); causal softmax with scale
``1/sqrt(d)`` in fp32, cast back to the model dtype, mean over heads; the top
``int(N * ratio_s)`` image rows (``N`` the ORIGINAL image count) are kept in their original order
and renumbered contiguously. Released eval: ``layer_list [8,16,24]``, ratios ``[0.5,0.25,0.125]``
(288 / 144 / 72 of 576).

Deviations, all inert for LLaVA-1.5: GQA keys are shared by their query group (the release has no
``repeat_kv``); ties keep the earlier image row (stable sort; the release's ``topk`` leaves them
unspecified); the query projection runs on the last row only; padding comes from the attention
mask of layer ``l - 1`` (captured for that only), so left padding works.

Letters: ``B`` batch, ``L`` current rows, ``E`` width, ``H`` query heads, ``Hkv`` key/value heads
(``G = H / Hkv``), ``d`` head width, ``N`` original image rows, ``D`` decoder depth.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from recomp_eval.llm_methods.base import (
    VARIANTS,
    PositionPolicy,
    PruneView,
    Stage,
    Variant,
    layer_counts,
)
from recomp_eval.methods.base import SignalSpec, budget_from_ratio, check_options, check_retention
from recomp_eval.methods.identity import compress

RELEASED_LAYERS = (8, 16, 24)
RELEASED_RATIOS = (0.5, 0.25, 0.125)
BISECTION_STEPS = 64

__all__ = [
    "PDropConfig",
    "build",
    "last_token_scores",
    "ratios_for_retention",
    "stable_topk_keep",
    "stage_counts",
]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sequence(option: str, value: Any, types: tuple[type, ...], what: str) -> tuple:
    """A non-empty list/tuple option as a tuple, or a one-line error naming it."""
    ok = not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") and len(value) > 0
    if not ok or not all(isinstance(x, types) and not isinstance(x, bool) for x in value):
        raise ValueError(f"PyramidDrop {option} must be a non-empty list of {what}, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class PDropConfig:
    """PyramidDrop settings; an :class:`~recomp_eval.llm_methods.base.LLMPruner` with S stages.

    Args:
        layer_list: increasing first decoder layers (>= 1) of each stage; layer ``l`` scores with
            its own q/k on the output of layer ``l - 1`` and runs on the kept rows.
        ratios: kept share of the ORIGINAL image count per stage, non-increasing in [0, 1];
            stage ``s`` keeps ``int(N * ratios[s])`` (floor, as released).
        variant: ``prune`` (gather kept rows: real speed-up) or ``mask`` (exact reference).
        retention: if set, overrides ``ratios`` with :func:`ratios_for_retention` (non-official):
            geometric ``lambda, lambda^2, ...`` whose mean visual tokens over ``num_layers``
            layers is closest to ``budget_from_ratio(retention, N)``; a target below the
            floor ``layer_list[0] / num_layers`` (layers before the first stage keep all N) is
            an error.
        num_layers: decoder depth the retention mapping averages over (32: LLaVA-1.5-7B; 40 for
            13B). Only used with ``retention``; then it must equal the LLM's depth (checked at
            injection), because a frozen config cannot learn the depth and the selection must
            use the same ratios as ``visual_counts``.
    """

    name: ClassVar[str] = "pdrop"
    positions: ClassVar[PositionPolicy] = "renumber"  # kept rows renumbered 0..L'-1

    layer_list: tuple[int, ...] = RELEASED_LAYERS
    ratios: tuple[float, ...] = RELEASED_RATIOS
    variant: Variant = "prune"
    retention: float | None = None
    num_layers: int = 32

    def __post_init__(self) -> None:
        layers = _sequence("layer_list", self.layer_list, (int,), "ints >= 1")
        ratios = tuple(map(float, _sequence("ratios", self.ratios, (int, float), "numbers")))
        if layers[0] < 1 or any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(
                f"PyramidDrop layer_list must increase strictly from >= 1, got {list(layers)}"
            )
        if len(ratios) != len(layers):
            raise ValueError(
                f"PyramidDrop needs one ratio per stage: layer_list has {len(layers)}, ratios "
                f"{len(ratios)} ({list(ratios)})"
            )
        if not all(0.0 <= r <= 1.0 for r in ratios) or any(
            b > a for a, b in itertools.pairwise(ratios)
        ):
            raise ValueError(
                f"PyramidDrop ratios {list(ratios)} must be non-increasing shares in [0, 1] of the "
                f"original image tokens (released: [0.5, 0.25, 0.125])"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"PyramidDrop variant must be one of {VARIANTS}, got {self.variant!r}")
        check_retention(self.retention)
        if not _is_int(self.num_layers) or self.num_layers < 2:
            raise ValueError(f"PyramidDrop num_layers must be an int >= 2, got {self.num_layers!r}")
        if self.retention is not None and self.num_layers <= layers[-1]:
            raise ValueError(
                f"PyramidDrop method.num_layers={self.num_layers} (the retention mapping's depth) "
                f"must exceed the last stage layer {layers[-1]}"
            )
        if self.retention is not None and self.retention * self.num_layers < layers[0]:
            raise ValueError(
                f"PyramidDrop retention={self.retention} is unreachable: the first "
                f"{layers[0]} layer(s) keep all N, so the mean over {self.num_layers} layers is >= "
                f"{layers[0] / self.num_layers:g} N; use method.layer_list with a first layer <= "
                f"retention * num_layers = {self.retention * self.num_layers:g}, or a larger "
                f"retention"
            )
        object.__setattr__(self, "layer_list", layers)
        object.__setattr__(self, "ratios", ratios)

    # -- LLMPruner -------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Score at each stage layer's input; layer ``l - 1``'s attention gives the padding mask."""
        return tuple(
            Stage(prune_layer=layer, attention_layer=layer - 1) for layer in self.layer_list
        )

    def check_depth(self, num_layers: int) -> None:
        """The stages must fit the decoder; the retention mapping must average over its depth."""
        if self.layer_list[-1] >= num_layers:
            s = min(len(self.layer_list), num_layers - 1)  # evenly spread stages that fit
            fit = ",".join(str((i + 1) * num_layers // (s + 1)) for i in range(s))
            raise ValueError(
                f"PyramidDrop layer_list={list(self.layer_list)} does not fit the LLM's "
                f"{num_layers} decoder layers (stage layers lie in [1, {num_layers - 1}]); use "
                f"e.g. method.layer_list=[{fit}] with as many ratios"
            )
        if self.retention is not None and self.num_layers != num_layers:
            raise ValueError(
                f"PyramidDrop retention maps over method.num_layers={self.num_layers} decoder "
                f"layers but the LLM has {num_layers}; set method.num_layers={num_layers}"
            )

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        """[B,L] float32 head-mean attention of the last row, with layer ``l``'s own q/k."""
        if view.position_embeddings is None:
            raise ValueError("PyramidDrop needs the decoder's RoPE (cos, sin) at the stage layer")
        mask = None if view.attention is None else view.attention.mask
        return last_token_scores(view.hidden, view.module, view.position_embeddings, mask)

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        """[B,L] bool: every non-image row and the top ``int(N * ratio_stage)`` image rows."""
        counts = view.prompt_images.tolist()  # [B] original image counts (one host sync)
        if any(c != counts[0] for c in counts):
            raise ValueError(
                f"PyramidDrop needs the same number of image tokens in every sample of a batch, "
                f"got {counts}; batch samples with equal image-token counts together"
            )
        k = self.stage_counts(int(counts[0]))[stage]
        return stable_topk_keep(scores, view.image_mask, k)  # [B,L]

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        """``N`` before the first stage, then ``int(N * ratio_s)`` from each stage layer on."""
        steps = dict(zip(self.layer_list, self.stage_counts(num_image)))
        return layer_counts(num_image, num_layers, steps)

    # -- budgets ---------------------------------------------------------------------------------

    def stage_ratios(self, num_image: int) -> tuple[float, ...]:
        """The ratios in force: ``ratios``, or the retention mapping for ``num_image``."""
        if self.retention is None:
            return self.ratios
        return ratios_for_retention(self.retention, self.layer_list, self.num_layers, num_image)

    def stage_counts(self, num_image: int) -> tuple[int, ...]:
        """Image rows kept by each stage out of ``num_image`` (floors of the original count)."""
        return stage_counts(num_image, self.stage_ratios(num_image))


def stage_counts(num_image: int, ratios: tuple[float, ...]) -> tuple[int, ...]:
    """``int(N * r)`` per stage (floor of the ORIGINAL count, as released: 576 -> 288/144/72)."""
    return tuple(int(num_image * r) for r in ratios)


@lru_cache(maxsize=256)
def ratios_for_retention(
    retention: float, layer_list: tuple[int, ...], num_layers: int, num_image: int
) -> tuple[float, ...]:
    """Non-official: geometric ratios ``(lam, lam^2, ..., lam^S)`` for an average-token target.

    The target is ``T = budget_from_ratio(retention, N)`` visual tokens on average over the ``D =
    num_layers`` decoder layers (an in-LLM method's kept count). That mean of the floored counts
    is a non-decreasing step function of ``lam`` in [0, 1]: bisection on the exact integer totals
    finds the plateaus just below and at/above ``T``; the closer wins (a tie: the one above).
    Requested ``T`` vs achieved ``mean(PDropConfig.visual_counts(N, D))`` differ by the floors.
    ``layer_list`` is a tuple (cached); ``num_image`` the original ``N``.
    """
    s = len(layer_list)
    goal = budget_from_ratio(retention, num_image) * num_layers if num_image > 0 else 0

    def ratios(lam: float) -> tuple[float, ...]:
        return tuple(lam ** (i + 1) for i in range(s))

    def total(lam: float) -> int:  # sum over layers of the visual tokens (= D * mean)
        steps = dict(zip(layer_list, stage_counts(num_image, ratios(lam))))
        return sum(layer_counts(num_image, num_layers, steps))

    if total(0.0) >= goal:
        return ratios(0.0)
    lo, hi = 0.0, 1.0  # total(lo) < goal <= total(hi)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if total(mid) >= goal:
            hi = mid
        else:
            lo = mid
    return ratios(lo if goal - total(lo) < total(hi) - goal else hi)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE (rotate-half) of x [B,h,L,d] with cos/sin [B|1,L,d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [B,h,L,d]
    return x * cos[:, None] + rotated * sin[:, None]


def last_token_scores(
    hidden: torch.Tensor,
    layer: Any,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention the last row pays every row, with ``layer``'s norm, q/k and RoPE (release math).

    Args:
        hidden: [B,L,E] hidden states entering ``layer``.
        layer: a Llama-style decoder layer (``input_layernorm``, ``self_attn.q_proj/k_proj``,
            ``self_attn.head_dim``).
        position_embeddings: RoPE ``(cos, sin)`` [B|1,L,d] of the current rows.
        mask: [B|1,1,L,L] bool (True = attend) or additive float, or None (causal, no padding).
    Returns:
        [B,L] float32 holding model-dtype values: ``softmax_fp32(q k^T / sqrt(d))`` cast to the
        model dtype, then averaged over the H heads (in the model dtype, as released).
    """
    attn = layer.self_attn
    d = attn.head_dim
    b, seq, _ = hidden.shape
    cos, sin = position_embeddings
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)  # [B,L,E]
        q = attn.q_proj(normed[:, -1:]).view(b, 1, -1, d).transpose(1, 2)  # [B,H,1,d]
        k = attn.k_proj(normed).view(b, seq, -1, d).transpose(1, 2)  # [B,Hkv,L,d]
        q = _rotate(q, cos[:, -1:], sin[:, -1:])  # [B,H,1,d]
        k = _rotate(k, cos, sin)  # [B,Hkv,L,d]
        hkv = k.shape[1]
        grouped = q.reshape(b, hkv, -1, d)  # [B,Hkv,G,d]: query head h reads kv head h // G
        logits = torch.matmul(grouped, k.transpose(-1, -2)) / math.sqrt(d)  # [B,Hkv,G,L]
        logits = logits.float()
        if mask is not None:
            last = mask[:, 0, -1]  # [B|1,L] the last query's row
            if last.dtype == torch.bool:
                logits = logits.masked_fill(~last[:, None, None, :], -math.inf)
            else:
                logits = logits + last.float()[:, None, None, :]
        probs = logits.softmax(dim=-1).to(hidden.dtype)  # [B,Hkv,G,L]
        return probs.flatten(1, 2).mean(dim=1).float()  # [B,L]


def stable_topk_keep(scores: torch.Tensor, image_mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B,L] bool: every non-image row and the ``k`` best image rows; ties keep the earlier row.

    ``scores`` [B,L]; ``image_mask`` [B,L] bool with at least ``k`` image rows per sample.
    """
    masked = scores.float().masked_fill(~image_mask, -math.inf)  # [B,L]
    order = masked.argsort(dim=1, descending=True, stable=True)[:, :k]  # [B,K]
    return (~image_mask).scatter(1, order, True)  # [B,L]


def build(
    name: str = "pdrop",
    retention: float | None = None,
    layer_list: Any = RELEASED_LAYERS,
    ratios: Any = RELEASED_RATIOS,
    variant: str = "prune",
    num_layers: int = 32,
    **kwargs: Any,
):
    """Build PyramidDrop; options as :class:`PDropConfig` (lists accepted for the sequences)."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, kwargs, ("retention", "layer_list", "ratios", "variant", "num_layers"))
    options = {"layer_list": layer_list, "ratios": ratios, "variant": variant}
    cfg = PDropConfig(retention=retention, num_layers=num_layers, **options)
    config = {"retention": retention, **options, "num_layers": num_layers}
    config.update(layer_list=list(cfg.layer_list), ratios=list(cfg.ratios))
    return BuiltMethod(name=name, spec=SignalSpec(), fn=compress, config=config, llm=cfg)
