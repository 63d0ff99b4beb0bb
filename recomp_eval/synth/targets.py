"""Target patch masks for SynthVQA questions: which model patches show the object asked about.

A SynthVQA tag names its scene (``scene_id = "s{seed}-{index:06d}"``) and the full description
of the question's object (``target = "small red triangle"``, or None for counts and absent
objects). Scenes are deterministic, so the object and its pixels are re-generated from the id
instead of being stored: :func:`target_object` finds the object, :func:`target_coverage` renders
its shape alone with the scene's own drawing routine and integrates it over a model patch grid,
:func:`target_mask` thresholds that. Pure numpy/PIL, no torch.

Geometry (the one assumption): the scene image is square (``IMAGE_SIZE`` = 192 px). LLaVA's
image processor then resizes it uniformly to its input size (pad-to-square and the centre crop
are no-ops on a square image), and the ViT cuts that input into an ``H x W`` grid with
``H = W = input / patch``. A model patch ``(r, c)`` therefore covers the image rows
``[r * S / H, (r + 1) * S / H)`` and the columns ``[c * S / W, (c + 1) * S / W)`` with
``S = 192``, whatever the input size (LLaVA-1.5's 24 x 24 grid of 14 px patches on 336 px is
8 px per patch here; 16 or 32 give 12 or 6 px). Grids that do not divide 192 (7, 10, 27, ...) are
handled with exact fractional pixel areas: each image pixel ``[y, y + 1)`` contributes to a patch
row in proportion to the length of its overlap with that row's interval (likewise columns).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from recomp_eval.synth.scenes import (
    IMAGE_SIZE,
    Scene,
    SynthObject,
    _draw_char,
    _draw_shape,
    make_scene,
)

Grid = int | tuple[int, int]

_SCENE_ID = re.compile(r"s(\d+)-(\d+)")
SCENE_CACHE = 64  # recent scenes kept: questions of one scene are usually adjacent in a split
MASK_CACHE = 256  # recent rendered objects (a few per scene)


def parse_scene_id(scene_id: str) -> tuple[int, int]:
    """``"s{seed}-{index:06d}"`` -> ``(seed, index)``; ValueError for anything else.

    The id must round-trip exactly (``"s01-000001"`` or ``"s1-1"`` are rejected), so that a
    stored id always names the scene that :func:`recomp_eval.synth.scenes.make_scene` built.
    """
    match = _SCENE_ID.fullmatch(scene_id) if isinstance(scene_id, str) else None
    if match is not None:
        seed, index = int(match[1]), int(match[2])
        if f"s{seed}-{index:06d}" == scene_id:
            return seed, index
    raise ValueError(f"malformed SynthVQA scene id {scene_id!r}; expected 's<seed>-<index:06d>'")


@lru_cache(maxsize=SCENE_CACHE)
def _scene(scene_id: str) -> Scene:
    # Re-generating a scene costs a few ms (mostly its textured background); many questions
    # share one scene, so keep a few recent ones.
    return make_scene(*parse_scene_id(scene_id))


def scene_objects(scene_id: str) -> tuple[SynthObject, ...]:
    """The objects of scene ``scene_id``, re-generated from the id (deterministic), in scene
    order. A tuple, so the cached scene's list cannot be changed by a caller."""
    return tuple(_scene(scene_id).objects)


def target_object(scene_id: str, target: str | None) -> SynthObject | None:
    """The unique object of the scene whose ``describe(with_size=True)`` equals ``target``.

    None when ``target`` is None or empty (questions about counts or absent objects). ValueError
    when no object or several objects carry that description.
    """
    if not target:
        return None
    found = [o for o in scene_objects(scene_id) if o.describe(with_size=True) == target]
    if len(found) != 1:
        what = "no object" if not found else f"{len(found)} objects"
        raise ValueError(f"scene {scene_id} has {what} described {target!r}")
    return found[0]


