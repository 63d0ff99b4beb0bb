"""Data contract shared by every compression method.

Letters: ``B`` batch, ``N`` visual patches (24 x 24 = 576 for CLIP ViT-L/14-336), ``M`` output
tokens (padded), ``C`` ViT width, ``Ck`` key width.

A method is a pure function of :class:`VisionSignals` that returns :class:`Compressed`. Methods
declare what they need from the vision tower in a :class:`SignalSpec`; the model adapter
(``recomp_eval.inject``) reads the spec and captures exactly that, so a method never imports
transformers.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import torch


class Role(IntEnum):
    """Why an output token exists. Stored as int8 in :attr:`Compressed.role`."""

    PAD = 0  # right padding beyond ``lengths``
    KEPT = 1  # selected without a score (identity, random, spatial fill)
    ATTENTION = 2  # kept because the CLS token attends to it
    TEXT = 3  # recovered because it matches the question text
    MERGED = 4  # cluster centre that absorbed neighbours
    SUMMARY = 5  # one token summarising all non-centre leftovers
    POOLED = 6  # spatial pooling window
    CONTEXTUAL = 7  # VisionZip contextual token (target + mean of its members)
    CLS = 8  # the ViT [CLS] token itself (VisionZip dominant set)


CLSAttention = Literal["concat_heads", "mean_heads"]
KeyForm = Literal["full", "mean_heads"]
# Joint-space patch embeddings of the feature layer, ``visual_projection(post_layernorm(z))``:
# ``ln_in_tower_dtype`` = the layer norm in the tower's dtype, the projection in fp32 (CDPruner);
# ``fp32`` = both in fp32 (TRIM).
PatchEmbeds = Literal["ln_in_tower_dtype", "fp32"]


@dataclass(frozen=True)
class TextSpec:
    """How a text-guided method wants its question signal computed.

    ``source``: ``question`` (dataset question, no protocol suffix), ``user_text`` (the user turn:
    question plus the protocol's answer-format suffix, TRIM), ``first_line`` (first line of the
    decoded full prompt, the released RC behaviour) or ``prompt`` (the whole rendered prompt).
    ``max_len``: CLIP context length. ``pool``: ``eot`` (HF ``text_embeds``) or ``last`` (position -1).
    ``output``: ``similarity`` (the adapter sets ``VisionSignals.text_sim``, RC) or ``embeddings``
    (it sets ``text_embeds`` and ``text_mask``; the method scores patches itself).
    ``segments``: with ``embeddings``, split the untruncated token ids into ``max_len`` segments
    (right-padded with id 0, mask 0) and embed each (CDPruner); otherwise one truncated segment.
    """

    source: Literal["question", "user_text", "first_line", "prompt"] = "question"
    max_len: int = 77
    pool: Literal["eot", "last"] = "eot"
    output: Literal["similarity", "embeddings"] = "similarity"
    segments: bool = False


@dataclass(frozen=True)
class SignalSpec:
    """What a method needs from the vision tower.

    Layers are negative offsets into the ViT (``-1`` = last layer, ``-2`` = the one before); the
    adapter resolves them with ``num_hidden_layers`` from the config.

    ``cls_attn``: ``concat_heads`` = PruMerge/RC definition (heads treated as one ``C``-wide head,
    scale ``C**-0.5``); ``mean_heads`` = per-head softmax averaged over heads (VisionZip/FasterVLM).
    ``keys``: ``full`` = raw ``k_proj`` output ``[B,N,C]``; ``mean_heads`` = reshaped to heads and
    averaged ``[B,N,C/H]``. ``vit_passes``: 2 reproduces the released RC cost profile (a second
    identical ViT pass for the joint-space patch projection).
    """

    cls_attn: CLSAttention | None = None
    cls_attn_layer: int = -1
    keys: KeyForm | None = None
    keys_layer: int = -1
    text: TextSpec | None = None
    cls_feature: bool = False
    vit_passes: int = 1
    needs_seeds: bool = False
    projected: bool = False  # the projector's output per patch (DivPrune selects on it)
    patch_embeds: PatchEmbeds | None = None  # joint-space patches of the feature layer


@dataclass
class VisionSignals:
    """Inputs of a pre-LLM compression method (one batch of images).

    Args:
        features: [B,N,C] patch features that feed the projector (CLS removed).
        cls_attn: [B,N] CLS-to-patch attention of the scoring layer, or None.
        keys: [B,N,Ck] keys of the scoring layer (patch rows only), or None.
        text_sim: [B,N] question-to-patch similarity, or None.
        grid: (H, W) patch grid with H * W == N.
        cls_feature: [B,C] the CLS row of the feature layer (VisionZip), or None.
        seeds: [B] int64 per-sample seeds (random baseline), or None.
        projected: [B,N,E] the projector's output for every patch (what the LLM would see
            uncompressed; DivPrune, CDPruner), in the model dtype, or None.
        patch_embeds: [B,N,D] fp32 joint-space patch embeddings of the feature layer,
            ``visual_projection(post_layernorm(features))``, not normalised (CDPruner, TRIM), or
            None.
        text_embeds: [B,M,D] CLIP ``text_embeds`` per text segment (``M = 1`` unless
            ``TextSpec.segments``), not normalised, in the text tower's dtype, or None.
        text_mask: [B,M] bool, True at the segments a sample has (with ``text_embeds``).
    """

    features: torch.Tensor
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_sim: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    cls_feature: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    projected: torch.Tensor | None = None
    patch_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(
                f"VisionSignals.features must be [B,N,C], got shape {tuple(self.features.shape)}"
            )
        b, n, _ = self.features.shape
        if self.grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"N={n} patches is not a square grid; pass grid=(H, W) explicitly")
            self.grid = (side, side)
        if self.grid[0] * self.grid[1] != n:
            raise ValueError(f"grid {self.grid} does not hold N={n} patches")
        for name, expect in (("cls_attn", (b, n)), ("text_sim", (b, n))):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != expect:
                raise ValueError(
                    f"VisionSignals.{name} must be [B,N]={list(expect)}, got {list(value.shape)}"
                )
        if self.keys is not None and tuple(self.keys.shape[:2]) != (b, n):
            raise ValueError(
                f"VisionSignals.keys must be [B,N,Ck] with B,N={b},{n}, got {list(self.keys.shape)}"
            )
        if self.cls_feature is not None and tuple(self.cls_feature.shape) != (
            b,
            self.features.shape[2],
        ):
            raise ValueError(
                f"VisionSignals.cls_feature must be [B,C], got {list(self.cls_feature.shape)}"
            )
        for name in ("projected", "patch_embeds"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 3 or tuple(value.shape[:2]) != (b, n)):
                raise ValueError(
                    f"VisionSignals.{name} must be [B,N,*] with B,N={b},{n}, got "
                    f"{list(value.shape)}"
                )
        if self.text_embeds is not None:
            if self.text_embeds.dim() != 3 or self.text_embeds.shape[0] != b:
                raise ValueError(
                    f"VisionSignals.text_embeds must be [B,M,D] with B={b}, got "
                    f"{list(self.text_embeds.shape)}"
                )
            if self.text_mask is None:
                self.text_mask = torch.ones(
                    self.text_embeds.shape[:2], dtype=torch.bool, device=self.text_embeds.device
                )
            if tuple(self.text_mask.shape) != tuple(self.text_embeds.shape[:2]):
                raise ValueError(
                    f"VisionSignals.text_mask must be [B,M]={list(self.text_embeds.shape[:2])}, "
                    f"got {list(self.text_mask.shape)}"
                )
        if self.seeds is not None and tuple(self.seeds.shape) != (b,):
            raise ValueError(f"VisionSignals.seeds must be [B]={b}, got {list(self.seeds.shape)}")

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_patches(self) -> int:
        return self.features.shape[1]

    def require(self, *names: str, method: str) -> None:
        """Raise a one-line error when a signal the method needs is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"method '{method}' needs signals {missing}; capture them with the method's "
                f"SignalSpec (recomp_eval.inject does this) or pass them to VisionSignals"
            )

    def check_finite(self, *names: str) -> None:
        """Raise ValueError if any named tensor holds NaN or inf (one host sync)."""
        tensors = [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]
        if not tensors:
            return
        flags = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
        bad = [n for (n, _), ok in zip(tensors, flags.tolist()) if not ok]
        if bad:
            raise ValueError(
                f"non-finite values (NaN or inf) in signals {bad}; check the model dtype "
                f"(fp16 overflow) and the input images"
            )


