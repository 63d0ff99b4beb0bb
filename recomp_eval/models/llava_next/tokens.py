"""A compression method's output on LLaVA-NeXT crops, placed in the packed anyres order.

Methods see tower items: per crop (``scope: per_crop``, each crop its own item, budget per
crop) or per image (``scope: global``, an image's crops concatenated into one item of
``K*N`` patches, one budget over all crops; :func:`group_signals`). Either way their output is
turned into one :class:`ImageTokens` per image, in *whole-image* patch indexing (crop ``k``
patch ``p`` is ``k*N + p``, as :class:`~recomp_eval.models.llava_next.packing.PackLayout`), and
:func:`packed_order` places the tokens where stock ``pack_image_features`` puts their source
patch:

- a token with a source patch takes that patch's packed position (a merged token sits at its
  centre);
- a patch in the unpadding margin has no packed position in stock LLaVA-NeXT (its rows or
  columns are removed), so a token sourced there is dropped, as stock drops the patch itself
  (``margin_dropped`` counts them);
- a pooled token (a window, no single source) takes its window's first patch's position;
- any other token without a source (a summary token) follows its crop's rows: the base crop's
  after the base crop, a grid crop's (or an image-wide one's) after the last row of the map;
- newlines: ``row`` keeps the ``image_newline`` of each map row that holds a kept token (a
  fully dropped row loses its newline), ``all`` keeps every row's, ``none`` drops them.

With nothing compressed (``none``) the order is exactly stock's.

Letters: P tower items, K crops of an image, N patches per crop, C tower width, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from recomp_eval.methods.base import Compressed, Role, VisionSignals
from recomp_eval.models.llava_next.packing import PackLayout

NEWLINE_MODES = ("row", "all", "none")
SCOPES = ("per_crop", "global")
NEWLINE_ROLE = int(Role.PAD)  # a layout token: no patch, not a method's choice


@dataclass
class ImageTokens:
    """One image's compressed tokens in whole-image indexing (method order)."""

    features: torch.Tensor  # [T,C] (tower width) or [T,E]
    source: torch.Tensor  # [T] int64, crop-major whole-image patch, -1 without one
    role: torch.Tensor  # [T] int8
    members: torch.Tensor  # [T,K*N] bool
    crop: torch.Tensor  # [T] int64 crop of each token (-1: none, a global summary token)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # [1] per stat
    patch_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # [1,K*N]


def from_crops(c: Compressed, start: int, crops: int) -> ImageTokens:
    """Rows ``start .. start+crops`` of a per-crop :class:`Compressed` (one row per crop) as one
    image: sources shifted by ``k*N``, members laid side by side, stats summed over crops."""
    n = c.members.shape[-1]
    feats, source, role, members, crop = [], [], [], [], []
    for k in range(crops):
        row, t = start + k, int(c.lengths[start + k])
        src = c.source[row, :t]
        source.append(torch.where(src >= 0, src + k * n, src))
        block = torch.zeros((t, crops * n), dtype=torch.bool, device=c.members.device)
        block[:, k * n : (k + 1) * n] = c.members[row, :t]
        feats.append(c.features[row, :t])
        role.append(c.role[row, :t])
        members.append(block)
        crop.append(torch.full((t,), k, dtype=torch.int64, device=src.device))
    rows = slice(start, start + crops)
    stats = {
        k: (v[rows].any() if v.dtype == torch.bool else v[rows].sum()).reshape(1)
        for k, v in c.stats.items()
    }
    scores = {k: v[rows].reshape(1, -1) for k, v in c.patch_scores.items()}
    return ImageTokens(
        torch.cat(feats), torch.cat(source), torch.cat(role), torch.cat(members), torch.cat(crop),
        stats, scores,
    )  # fmt: skip


