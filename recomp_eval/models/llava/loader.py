"""Load LLaVA checkpoints and the CLIP text tower (hub id or local folder, same code path).

Written against transformers 5.23-5.29 (``LlavaForConditionalGeneration`` with
``mm_encoder_outputs``; ``CLIPVisionModel`` without the ``.vision_model`` wrapper); the range is
pinned in ``pyproject.toml``. Local folders are checked first (:func:`check_checkpoint_folder`), so
a missing, incomplete or truncated checkpoint is one line naming the file; transformers' reports
that are noise for these loads are silenced for the load call only.

The image processor is pinned to one class on every machine (:func:`load_image_processor`; why in
:mod:`recomp_eval.models.llava.images`). The CLIP checkpoint that text-guided methods pair with LLaVA's
tower is checked against that tower once per pair (:func:`clip_pairing_check`,
``ClipText.pairing``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from recomp_eval.models.base import ModelBundle
from recomp_eval.models.checkpoint_checks import (  # noqa: F401 - re-exported
    BadCheckpointError,
    ModelUnavailableError,
    check_checkpoint_folder,
)
from recomp_eval.models.clip_pairing import (  # noqa: F401 - re-exported
    PAIRING_RTOL,
    checkpoint_name,
    clip_pairing_check,
    pairing_tensor_names,
    pairing_warning,
    vision_tower,
)
from recomp_eval.models.clip_text import (  # noqa: F401 - re-exported
    DEFAULT_CLIP_TEXT_ID,
    ClipText,
    load_clip_text,
)
from recomp_eval.models.clip_tower import load_clip_family
from recomp_eval.models.hf_loading import (  # noqa: F401 - re-exported
    _from_pretrained,
    _load_with,
    _local_folder,
    _quiet_load,
    load_hf_model,
    resolve_dtype,
    without_launch_env,
)
from recomp_eval.models.llava.images import PINNED_IMAGE_PROCESSOR, check_pinnable

log = logging.getLogger(__name__)


def load_llava(
    model_id: str,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    clip_text_id: str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> ModelBundle:
    """Load a ``LlavaForConditionalGeneration`` checkpoint with its tokenizer and processor.

    Args:
        model_id: hub id (``llava-hf/llava-1.5-7b-hf``) or a local folder (the tiny fixture).
        dtype: torch dtype or its name.
        device: where to put the model.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        clip_text_id: CLIP repo for the text tower; default: the folder's ``clip/`` sub-folder
            if present (tiny fixture), else :data:`DEFAULT_CLIP_TEXT_ID`.
        device_map: ``auto`` (or an accelerate map) spreads a model larger than one GPU over
            the visible GPUs in this one process; inputs then go where the embeddings live.
    """
    from transformers import LlavaForConditionalGeneration

    from recomp_eval.models.llava.adapter import LlavaAdapter

    return load_clip_family(LlavaForConditionalGeneration, "llava", model_id, dtype, device,
                            attn_implementation, clip_text_id, device_map, load_image_processor,
                            LlavaAdapter())  # fmt: skip


def load_image_processor(model_id: str) -> Any:
    """The checkpoint's image-processor settings in the pinned class, on any machine.

    :data:`~recomp_eval.models.llava.images.PINNED_IMAGE_PROCESSOR` (``CLIPImageProcessorPil``) is built
    from the checkpoint's own settings (``preprocessor_config.json``, or the nested entry of
    ``processor_config.json``), whatever ``image_processor_type`` they name and whether or not
    torchvision is installed, so both protocols get the same pixels everywhere.

    Raises:
        ValueError: the settings name a processor the pinned class cannot stand in for
            (:func:`~recomp_eval.models.llava.images.check_pinnable`).
    """
    import transformers

    pinned = getattr(transformers, PINNED_IMAGE_PROCESSOR)
    config, _ = _load_with(pinned.__name__, pinned.get_image_processor_dict, model_id)
    check_pinnable(config, model_id)
    return pinned.from_dict(config)