@dataclass
class Compressed:
    """Output of a method: what the projector and the LLM see, plus provenance.

    Args:
        features: [B,M,C] output tokens, right-padded with zeros past ``lengths``.
        lengths: [B] int64, valid rows per sample.
        source: [B,M] int64 source patch of each token (-1 for padding, summary and tokens with no
            single source such as CLS).
        role: [B,M] int8, a :class:`Role` per token.
        members: [B,M,N] bool, the patches each output token absorbed (its own patch included).
        stats: per-sample [B] tensors with method-specific counts (e.g. ``n_visual``,
            ``n_text``, ``n_centres``) and flags (e.g. ``clamped``).
        patch_scores: per-patch [B,N] scores the method ranked patches by, for diagnostics
            (``text``: the question-patch score of a text-guided method; the pipeline adds
            ``cls_attn`` when the signal was captured). Higher = more likely kept.
    """

    features: torch.Tensor
    lengths: torch.Tensor
    source: torch.Tensor
    role: torch.Tensor
    members: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    patch_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def valid(self) -> torch.Tensor:
        """[B,M] bool, True for rows below ``lengths``."""
        m = self.features.shape[1]
        return torch.arange(m, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def unpad(self) -> list[torch.Tensor]:
        """Per-sample [T_i, C] tensors (one host sync to read ``lengths``)."""
        return [f[:t] for f, t in zip(self.features, self.lengths.tolist())]

    def sample(self, i: int) -> Compressed:
        """Sample ``i`` alone, trimmed to its length (for tests and analysis)."""
        t = int(self.lengths[i])
        return Compressed(
            features=self.features[i : i + 1, :t],
            lengths=self.lengths[i : i + 1],
            source=self.source[i : i + 1, :t],
            role=self.role[i : i + 1, :t],
            members=self.members[i : i + 1, :t],
            stats={k: v[i : i + 1] for k, v in self.stats.items()},
            patch_scores={k: v[i : i + 1] for k, v in self.patch_scores.items()},
        )


def check_retention(retention: float | None) -> None:
    """Validate a retention ratio: None (adaptive) or a float in (0, 1]."""
    if retention is None:
        return
    if isinstance(retention, bool) or not isinstance(retention, (int, float)):
        raise ValueError(f"retention must be a number in (0, 1] or None, got {retention!r}")
    if not (0.0 < float(retention) <= 1.0) or math.isnan(float(retention)):
        raise ValueError(
            f"retention={retention} is outside (0, 1]; use e.g. retention=0.1 for 10% of the "
            f"visual tokens, or retention=null for the method's adaptive budget"
        )


def check_options(method: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a one-line ``ValueError`` when ``given`` (option names, e.g. a ``**options`` dict)
    holds names outside ``valid``; the message names the method, suggests the closest valid
    name and lists the valid ones."""
    valid = list(valid)
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    close = [m[0] for u in unknown if (m := difflib.get_close_matches(u, valid, n=1))]
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(
        f"unknown options {unknown} for method '{method}'{hint}; valid options: "
        f"{valid if valid else 'none'}"
    )


def choice_option(method: str, options: dict[str, Any], key: str, choices: Iterable[str],
                  default: str) -> str:  # fmt: skip
    """``options[key]`` (or ``default``) if it is one of ``choices``, else a one-line error."""
    choices = tuple(choices)
    value = options.get(key, default)
    if value not in choices:
        raise ValueError(f"{method}: {key}={value!r}; use one of {', '.join(choices)}")
    return value


def flag_option(method: str, options: dict[str, Any], key: str, default: bool = False,
                official_only: str | None = None) -> bool:  # fmt: skip
    """``options[key]`` (or ``default``) as a bool, else a one-line error; ``official_only``
    (the chosen variant) refuses the flag set on any variant but ``official`` (a release quirk)."""
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {key} must be true or false, got {value!r}")
    if value and official_only is not None and official_only != "official":
        raise ValueError(f"{method}: {key} is a quirk of variant=official only")
    return value


def budget_from_ratio(retention: float, num_tokens: int) -> int:
    """The one place that turns a retention ratio into a token budget.

    ``T = floor(retention * N + 0.5)`` (round half up), clamped to ``[1, N]``.
    """
    check_retention(retention)
    return max(1, min(num_tokens, math.floor(retention * num_tokens + 0.5)))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather rows of ``x`` [B,N,C] at ``index`` [B,K] -> [B,K,C]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B,K,C]


def selection_output(
    features: torch.Tensor,
    index: torch.Tensor,
    role: Role | torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> Compressed:
    """Build a :class:`Compressed` from selected patch indices (no merging).

    Args:
        features: [B,N,C].
        index: [B,K] int64 patch indices (rows past ``lengths`` are ignored and zeroed).
        role: one Role for all tokens, or a [B,K] int8 tensor.
        lengths: [B] valid count per sample; default K for all.
    """
    b, n, _ = features.shape
    k = index.shape[1]
    device = features.device
    if lengths is None:
        lengths = torch.full((b,), k, dtype=torch.int64, device=device)
    valid = torch.arange(k, device=device)[None, :] < lengths[:, None]  # [B,K]
    safe = torch.where(valid, index, torch.zeros_like(index))  # [B,K]
    out = gather_rows(features, safe) * valid.unsqueeze(-1).to(features.dtype)  # [B,K,C]
    if isinstance(role, torch.Tensor):
        roles = torch.where(valid, role.to(torch.int8), torch.zeros_like(role, dtype=torch.int8))
    else:
        roles = torch.where(
            valid,
            torch.full((b, k), int(role), dtype=torch.int8, device=device),
            torch.zeros((b, k), dtype=torch.int8, device=device),
        )
    members = torch.zeros(b, k, n, dtype=torch.bool, device=device)  # [B,K,N]
    members.scatter_(2, safe.unsqueeze(-1), valid.unsqueeze(-1))
    return Compressed(
        features=out,
        lengths=lengths.to(torch.int64),
        source=torch.where(valid, safe, torch.full_like(safe, -1)),
        role=roles,
        members=members,
    )
