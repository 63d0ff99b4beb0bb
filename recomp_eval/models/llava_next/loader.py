"""Load LLaVA-NeXT checkpoints (llava-hf v1.6 layout; hub id or local folder, same code path).

The shared loading steps (:mod:`recomp_eval.models.hf_loading`: readable errors, quiet loads,
launcher variables hidden) load ``LlavaNextForConditionalGeneration``, its tokenizer (left
padding) and processor. The image processor is pinned to ``LlavaNextImageProcessorPil`` built
from the checkpoint's own settings, so the anyres crops are the same on every machine, with or
without torchvision. The CLIP text tower comes from ``model.clip_text_id``, else the folder's
``clip/`` sub-folder, else ``openai/clip-vit-large-patch14-336`` (the tower LLaVA-NeXT froze).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recomp_eval.models.base import ModelBundle
from recomp_eval.models.checkpoint_checks import check_checkpoint_folder
from recomp_eval.models.clip_tower import DEFAULT_CLIP_TEXT_ID, check_feature_config
from recomp_eval.models.hf_loading import (
    _from_pretrained,
    _load_with,
    _local_folder,
    load_hf_model,
    resolve_dtype,
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
    from transformers import AutoProcessor, AutoTokenizer, LlavaNextForConditionalGeneration

    torch_dtype = resolve_dtype(dtype)
    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder)
    model, device = load_hf_model(LlavaNextForConditionalGeneration, model_id, torch_dtype,
                                  device, attn_implementation, device_map)  # fmt: skip
    if model.config.model_type != "llava_next":
        raise ValueError(
            f"{model_id} is a '{model.config.model_type}' checkpoint, not llava_next; use its "
            f"family's model config (model.family)"
        )
    processor = _from_pretrained(AutoProcessor, model_id, backend="pil")
    auto_class = type(processor.image_processor).__name__
    processor.image_processor = load_image_processor(model_id)
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    tokenizer.padding_side = "left"
    check_feature_config(model, tokenizer, model_id)
    if clip_text_id is None:
        sub = Path(model_id).expanduser() / "clip"
        clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=model_id,
        dtype=torch_dtype,
        device=device,
        clip_text_id=clip_text_id,
        adapter=adapter,
        auto_image_processor_class=auto_class,
    )