def from_image_row(c: Compressed, row: int, patches: int) -> ImageTokens:
    """Row ``row`` of a global :class:`Compressed` (one row per image over its ``K*N`` patches;
    ``patches`` = N per crop)."""
    t = int(c.lengths[row])
    src = c.source[row, :t]
    return ImageTokens(
        features=c.features[row, :t],
        source=src,
        role=c.role[row, :t],
        members=c.members[row, :t],
        crop=torch.where(src >= 0, src // patches, torch.full_like(src, -1)),
        stats={k: v[row : row + 1] for k, v in c.stats.items()},
        patch_scores={k: v[row : row + 1] for k, v in c.patch_scores.items()},
    )


def group_signals(signals: VisionSignals, members: Sequence[Sequence[int]]) -> VisionSignals:
    """One item per image from per-crop signals: the crops of ``members[g]`` (tower items, all
    of one image, equally many per group) concatenated along the patch axis.

    Per-patch fields become [G,K*N,...]; the grid is the crops stacked, (K*h, w). Per-item
    fields take the image's first item, the base crop: ``cls_feature`` (its CLS row), ``seeds``,
    and ``text_embeds``/``text_mask`` (every crop of an image carries the same text).
    """
    index = torch.as_tensor([list(m) for m in members], device=signals.features.device)  # [G,K]
    g, k = index.shape

    def patches(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        picked = x[index.reshape(-1)]  # [G*K,N,...]
        return picked.reshape(g, k * x.shape[1], *x.shape[2:])

    def first(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[index[:, 0]]

    grid = signals.grid or None
    return VisionSignals(
        features=patches(signals.features),
        cls_attn=patches(signals.cls_attn),
        keys=patches(signals.keys),
        text_sim=patches(signals.text_sim),
        grid=None if grid is None else (k * grid[0], grid[1]),
        cls_feature=first(signals.cls_feature),
        seeds=first(signals.seeds),
        projected=patches(signals.projected),
        patch_embeds=patches(signals.patch_embeds),
        text_embeds=first(signals.text_embeds),
        text_mask=first(signals.text_mask),
    )


@dataclass(frozen=True)
class PackedOrder:
    """Where an image's tokens go: ``order[t]`` is a token index of its :class:`ImageTokens`,
    or ``-1`` for a newline; ``margin_dropped`` tokens had their source in the unpadding margin."""

    order: torch.Tensor  # [T_llm] int64
    margin_dropped: int

    @property
    def newlines(self) -> int:
        return int((self.order < 0).sum())


def packed_order(layout: PackLayout, tokens: ImageTokens, newlines: str = "row") -> PackedOrder:
    """The LLM order of ``tokens`` under stock packing ``layout`` (rules in the module doc)."""
    if newlines not in NEWLINE_MODES:
        raise ValueError(f"newlines='{newlines}'; expected one of {', '.join(NEWLINE_MODES)}")
    total = layout.crops * layout.patches
    position = torch.full((total + 1,), -1, dtype=torch.int64)  # patch -> packed position
    is_patch = layout.source >= 0
    position[layout.source[is_patch]] = torch.nonzero(is_patch).flatten()
    source = anchors(tokens)
    crop = token_crops(tokens, layout.patches)
    t = source.numel()
    at = torch.where(source >= 0, position[source.clamp(min=0)], torch.full_like(source, -2))
    margin = (source >= 0) & (at < 0)
    # source-less tokens: after the base crop (crop 0), else after the whole packed image
    base_end, end = float(layout.patches) - 0.5, float(layout.length) + 0.5
    key = at.to(torch.float64)
    free = source < 0
    rank = torch.arange(t, dtype=torch.float64)[free] * 1e-6  # keep their method order
    key[free] = torch.where(crop[free] == 0, base_end, end).to(torch.float64) + rank
    keep = ~margin
    token_keys = key[keep]
    token_ids = torch.arange(t)[keep]
    nl_pos = torch.nonzero(~is_patch).flatten()  # newline positions in the full packing
    if newlines == "all":
        nl_keep = torch.ones_like(nl_pos, dtype=torch.bool)
    elif newlines == "none":
        nl_keep = torch.zeros_like(nl_pos, dtype=torch.bool)
    else:  # a row's newline survives when a kept token sits in that row
        rows_hit = layout.row[at[keep & (at >= 0)]]
        nl_rows = layout.row[nl_pos]
        nl_keep = torch.isin(nl_rows, rows_hit)
        nl_keep |= (nl_rows < 0) & bool(keep.any())  # one crop: its closing newline
    keys = torch.cat([token_keys, nl_pos[nl_keep].to(torch.float64)])
    ids = torch.cat([token_ids, torch.full((int(nl_keep.sum()),), -1, dtype=torch.int64)])
    order = ids[torch.argsort(keys, stable=True)]
    return PackedOrder(order=order, margin_dropped=int(margin.sum()))


def anchors(tokens: ImageTokens) -> torch.Tensor:
    """[T] the patch whose packed position each token takes: its source, or for a pooled token
    (no single source) the first patch of its window; -1 for tokens with neither."""
    source = tokens.source.cpu()
    members = tokens.members.cpu()
    pooled = (source < 0) & (tokens.role.cpu() == int(Role.POOLED)) & members.any(dim=-1)
    first = members.to(torch.int8).argmax(dim=-1)  # [T] first True per row
    return torch.where(pooled, first, source)


def token_crops(tokens: ImageTokens, patches: int) -> torch.Tensor:
    """[T] the crop each token belongs to (its anchor's), -1 for an image-wide summary token."""
    anchor = anchors(tokens)
    return torch.where(anchor >= 0, anchor // patches, tokens.crop.cpu())


def gather_packed(
    tokens_features: torch.Tensor, order: torch.Tensor, newline: torch.Tensor
) -> torch.Tensor:
    """[T_llm,E] rows in ``order`` from ``tokens_features`` [T,E]; ``-1`` -> ``newline`` [E]."""
    flat = torch.cat([tokens_features, newline.to(tokens_features)[None]], dim=0)
    idx = order.to(flat.device)
    return flat[torch.where(idx < 0, flat.shape[0] - 1, idx)]


def llm_provenance(tokens: ImageTokens, packed: PackedOrder) -> Compressed:
    """The image's tokens as a CPU :class:`Compressed` [1,T_llm] in LLM order (newline rows: no
    source, no members, role PAD), features dropped."""
    order = packed.order
    t, width = order.numel(), tokens.members.shape[-1]
    is_token = order >= 0
    idx = order.clamp(min=0)
    source = torch.where(is_token, tokens.source.cpu()[idx], torch.full_like(order, -1))
    role = torch.where(
        is_token, tokens.role.cpu()[idx], torch.full((t,), NEWLINE_ROLE, dtype=torch.int8)
    )
    members = tokens.members.cpu()[idx] & is_token[:, None]
    return Compressed(
        features=torch.zeros((1, t, 0)),
        lengths=torch.tensor([t]),
        source=source[None],
        role=role.to(torch.int8)[None],
        members=members.reshape(1, t, width),
        stats={k: v.detach().cpu() for k, v in tokens.stats.items()},
        patch_scores={k: v.detach().float().cpu() for k, v in tokens.patch_scores.items()},
    )
