"""Load LLaVA-NeXT checkpoints (llava-hf v1.6 layout; hub id or local folder, same code path).

The shared loading steps (:mod:`recomp_eval.models.hf_loading`: readable errors, quiet loads,
launcher variables hidden) load ``LlavaNextForConditionalGeneration``, its tokenizer (left
padding) and processor. The image processor is pinned to ``LlavaNextImageProcessorPil`` built
from the checkpoint's own settings, so the anyres crops are the same on every machine, with or
without torchvision. The CLIP text tower comes from ``model.clip_text_id``, else the folder's
``clip/`` sub-folder, else ``openai/clip-vit-large-patch14-336`` (the tower LLaVA-NeXT froze).
"""

from __future__ import annotations

from typing import Any

import torch

from recomp_eval.models.base import ModelBundle
from recomp_eval.models.clip_tower import load_clip_family
from recomp_eval.models.hf_loading import (
    _load_with,
)

PINNED_IMAGE_PROCESSOR = "LlavaNextImageProcessorPil"
_PINNABLE = ("LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil")


def load_image_processor(model_id: str) -> Any:
    """The checkpoint's anyres settings in :data:`PINNED_IMAGE_PROCESSOR` (one line when the
    checkpoint names an image processor that is not LLaVA-NeXT's)."""
    import transformers

    pinned = getattr(transformers, PINNED_IMAGE_PROCESSOR)
    config, _ = _load_with(pinned.__name__, pinned.get_image_processor_dict, model_id)
    named = config.get("image_processor_type")
    if named and named not in _PINNABLE:
        raise ValueError(
            f"{model_id}: image_processor_type '{named}' is not LLaVA-NeXT's anyres processor "
            f"({', '.join(_PINNABLE)}); is this a LLaVA-NeXT checkpoint (model.family)?"
        )
    if not config.get("image_grid_pinpoints"):
        raise ValueError(f"{model_id}: the image processor settings have no image_grid_pinpoints")
    return pinned.from_dict(config)


def load_llava_next(
    model_id: str,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    clip_text_id: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    adapter: Any = None,
) -> ModelBundle:
    """Load a ``LlavaNextForConditionalGeneration`` checkpoint as a :class:`ModelBundle`.

    Arguments as :func:`recomp_eval.models.llava.loader.load_llava`; ``adapter`` is the
    :class:`~recomp_eval.models.llava_next.adapter.LlavaNextAdapter` (with its compression
    scope and newline rule) the bundle is driven by.
    """
    from transformers import LlavaNextForConditionalGeneration

    return load_clip_family(LlavaNextForConditionalGeneration, "llava_next", model_id, dtype,
                            device, attn_implementation, clip_text_id, device_map,
                            load_image_processor, adapter, {"backend": "pil"})  # fmt: skip