@lru_cache(maxsize=MASK_CACHE)
def _pixel_mask(scene_id: str, target: str) -> np.ndarray:
    """[S, S] bool (read-only): the pixels the target object's drawing touches in its scene."""
    obj = target_object(scene_id, target)
    assert obj is not None  # target is non-empty here
    side = _scene(scene_id).image.size[0]
    shape = Image.new("L", (side, side), 0)
    # The scene's own routine, so circles, triangles and crosses are their drawn pixels (PIL's
    # rasterisation), not their box. Fill 255 on an 'L' mask: only "touched or not" matters.
    _draw_shape(ImageDraw.Draw(shape), obj, 255)  # type: ignore[arg-type]
    mask = np.asarray(shape) > 0
    if obj.char is not None:
        # The character is part of the object. It is drawn in black on light objects, which
        # would erase mask pixels, so it is drawn on its own mask with a colour that makes
        # _draw_char pick white, and united: its anti-aliased rim can leave the shape by a pixel
        # (a large cross's arms are narrow).
        text = Image.new("L", (side, side), 0)
        _draw_char(ImageDraw.Draw(text), dataclasses.replace(obj, colour="gray"))
        mask |= np.asarray(text) > 0
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=32)
def _overlap_weights(n: int, size: int) -> np.ndarray:
    """[n, size] float: length of pixel ``[p, p + 1)`` inside interval ``[i * size / n,
    (i + 1) * size / n)``. Each column sums to 1, so areas are preserved exactly."""
    edges = np.arange(n + 1) * (size / n)  # [n+1]
    pixels = np.arange(size, dtype=np.float64)  # [size]
    lo = np.maximum(pixels[None, :], edges[:-1, None])
    hi = np.minimum(pixels[None, :] + 1, edges[1:, None])
    weights = np.clip(hi - lo, 0.0, None)
    weights.flags.writeable = False
    return weights


def _grid_hw(grid: Grid) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int | np.integer) else tuple(grid)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"grid must be positive, got {grid!r}")
    return int(h), int(w)


def target_coverage(
    scene_id: str, target: str | None, grid: Grid = (24, 24), image_size: int = IMAGE_SIZE
) -> np.ndarray | None:
    """Fraction of each model patch's area covered by the target object's drawn pixels.

    Args:
        scene_id: ``"s{seed}-{index:06d}"``.
        target: full description of the object (``"small red triangle"``), or None.
        grid: ``(H, W)`` model patch grid (or one int for a square grid); any positive size,
            whether or not it divides the image side (see the module docstring).
        image_size: side in px of the square scene image the grid is laid over; must equal the
            scene's (``IMAGE_SIZE``), so a future change of scene resolution fails loudly here.
    Returns:
        [H*W] float64 in [0, 1], raster order (row-major over the grid), or None when ``target``
        is None or empty. ``sum(coverage) * (S / H) * (S / W)`` equals the number of drawn pixels.
    """
    if not target:
        return None
    h, w = _grid_hw(grid)
    mask = _pixel_mask(scene_id, target)  # [S,S]
    side = mask.shape[0]
    if image_size != side:
        raise ValueError(f"scene image {scene_id} is {side} px square, not {image_size} px")
    # Covered area per patch = Wr @ mask @ Wc^T with the per-pixel overlap weights: exact for
    # fractional patch edges, since a pixel is uniform (it is in the object or not).
    rows = _overlap_weights(h, side)  # [H,S]
    cols = _overlap_weights(w, side)  # [W,S]
    area = rows @ mask.astype(np.float64) @ cols.T  # [H,W] px
    return (area / ((side / h) * (side / w))).reshape(-1)


def target_mask(
    scene_id: str, target: str | None, grid: Grid = (24, 24), threshold: float = 0.0
) -> np.ndarray | None:
    """[H*W] bool, raster order: patches whose coverage exceeds ``threshold`` (0: any pixel of
    the object), or None when ``target`` is None or empty."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    coverage = target_coverage(scene_id, target, grid)
    return None if coverage is None else coverage > threshold


def masks_for(
    tags: Mapping[str, Mapping[str, Any]], sample_ids: Iterable[str] | None, grid: Grid
) -> dict[str, np.ndarray]:
    """``sample_id -> [H*W] bool`` target mask for a tags table (``writers.read_tags``).

    ``sample_ids`` None means every sample of ``tags``; samples without a target are skipped.
    KeyError (one line) for a sample id missing from ``tags``.
    """
    out: dict[str, np.ndarray] = {}
    for sample_id in tags if sample_ids is None else sample_ids:
        if sample_id not in tags:
            raise KeyError(f"sample {sample_id!r} is not in the tags table")
        row = tags[sample_id]
        mask = target_mask(row["scene_id"], row.get("target"), grid)
        if mask is not None:
            out[sample_id] = mask
    return out


def encode_mask(mask: np.ndarray) -> str:
    """[N] bool -> ``"0"``/``"1"`` per patch (raster order), like ``keepmap.encode``."""
    flat = np.asarray(mask)
    if flat.ndim != 1:
        raise ValueError(f"mask must be 1-D [N], got shape {flat.shape}")
    return "".join("1" if v else "0" for v in flat.astype(bool))


def decode_mask(text: str) -> np.ndarray:
    """``"0"``/``"1"`` string -> [N] bool; ValueError for any other character."""
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8) - ord("0")
    if codes.size and codes.max() > 1:  # uint8 wraps characters below "0" to large values
        raise ValueError(f"mask text must contain only '0' and '1', got {text[:40]!r}")
    return codes.astype(bool)
