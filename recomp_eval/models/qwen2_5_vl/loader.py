"""Load Qwen2.5-VL checkpoints (hub id or local folder) with the shared loading steps.

The image processor is the checkpoint's, torchvision-free (``backend="pil"``), with the model
options ``min_pixels`` / ``max_pixels`` written over the checkpoint's pixel bounds when set (they
decide each image's grid, so they are part of the run's identity through the model config).
"""

from __future__ import annotations

from typing import Any

import torch

from recomp_eval.models.base import ModelBundle
from recomp_eval.models.checkpoint_checks import check_checkpoint_folder
from recomp_eval.models.hf_loading import (
    _from_pretrained,
    _load_with,
    _local_folder,
    load_hf_model,
    resolve_dtype,
)


def set_pixel_bounds(image_processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Write the pixel bounds over the processor's (``size`` and the legacy attributes)."""
    size = dict(getattr(image_processor, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
        if hasattr(image_processor, "min_pixels"):
            image_processor.min_pixels = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
        if hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = int(max_pixels)
    if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
        raise ValueError(
            f"model.options.min_pixels={size['shortest_edge']} is above max_pixels="
            f"{size['longest_edge']}; lower min_pixels or raise max_pixels"
        )
    image_processor.size = size


def pixel_bounds(image_processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor resizes within."""
    size = getattr(image_processor, "size", None) or {}
    low = size.get("shortest_edge", getattr(image_processor, "min_pixels", None))
    high = size.get("longest_edge", getattr(image_processor, "max_pixels", None))
    return int(low), int(high)


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """The stock processor; only the class check of the absent (``None``) video processor
        is skipped (its base class cannot be imported without torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(folder: str):
    """The stock ``Qwen2_5_VLProcessor`` of ``folder`` (tiny or real layout), torchvision-free.

    ``AutoProcessor.from_pretrained(folder, backend="pil")`` is tried first; in transformers 5.x
    it raises ``ImportError`` ("Video processor cannot be loaded - requested pil backend is not
    available": ``qwen2_5_vl`` maps to the torchvision-only ``Qwen2VLVideoProcessor``), and the
    processor is then built from the parts ``from_pretrained`` reads: the image processor
    (``AutoImageProcessor`` with ``backend="pil"``: ``Qwen2VLImageProcessorPil``), the tokenizer
    and the chat template (``chat_template.json``), with no video processor. Images and text go
    through the stock ``__call__`` and ``apply_chat_template``; videos are not supported.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    try:
        return AutoProcessor.from_pretrained(folder, backend="pil")
    except ImportError:
        pass
    processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(folder)
    return _image_only_processor_class()(
        image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=None,
        chat_template=processor_dict.get("chat_template"),
    )


def load_qwen(
    model_id: str,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    adapter: Any = None,
) -> ModelBundle:
    """Load a ``Qwen2_5_VLForConditionalGeneration`` checkpoint as a :class:`ModelBundle`."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch_dtype = resolve_dtype(dtype)
    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder)
    model, device = load_hf_model(Qwen2_5_VLForConditionalGeneration, model_id, torch_dtype,
                                  device, attn_implementation, device_map)  # fmt: skip
    if model.config.model_type != "qwen2_5_vl":
        raise ValueError(
            f"{model_id} is a '{model.config.model_type}' checkpoint, not qwen2_5_vl; use its "
            f"family's model config (model.family)"
        )
    processor = _load_with("Qwen2_5_VLProcessor", load_processor, model_id)
    set_pixel_bounds(processor.image_processor, min_pixels, max_pixels)
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    tokenizer.padding_side = "left"
    processor.tokenizer.padding_side = "left"
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=model_id,
        dtype=torch_dtype,
        device=device,
        adapter=adapter,
        auto_image_processor_class=type(processor.image_processor).__name__,
    )
