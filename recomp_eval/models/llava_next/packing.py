"""The LLaVA-NeXT (anyres) family's pure steps, checked against stock transformers 5.x.

An image is a base crop (the whole image resized) plus a grid of crops chosen from
``config.image_grid_pinpoints``; every crop is one CLIP tower pass item with ``N`` patches.
Stock ``get_image_features`` runs the tower over all crops at once, takes the
``vision_feature_layer`` hidden state, drops CLS, projects, splits per image and
``pack_image_features``: base crop first, then the grid crops as one spatial map with
``unpad_image`` (rows or columns of the aspect-ratio padding removed) and ``image_newline``
after every row of the map.

Here the same steps are split so a method can act per crop before packing:

- :func:`crop_features`: one tower pass -> per sample ``[crops_i, N, C]`` (CLS dropped);
- :func:`project_crops`: the projector on them -> per sample ``[crops_i, N, E]``;
- :func:`pack_layout`: where each packed row comes from (an index into the sample's flattened
  ``crops_i * N`` crop features, ``-1`` for a newline) and its row of the unpadded grid;
- :func:`pack`: the stock packing as a gather along that layout;
- :func:`packed_keep` / :func:`pack_kept`: a per-crop keep mask carried through the packing;
- :func:`image_features_arg` / :func:`forward_with_features`: the LLM pass with precomputed
  features through ``mm_encoder_outputs`` (as the LLaVA-1.5 adapter).

Letters: B images, K_i crops of image i, N patches per crop, C tower width, E LLM width,
T_i packed rows of image i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recomp_eval.models.llm_inputs import (
    expand_image_tokens,
    generate_with_features,
    image_features_arg,
)

__all__ = [
    "PackLayout",
    "crop_features",
    "crops_per_image",
    "expand_image_tokens",
    "flatten_crops",
    "forward_with_features",
    "generate_with_features",
    "image_features_arg",
    "pack",
    "pack_kept",
    "pack_layout",
    "packed_keep",
    "project_crops",
]


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaNextModel`` of a ``LlavaNextForConditionalGeneration`` (or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "image_newline") or not hasattr(inner, "vision_tower"):
        raise RuntimeError(
            f"{type(model).__name__} has no model.image_newline / model.vision_tower; expected a "
            f"transformers 5.x LlavaNextForConditionalGeneration"
        )
    return inner


def _size_list(image_size: Any) -> list[int]:
    return [int(v) for v in (image_size.tolist() if hasattr(image_size, "tolist") else image_size)]


def crops_per_image(model: torch.nn.Module, image_sizes: Any) -> list[int]:
    """``K_i`` crops of each image (base crop included) from its (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    return [
        image_size_to_num_patches(
            _size_list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        for size in image_sizes
    ]


def flatten_crops(
    model: torch.nn.Module, pixel_values: torch.Tensor, image_sizes: Any
) -> tuple[torch.Tensor, list[int]]:
    """The real crops of all images as one tower batch ``[sum K_i, 3, S, S]`` and the ``K_i``.

    ``pixel_values`` as the processor gives them, ``[B, max K, 3, S, S]`` (the zero crops it pads
    with are dropped, as stock does), or already flat ``[sum K_i, 3, S, S]``.
    """
    counts = crops_per_image(model, image_sizes)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pv[:k] for pv, k in zip(pixel_values, counts)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dims")
    if pixel_values.shape[0] != sum(counts):
        raise ValueError(
            f"pixel_values hold {pixel_values.shape[0]} crops; image_sizes imply {sum(counts)}"
        )
    return pixel_values, counts


@torch.no_grad()
def crop_features(
    model: torch.nn.Module, pixel_values: torch.Tensor, image_sizes: Any
) -> list[torch.Tensor]:
    """Per image ``[K_i, N, C]`` feature-layer patch features (CLS dropped), one tower pass.

    What stock ``get_image_features`` feeds its projector (``vision_feature_layer`` an int and
    ``vision_feature_select_strategy`` ``default``, as in every llava-hf NeXT checkpoint).
    """
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_layer={layer}, vision_feature_select_strategy="
            f"'{cfg.vision_feature_select_strategy}': only one int layer with CLS dropped "
            f"('default') is supported"
        )
    tower = _inner(model).vision_tower
    pixels, counts = flatten_crops(model, pixel_values, image_sizes)
    dtype = next(tower.parameters()).dtype
    out = tower(pixels.to(tower.device, dtype), output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[layer][:, 1:]  # [sum K_i, N, C]
    return list(torch.split(feats, counts, dim=0))


@torch.no_grad()
def project_crops(model: torch.nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The projector on per-image ``[K_i, N, C]`` (or any ``[..., C]``) -> ``[K_i, N, E]``."""
    projector = _inner(model).multi_modal_projector
    return [projector(f) for f in features]


@dataclass(frozen=True)
class PackLayout:
    """Where the ``T`` packed rows of one image come from.

    ``source[t]`` indexes the image's flattened crop features ``[K*N]`` (crop-major, patches
    row-major in a crop: crop ``k`` patch ``p`` is ``k*N + p``) or is ``-1`` for a newline;
    ``row[t]`` is the row of the unpadded grid map the packed row belongs to (its newline
    included), ``-1`` for the base crop. ``grid`` is the unpadded map's (rows, cols) in patches.
    """

    source: torch.Tensor  # [T] int64
    row: torch.Tensor  # [T] int64
    crops: int  # K
    patches: int  # N
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        return int(self.source.numel())

    @property
    def newlines(self) -> int:
        return int((self.source < 0).sum())


def pack_layout(model: torch.nn.Module, image_size: Any) -> PackLayout:
    """The packing of stock ``pack_image_features`` for one image of (height, width).

    The grid crops form a ``(gh*h, gw*w)`` map of patch indices (crop ``1 + gi*gw + gj`` holds
    the block at grid cell (gi, gj)); stock ``unpad_image`` removes the padding rows or columns,
    a newline closes every remaining row, and the base crop's ``N`` patches come first.
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n = side * side
    size = _size_list(image_size)
    crops = crops_per_image(model, [size])[0]
    base = torch.arange(n, dtype=torch.int64)
    if crops == 1:  # stock: the single crop, then one newline
        source = torch.cat([base, torch.tensor([-1])])
        return PackLayout(source, torch.full_like(source, -1), 1, n, (0, 0))
    gh, gw = get_anyres_image_grid_shape(
        size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
    )
    if gh * gw != crops - 1:
        raise ValueError(f"image {size}: {crops - 1} grid crops but a {gh} x {gw} grid")
    k = torch.arange(1, crops, dtype=torch.int64).view(gh, gw, 1, 1)
    p = torch.arange(n, dtype=torch.int64).view(1, 1, side, side)
    index = (k * n + p).permute(0, 2, 1, 3).reshape(gh * side, gw * side)  # the spatial map
    index = unpad_image(index[None], size)[0]  # [rows, cols]
    rows, cols = index.shape
    grid = torch.cat([index, torch.full((rows, 1), -1, dtype=torch.int64)], dim=1)
    row = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, cols + 1)
    source = torch.cat([base, grid.reshape(-1)])
    row = torch.cat([torch.full((n,), -1, dtype=torch.int64), row.reshape(-1)])
    return PackLayout(source, row, crops, n, (rows, cols))


def _gather(model: torch.nn.Module, feats: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Rows ``source`` of the flattened ``[K, N, E]`` features; ``-1`` -> ``image_newline``."""
    newline = _inner(model).image_newline.to(feats.device, feats.dtype)
    flat = torch.cat([feats.reshape(-1, feats.shape[-1]), newline[None]], dim=0)  # [K*N+1, E]
    src = source.to(feats.device)
    return flat[torch.where(src < 0, flat.shape[0] - 1, src)]


def pack(
    model: torch.nn.Module, features: Sequence[torch.Tensor], image_sizes: Any
) -> list[torch.Tensor]:
    """Per image ``[T_i, E]``: stock ``pack_image_features`` of projected ``[K_i, N, E]`` crops."""
    out = []
    for feats, size in zip(features, image_sizes, strict=True):
        layout = pack_layout(model, size)
        if feats.shape[0] != layout.crops or feats.shape[1] != layout.patches:
            raise ValueError(
                f"image {_size_list(size)}: features {tuple(feats.shape)}; expected "
                f"[{layout.crops}, {layout.patches}, E]"
            )
        out.append(_gather(model, feats, layout.source))
    return out


def packed_keep(layout: PackLayout, keep: torch.Tensor, newlines: str = "row") -> torch.Tensor:
    """Which packed rows survive a per-crop keep mask ``keep`` [K, N] (bool).

    A patch row survives when its patch is kept (patches in the unpadding margin have no packed
    row whatever the mask). ``newlines``: ``row`` keeps a grid row's newline when any patch of
    that row is kept (a fully dropped row loses its newline), ``all`` keeps every newline,
    ``none`` drops them all. Returns [T] bool.
    """
    if tuple(keep.shape) != (layout.crops, layout.patches):
        raise ValueError(
            f"keep mask {tuple(keep.shape)}; expected [{layout.crops}, {layout.patches}]"
        )
    flat = keep.reshape(-1).to(torch.bool).cpu()
    is_newline = layout.source < 0
    kept = torch.zeros(layout.length, dtype=torch.bool)
    kept[~is_newline] = flat[layout.source[~is_newline]]
    if newlines == "all":
        kept[is_newline] = True
    elif newlines == "row":
        grid = layout.row >= 0
        rows = max(layout.grid[0], 1)
        row_any = torch.zeros(rows, dtype=torch.bool)
        hit = kept & grid & ~is_newline
        row_any[layout.row[hit]] = True
        nl_grid = is_newline & grid
        kept[nl_grid] = row_any[layout.row[nl_grid]]
        kept[is_newline & ~grid] = bool(flat.any())  # the single-crop case: one closing newline
    elif newlines != "none":
        raise ValueError(f"newlines='{newlines}'; expected one of row, all, none")
    return kept


def pack_kept(
    model: torch.nn.Module,
    features: Sequence[torch.Tensor],
    image_sizes: Any,
    keeps: Sequence[torch.Tensor],
    newlines: str = "row",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image the packed ``[T_i, E]`` rows that survive ``keeps[i]`` [K_i, N] (in packed
    order), and the [T_full_i] bool mask over the full packing (:func:`packed_keep`)."""
    packed, masks = [], []
    for feats, size, keep in zip(features, image_sizes, keeps, strict=True):
        layout = pack_layout(model, size)
        mask = packed_keep(layout, keep, newlines)
        packed.append(_gather(model, feats, layout.source[mask]))
        masks.append(mask)
    return packed, masks


@torch.no_grad()
def forward_with_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    features: Sequence[torch.Tensor],
    **kwargs: Any,
) -> Any:
    """One forward with precomputed per-image ``[T_i, E]`` rows (``mm_encoder_outputs``); the
    prompt must hold exactly ``sum T_i`` image tokens (stock checks it)."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_encoder_outputs=image_features_arg(features),
        **kwargs,
    )
