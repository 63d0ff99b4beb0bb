"""Image preprocessing per protocol: LLaVA-1.5 pad-to-square vs the processor's centre crop.

``llava15``: pad the image to a square with the CLIP mean colour (as LLaVA's ``expand2square``),
then the processor (resize to the crop size; the centre crop of a square is a no-op).
``lmms_eval``: the processor alone (resize the shortest edge, centre crop), as lmms-eval's
``llava_hf`` model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image

ImageMode = Literal["pad", "crop"]
PROTOCOL_IMAGE_MODE: dict[str, ImageMode] = {"llava15": "pad", "lmms_eval": "crop"}
_MAX_CHANNEL = 255


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's ``image_mean`` as 8-bit RGB, truncated like LLaVA's ``int(x * 255)``."""
    return tuple(int(x * _MAX_CHANNEL) for x in image_processor.image_mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square canvas of its longer side, centred, filled with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_mode(protocol: str) -> ImageMode:
    if protocol not in PROTOCOL_IMAGE_MODE:
        raise ValueError(
            f"unknown protocol '{protocol}'; known: {', '.join(sorted(PROTOCOL_IMAGE_MODE))}"
        )
    return PROTOCOL_IMAGE_MODE[protocol]


def preprocess_images(
    images: Sequence[Image.Image], image_processor: Any, protocol: str
) -> torch.Tensor:
    """Turn PIL images into ``pixel_values`` [B,3,S,S] (float32) for the given protocol."""
    rgb = [im.convert("RGB") for im in images]
    if image_mode(protocol) == "pad":
        background = mean_colour(image_processor)
        rgb = [expand_to_square(im, background) for im in rgb]
    return image_processor(images=rgb, return_tensors="pt")["pixel_values"]
