"""The contract of an in-LLM visual-token pruning method (FastV, and next DART, PyramidDrop).

A method is an object implementing :class:`LLMPruner` (``BuiltMethod.llm``). The injection code
(:mod:`recomp_eval.inject.llm_attention`) does the model mechanics once, for every method: it
captures what a stage asks for during prefill, calls :meth:`LLMPruner.scores` and
:meth:`LLMPruner.select` at the stage's layer, and then prunes (or masks) the dropped rows from
that layer on, placing the kept rows at their original positions or renumbering them. A method
never touches hooks, masks or caches; nothing here imports transformers.

What a method declares:

* (a) ``stages``: one :class:`Stage` per selection (FastV and DART one, PyramidDrop several);
* (b) ``scores(stage, view)``: a score per current row from a :class:`PruneView` (post-RoPE
  q/k/v and mask of an earlier layer's attention, the input hidden states of the pruned layer,
  the final norm, the decoder layer itself);
* (c) ``select(stage, scores, view)``: the kept rows, per sample, same count in every sample;
* (d) ``visual_counts(num_image, num_layers)``: image tokens at each decoder layer's input (FLOPs
  and the "mean visual tokens over layers" kept count), content-independent;
* (e) ``positions``: ``original`` (kept rows keep their RoPE positions; decode continues from the
  full prompt length: FastV, DART) or ``renumber`` (kept rows renumbered contiguously, decode
  shifted by the dropped count: PyramidDrop);
* (f) ``variant``: ``prune`` (gather the kept rows: real speed-up) or ``mask`` (same length,
  dropped key columns masked: the exact reference).

Letters: ``B`` batch, ``L`` current rows (the prompt rows that survived earlier stages), ``E``
LLM width, ``H`` query heads, ``Hkv`` key/value heads, ``d`` head width, ``N`` image rows, ``K``
kept image rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Variant = Literal["prune", "mask"]
PositionPolicy = Literal["original", "renumber"]
VARIANTS: tuple[str, ...] = ("prune", "mask")
POSITION_POLICIES: tuple[str, ...] = ("original", "renumber")
_RESERVED = ("sdpa", "flash", "flex")  # transformers dispatches attention on these substrings


@dataclass(frozen=True)
class Stage:
    """Where one selection is scored and from which decoder layer it takes effect.

    Args:
        prune_layer: first decoder layer (0-based, >= 1: layer 0 always sees the full prompt)
            that sees the selection; the score is computed at this layer's input, before it
            runs, from the hidden states it receives.
        attention_layer: decoder layer whose attention inputs (post-RoPE q/k/v, mask) the score
            also reads, or None for none. It must run before ``prune_layer`` and after the
            previous stage took effect (FastV: ``K-1``; DART: ``K-1`` for its keys).
    """

    prune_layer: int
    attention_layer: int | None = None


@dataclass(frozen=True)
class AttentionInputs:
    """What the registered attention function of ``Stage.attention_layer`` received (prefill).

    ``query`` [B,H,L,d] and ``key``/``value`` [B,Hkv,L,d] are post-RoPE (GQA: ``H`` a multiple of
    ``Hkv``); ``mask`` [B|1,1,L,L] bool (True = attend) or None (plain causal, no padding);
    ``scaling`` the softmax scale.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float


@dataclass(frozen=True)
class PruneView:
    """Everything a stage may score from, restricted to the current rows (both variants).

    Args:
        stage: index into ``LLMPruner.stages``.
        layer: the stage's ``prune_layer``.
        image_mask: [B,L] bool, True at image rows.
        rows: [B,L] int64 prompt position (index into the full prefill) of each current row.
        prompt_images: [B] int64 image rows in the full prompt (PyramidDrop's stage budgets are
            fractions of this original count).
        hidden: [B,L,E] input hidden states of ``layer`` (= output of ``layer - 1``; the
            embeddings at layer 0).
        attention: the attention inputs of ``Stage.attention_layer``, or None.
        position_embeddings: RoPE ``(cos, sin)`` [B|1,L,d] the current rows carry, or None.
        norm: the decoder stack's final norm (DART scores on normed hidden states), or None.
        module: decoder layer ``layer`` (a scorer needing its own projections, e.g. PyramidDrop's
            next-layer q/k, reads them from here; prefer the other fields).
    """

    stage: int
    layer: int
    image_mask: torch.Tensor
    rows: torch.Tensor
    prompt_images: torch.Tensor
    hidden: torch.Tensor
    attention: AttentionInputs | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    norm: Callable[[torch.Tensor], torch.Tensor] | None
    module: Any


