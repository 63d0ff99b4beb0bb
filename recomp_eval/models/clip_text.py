"""The CLIP text tower text-guided methods use, for every family with a CLIP ViT tower.

:func:`load_clip_text` loads the text tower, its tokenizer and the vision-side
``visual_projection`` once per (id, dtype, device); with the family's model it also checks that
the CLIP checkpoint's vision tower is the model's (:func:`clip_pairing_check`).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from recomp_eval.models.checkpoint_checks import check_checkpoint_folder
from recomp_eval.models.clip_pairing import (
    checkpoint_name,
    clip_pairing_check,
    pairing_tensor_names,
    pairing_warning,
    vision_tower,
)
from recomp_eval.models.clip_tower import DEFAULT_CLIP_TEXT_ID
from recomp_eval.models.hf_loading import (
    _REPORT_LOGGER,
    _TP_LOGGERS,
    _from_pretrained,
    _local_folder,
    _quiet_load,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class ClipText:
    """CLIP text tower with projection, its tokenizer, and the vision-side ``visual_projection``.

    ``pairing`` is :func:`clip_pairing_check`'s result for the LLaVA model passed to
    :func:`load_clip_text` (``None`` when none was): whether this CLIP checkpoint's vision tower
    is LLaVA's, i.e. whether its ``visual_projection`` fits LLaVA's patch features.
    """

    model: Any  # CLIPTextModelWithProjection
    tokenizer: Any
    visual_projection: torch.nn.Linear  # [C -> D], no bias
    model_id: str
    pairing: dict[str, Any] | None = None
    # The CLIP vision tensors the pairing check compares (on the CPU, a few MB for CLIP-L), kept
    # so a later call with a LLaVA model needs no second load; and the paired copies per model.
    _vision_reference: dict[str, torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )
    _paired: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, repr=False, compare=False
    )


@functools.cache
def _load_clip_text_cached(model_id: str, dtype: torch.dtype, device: str) -> ClipText:
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder, setting="model.clip_text_id")
    # Loading one half of a CLIPModel checkpoint reports the other half as unexpected keys; that
    # is by design here, so silence the report (and the TP-plan check it switches on, and the
    # two side-load progress bars) for these two loads only.
    with _quiet_load(_REPORT_LOGGER, *_TP_LOGGERS, progress=False):
        text = _from_pretrained(CLIPTextModelWithProjection, model_id, dtype=dtype)
        vision = _from_pretrained(CLIPVisionModelWithProjection, model_id, dtype=dtype)
    text = text.to(device).eval()
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    projection = vision.visual_projection.to(device).eval()
    # Only the projection is used (the tower that runs is LLaVA's); keep the few tensors the
    # pairing check compares, so the check needs neither this tower again nor the LLaVA model here.
    tower = vision_tower(vision)
    params = dict(tower.named_parameters())
    reference = {
        name: params[name].detach().to("cpu").clone()
        for name in pairing_tensor_names(tower.config.num_hidden_layers)
        if name in params
    }
    del vision, tower, params
    return ClipText(
        model=text,
        tokenizer=tokenizer,
        visual_projection=projection,
        model_id=model_id,
        _vision_reference=reference,
    )


def load_clip_text(
    model_id: str = DEFAULT_CLIP_TEXT_ID,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cpu",
    llava_model: torch.nn.Module | None = None,
) -> ClipText:
    """CLIP text tower + tokenizer + ``visual_projection``, loaded once per (id, dtype, device).

    With ``llava_model`` (a ``LlavaForConditionalGeneration``), the result also carries
    ``pairing``: :func:`clip_pairing_check` of this CLIP checkpoint's vision tower against that
    model's, run once per (CLIP load, LLaVA model); a mismatch logs one warning line then, never
    again for that pair. Without it, ``pairing`` is ``None`` (and the object is the one cached).
    """
    clip = _load_clip_text_cached(model_id, resolve_dtype(dtype), str(torch.device(device)))
    if llava_model is None:
        return clip
    paired = clip._paired.get(llava_model)
    if paired is None:
        result = clip_pairing_check(llava_model, clip._vision_reference)
        if not result["matches"]:
            log.warning(pairing_warning(model_id, checkpoint_name(llava_model), result))
        paired = replace(clip, pairing=result)
        clip._paired[llava_model] = paired
    return paired
