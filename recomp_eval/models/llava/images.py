"""Image preprocessing per protocol: LLaVA-1.5 pad-to-square vs the processor's centre crop.

``llava15``: pad the image to a square with the CLIP mean colour (as LLaVA's ``expand2square``),
then the processor (resize to the crop size; the centre crop of a square is a no-op).
``lmms_eval``: the processor alone (resize the shortest edge, centre crop), as lmms-eval's
``llava_hf`` model does.

Both run on one pinned image-processor class, :data:`PINNED_IMAGE_PROCESSOR`, whatever the machine
has installed (see the comment there); :func:`check_pinnable` says which checkpoint settings it can
stand in for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image

ImageMode = Literal["pad", "crop"]
_MAX_CHANNEL = 255

# Why one class, and why this one. transformers 5.x maps ``image_processor_type:
# "CLIPImageProcessor"`` (what llava-hf/llava-1.5-7b-hf ships) to a backend chosen at load time
# (``models/auto/image_processing_auto.py``, ``_resolve_backend``): with no ``backend`` argument it
# takes the torchvision class (``CLIPImageProcessor`` is now the ``TorchvisionBackend`` one) when
# torchvision imports, else ``CLIPImageProcessorPil``. ``use_fast=False`` still works but is
# deprecated (it warns and means ``backend="pil"``); ``AutoProcessor.from_pretrained(...,
# backend="pil")`` also hands ``backend`` to the tokenizer, whose own ``backend`` attribute it then
# overwrites ("pil" instead of "tokenizers"), so neither is used here. The two backends resize
# differently (PIL on 8-bit images vs torchvision's tensor resize): on the CPU, transformers 5.24,
# torchvision 0.28, up to 2 of 255 levels, with about 0.3-0.4% of the values off by one level or
# more (scripts/compare_image_processors.py, results/bench/image_processors.md). Small, but a GPU
# machine with torchvision would otherwise feed the model other pixels than a CPU one without it.
# The PIL class is pinned because the reference results were made with PIL resizing: LLaVA-1.5's
# own evaluation (the "slow" CLIPImageProcessor of its transformers 4.3x pin, PIL only) and
# lmms-eval's published llava-1.5 numbers (made while ``use_fast`` still defaulted to False).
# Note that lmms-eval's ``llava_hf`` wrapper, run today on transformers 5.x beside torchvision,
# would get the torchvision class (it calls ``AutoProcessor.from_pretrained`` with no backend):
# the ``lmms_eval`` protocol follows its reference results, not that default.
PINNED_IMAGE_PROCESSOR = "CLIPImageProcessorPil"
# Checkpoint image-processor types (backend-free base names) whose settings the pinned class
# applies exactly as their own PIL class would: ``LlavaImageProcessorPil`` is CLIP's plus an
# optional pad-to-square (``do_pad``, off by default), which the protocol decides instead.
_PINNABLE = ("CLIPImageProcessor", "LlavaImageProcessor")
_BACKEND_SUFFIXES = ("Fast", "Pil")


def image_processor_family(class_name: str) -> str:
    """The backend-free base name: ``CLIPImageProcessorPil``/``...Fast`` -> ``CLIPImageProcessor``."""
    for suffix in _BACKEND_SUFFIXES:
        if class_name.endswith(suffix):
            return class_name[: -len(suffix)]
    return class_name


def check_pinnable(config: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless :data:`PINNED_IMAGE_PROCESSOR` can stand in for ``config``.

    Args:
        config: a checkpoint's image-processor settings (``preprocessor_config.json``, or the
            ``image_processor`` entry of ``processor_config.json``).
        where: the checkpoint, for the message.
    """
    name = config.get("image_processor_type") or str(
        config.get("feature_extractor_type") or ""
    ).replace("FeatureExtractor", "ImageProcessor")
    family = image_processor_family(name)
    if name and family not in _PINNABLE:
        raise ValueError(
            f"{where}: image processor '{name}' is not CLIP-style; the protocols pin "
            f"{PINNED_IMAGE_PROCESSOR} (resize the shortest edge, centre crop, normalise), which "
            f"can stand in for {', '.join(_PINNABLE)} only"
        )
    if family == "LlavaImageProcessor" and config.get("do_pad"):
        raise ValueError(
            f"{where}: its {name} pads to a square itself (do_pad: true); the protocol decides "
            f"padding (recomp_eval.models.llava.images): set do_pad to false in its image-processor config"
        )


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
    """``pad`` or ``crop``: the protocol's ``image_mode`` (``configs/protocol/<name>.yaml``)."""
    from recomp_eval.benchmarks.specs import protocol_spec

    mode = protocol_spec(protocol).image_mode
    if mode not in ("pad", "crop"):
        raise ValueError(f"protocol '{protocol}' has image_mode '{mode}'; use pad or crop")
    return mode  # type: ignore[return-value]


def pad_colour(protocol: str, image_processor: Any) -> tuple[int, int, int]:
    """The protocol's ``pad_color``, else the processor's mean colour (LLaVA's choice)."""
    from recomp_eval.benchmarks.specs import protocol_spec

    colour = protocol_spec(protocol).pad_color
    return tuple(colour) if colour else mean_colour(image_processor)  # type: ignore[return-value]


def preprocess_images(
    images: Sequence[Image.Image], image_processor: Any, protocol: str
) -> torch.Tensor:
    """Turn PIL images into ``pixel_values`` [B,3,S,S] (float32) for the given protocol."""
    rgb = [im.convert("RGB") for im in images]
    if image_mode(protocol) == "pad":
        background = pad_colour(protocol, image_processor)
        rgb = [expand_to_square(im, background) for im in rgb]
    return image_processor(images=rgb, return_tensors="pt")["pixel_values"]
