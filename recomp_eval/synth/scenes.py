"""Seeded procedural scenes for SynthVQA: textured backgrounds with 3 to 9 coloured shapes.

Sized for a 24 x 24 patch grid of 8 px patches (192 x 192 px), like LLaVA-1.5's 24 x 24 grid of
14 px patches. Small objects cover at least 3 x 3 patches; large ones 7 to 9 patches across. Some
large objects carry a letter or digit. Each scene lists its objects with their attributes and
bounding boxes, from which questions are generated (``questions.py``).

Everything derives from ``numpy.random.Generator(PCG64(seed))``: the same seed gives the same
pixels on every machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 192
PATCH = 8
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (24, 32), "large": (56, 72)}  # side in px: >= 3 and ~7-9 patches
CHARACTERS = tuple("ABCEHKMRTX") + tuple("0123456789")
MIN_OBJECTS, MAX_OBJECTS = 3, 9
TEXT_SHARE = 0.5  # share of large objects that carry a character


@dataclass
class SynthObject:
    """One object: attributes and its box ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive)."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    char: str | None = None

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def patches(self, patch: int = PATCH, grid: int = IMAGE_SIZE // PATCH) -> list[int]:
        """Raster indices of the patches the box touches."""
        x0, y0, x1, y1 = self.box
        cols = range(x0 // patch, min(grid, (x1 - 1) // patch + 1))
        rows = range(y0 // patch, min(grid, (y1 - 1) // patch + 1))
        return [r * grid + c for r in rows for c in cols]

    def describe(self, with_size: bool = True) -> str:
        return (
            f"{self.size} {self.colour} {self.shape}"
            if with_size
            else f"{self.colour} {self.shape}"
        )


@dataclass
class Scene:
    scene_id: str
    image: Image.Image = field(repr=False)
    objects: list[SynthObject]
    background: tuple[int, int, int]

    def meta(self) -> dict[str, Any]:
        return {"scene_id": self.scene_id, "objects": [asdict(o) for o in self.objects]}


def _background(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Muted base colour, a low-frequency gradient and fine noise: texture without salience."""
    base = rng.integers(150, 215, size=3)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE  # [S,S]
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-25, 25)
    stripes = np.sin((xx * np.cos(angle) - yy * np.sin(angle)) * rng.uniform(20, 60))[..., None]
    noise = rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = base[None, None, :] + gradient + 6 * stripes + noise  # [S,S,3]
    return np.clip(img, 0, 255).astype(np.uint8), (int(base[0]), int(base[1]), int(base[2]))


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SynthObject, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.box
    x1, y1 = x1 - 1, y1 - 1
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "cross":
        w = (x1 - x0) / 3
        h = (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {obj.shape}")


def _draw_char(draw: ImageDraw.ImageDraw, obj: SynthObject) -> None:
    side = obj.box[2] - obj.box[0]
    font = ImageFont.load_default(size=int(side * 0.5))
    colour = "white" if obj.colour in ("blue", "purple", "red", "green", "gray") else "black"
    cx, cy = obj.centre
    if obj.shape == "triangle":
        cy += side * 0.15  # the widest part of a triangle is low
    draw.text((cx, cy), obj.char or "", fill=colour, font=font, anchor="mm")


def _place(rng: np.random.Generator, side: int, taken: list[tuple[int, int, int, int]]):
    """A free box of ``side`` px on the patch grid (aligned to 2 px), or None after 200 tries."""
    margin = 4
    for _ in range(200):
        x0 = int(rng.integers(margin, IMAGE_SIZE - side - margin) // 2 * 2)
        y0 = int(rng.integers(margin, IMAGE_SIZE - side - margin) // 2 * 2)
        box = (x0, y0, x0 + side, y0 + side)
        if all(
            box[2] + margin <= t[0] or t[2] + margin <= box[0]
            or box[3] + margin <= t[1] or t[3] + margin <= box[1]
            for t in taken
        ):  # fmt: skip
            return box
    return None


def make_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream seeded by ``seed`` (independent of every other index)."""
    rng = np.random.default_rng([seed, index])
    pixels, background = _background(rng)
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    n_large = int(rng.integers(1, 3))  # one or two large, salient objects
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(pairs))  # unique (colour, shape) pairs per scene
    objects: list[SynthObject] = []
    taken: list[tuple[int, int, int, int]] = []
    for i in range(n_objects):
        colour, shape = pairs[order[i]]
        size = "large" if i < n_large else "small"
        lo, hi = SIZES[size]
        side = int(rng.integers(lo, hi + 1))
        box = _place(rng, side, taken)
        if box is None:
            continue
        char = None
        if size == "large" and rng.random() < TEXT_SHARE:
            char = str(CHARACTERS[int(rng.integers(len(CHARACTERS)))])
        taken.append(box)
        objects.append(SynthObject(shape, colour, size, box, char))
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj, COLOURS[obj.colour])
        if obj.char is not None:
            _draw_char(draw, obj)
    return Scene(f"s{seed}-{index:06d}", image, objects, background)