@runtime_checkable
class LLMPruner(Protocol):
    """An in-LLM pruning method: what :func:`recomp_eval.inject.llm_attention.llm_pruning` takes.

    Attributes:
        name: short method name (``fastv``); it names the registered attention function
            (``recomp_<name>_<id>``) and must not contain ``sdpa``/``flash``/``flex``.
        variant: ``prune`` or ``mask`` (see the module docstring).
        positions: ``original`` or ``renumber``.
        stages: the selections, in increasing ``prune_layer``.
    """

    name: str
    variant: Variant
    positions: PositionPolicy

    @property
    def stages(self) -> tuple[Stage, ...]: ...

    def check_depth(self, num_layers: int) -> None:
        """Raise a one-line ValueError if the stages do not fit ``num_layers`` decoder layers."""
        ...

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        """[B,L] float scores of the current rows (only image rows matter)."""
        ...

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        """[B,L] bool kept rows: every non-image row, the same count per sample."""
        ...

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        """Image tokens at the input of each of ``num_layers`` decoder layers (prefill)."""
        ...


def topk_keep(scores: torch.Tensor, image_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every non-image row and the top-``k`` scored image rows of each sample.

    Args:
        scores: [B,L] (higher = more important). Ties are broken by ``torch.topk``.
        image_mask: [B,L] bool; every row must hold at least ``k`` image rows.
        k: kept image rows per sample.
    Returns:
        [B,L] bool with ``L - N_b + k`` True entries in row ``b``.
    """
    masked = scores.float().masked_fill(~image_mask, -math.inf)  # [B,L]
    top = masked.topk(k, dim=1).indices  # [B,K]
    keep = ~image_mask  # [B,L]
    return keep.scatter(1, top, True)  # [B,L]


def layer_counts(num_image: int, num_layers: int, steps: dict[int, int]) -> tuple[int, ...]:
    """Image tokens per decoder layer when ``steps`` maps a prune layer to the count kept from it.

    Args:
        num_image: image tokens at the LLM input.
        num_layers: decoder depth; prune layers at or beyond it are ignored.
        steps: ``{prune_layer: kept}``, e.g. FastV ``{K: round(N (1 - R))}``.
    """
    counts, current = [], num_image
    for layer in range(num_layers):
        current = steps.get(layer, current)
        counts.append(current)
    return tuple(counts)


def check_pruner(pruner: Any) -> None:
    """One-line errors for an object that is not a usable :class:`LLMPruner`."""
    if not isinstance(pruner, LLMPruner):
        raise TypeError(
            f"llm_pruning needs an LLMPruner (name, variant, positions, stages, check_depth, "
            f"scores, select, visual_counts), got {type(pruner).__name__}"
        )
    if not isinstance(pruner.name, str) or any(r in pruner.name for r in _RESERVED):
        raise ValueError(
            f"in-LLM method name {pruner.name!r} must be a string without {_RESERVED} "
            f"(transformers dispatches on those)"
        )
    if pruner.variant not in VARIANTS:
        raise ValueError(f"in-LLM method '{pruner.name}' variant must be one of {VARIANTS}")
    if pruner.positions not in POSITION_POLICIES:
        raise ValueError(
            f"in-LLM method '{pruner.name}' positions must be one of {POSITION_POLICIES}"
        )


def check_k_layer(method: str, k_layer: int, num_layers: int) -> None:
    """One-stage methods (FastV, DART) prune from ``k_layer``: it must leave a layer to prune."""
    if k_layer >= num_layers:
        raise ValueError(
            f"{method} k_layer={k_layer} is at or beyond the LLM's depth ({num_layers} decoder "
            f"layers), so nothing would be pruned; use method.k_layer between 1 and "
            f"{num_layers - 1}"
        )


def check_depth(cfg: LLMPruner, num_layers: int) -> None:
    """The method's stages must fit ``num_layers`` decoder layers (one-line ValueError).

    The method's own check runs first (FastV names its ``k_layer``). Layer 0 always sees the full
    prompt: transformers sizes every decode mask from layer 0's cache, so the first prune layer
    is 1 or later; prune layers increase; an attention layer runs after the previous stage took
    effect and before its own prune layer.
    """
    cfg.check_depth(num_layers)
    stages, name = tuple(cfg.stages), cfg.name
    if not stages:
        raise ValueError(f"in-LLM method '{name}' declares no pruning stage")
    low = 0  # the previous stage's prune layer
    for i, stage in enumerate(stages):
        if not (low + 1 <= stage.prune_layer < num_layers):
            raise ValueError(
                f"in-LLM method '{name}' stage {i} prunes from layer {stage.prune_layer}; stages "
                f"need increasing prune layers in [1, {num_layers - 1}] (layer 0 sees the full "
                f"prompt)"
            )
        att = stage.attention_layer
        if att is not None and not (low <= att < stage.prune_layer):
            raise ValueError(
                f"in-LLM method '{name}' stage {i} reads attention layer {att}; it must run after "
                f"the previous stage took effect and before layer {stage.prune_layer} (in "
                f"[{low}, {stage.prune_layer - 1}])"
            )
        low = stage.prune_layer
