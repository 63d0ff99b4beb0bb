"""Load LLaVA checkpoints and the CLIP text tower (hub id or local folder, same code path).

Written against transformers 5.23-5.29 (``LlavaForConditionalGeneration`` with
``mm_encoder_outputs``; ``CLIPVisionModel`` without the ``.vision_model`` wrapper); the range is
pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_CLIP_TEXT_ID = "openai/clip-vit-large-patch14-336"
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


class ModelUnavailableError(RuntimeError):
    """Weights for a model id are not available (offline and not cached, or a bad path)."""


@dataclass
class ModelBundle:
    """A loaded LLaVA checkpoint and its preprocessing.

    ``clip_text_id`` names the CLIP repo whose text tower and ``visual_projection`` text-guided
    methods use; it is loaded on demand with :func:`load_clip_text` (once per process).
    """

    model: Any  # LlavaForConditionalGeneration
    tokenizer: Any
    processor: Any
    model_id: str
    dtype: torch.dtype
    device: torch.device
    clip_text_id: str = DEFAULT_CLIP_TEXT_ID

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)


@dataclass
class ClipText:
    """CLIP text tower with projection, its tokenizer, and the vision-side ``visual_projection``."""

    model: Any  # CLIPTextModelWithProjection
    tokenizer: Any
    visual_projection: torch.nn.Linear  # [C -> D], no bias
    model_id: str


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _unavailable(model_id: str, err: Exception) -> ModelUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    where = "offline (HF_HUB_OFFLINE=1) and " if offline else ""
    return ModelUnavailableError(
        f"model '{model_id}' is unavailable: {where}not in the local cache "
        f"({type(err).__name__}). Fix: pre-download it on a connected machine "
        f"(`huggingface-cli download {model_id}`, or scripts/prefetch.py) or point the config at "
        f"a local folder holding the checkpoint."
    )


def _is_missing_error(err: Exception) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    missing = {
        "OSError",
        "FileNotFoundError",
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "EntryNotFoundError",
        "HFValidationError",
        "OfflineModeIsEnabled",
    }
    return bool(names & missing)


def _from_pretrained(cls: Any, model_id: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with missing-weight errors turned into one readable line."""
    local = Path(model_id).expanduser()
    if local.exists():
        model_id = str(local)
    elif model_id.startswith((".", "/", "~")):
        raise ModelUnavailableError(
            f"model folder '{model_id}' does not exist; fix the path or use a hub id"
        )
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except Exception as err:
        if _is_missing_error(err):
            raise _unavailable(model_id, err) from None
        raise


def load_llava(
    model_id: str,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    clip_text_id: str | None = None,
) -> ModelBundle:
    """Load a ``LlavaForConditionalGeneration`` checkpoint with its tokenizer and processor.

    Args:
        model_id: hub id (``llava-hf/llava-1.5-7b-hf``) or a local folder (the tiny fixture).
        dtype: torch dtype or its name.
        device: where to put the model.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        clip_text_id: CLIP repo for the text tower; default: the folder's ``clip/`` sub-folder
            if present (tiny fixture), else :data:`DEFAULT_CLIP_TEXT_ID`.
    """
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    torch_dtype = resolve_dtype(dtype)
    model = _from_pretrained(
        LlavaForConditionalGeneration,
        model_id,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
    )
    model = model.to(device).eval()
    processor = _from_pretrained(AutoProcessor, model_id)
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    tokenizer.padding_side = "left"
    _check_config(model, tokenizer, model_id)
    if clip_text_id is None:
        sub = Path(model_id).expanduser() / "clip"
        clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=model_id,
        dtype=torch_dtype,
        device=torch.device(device),
        clip_text_id=clip_text_id,
    )


def _check_config(model: Any, tokenizer: Any, model_id: str) -> None:
    """Assert the assumptions the adapter makes about the checkpoint."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(
            f"{model_id}: vision_feature_layer={cfg.vision_feature_layer}; only a single int "
            f"layer is supported"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            f"{model_id}: vision_feature_select_strategy='{cfg.vision_feature_select_strategy}'; "
            f"the adapter expects 'default' (CLS dropped)"
        )
    token = tokenizer.convert_ids_to_tokens(int(cfg.image_token_id))
    if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError(f"{model_id}: image token '{token}' is not a single tokenizer token")


@functools.cache
def _load_clip_text_cached(model_id: str, dtype: torch.dtype, device: str) -> ClipText:
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    # Loading one half of a CLIPModel checkpoint reports the other half as unexpected keys; that
    # is by design here, so silence the report for these two loads only.
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        text = _from_pretrained(CLIPTextModelWithProjection, model_id, dtype=dtype)
        vision = _from_pretrained(CLIPVisionModelWithProjection, model_id, dtype=dtype)
    finally:
        report_logger.setLevel(level)
    text = text.to(device).eval()
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    projection = vision.visual_projection.to(device).eval()
    del vision  # only the projection is needed; the tower itself is LLaVA's
    return ClipText(
        model=text, tokenizer=tokenizer, visual_projection=projection, model_id=model_id
    )


def load_clip_text(
    model_id: str = DEFAULT_CLIP_TEXT_ID,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cpu",
) -> ClipText:
    """CLIP text tower + tokenizer + ``visual_projection``, loaded once per (id, dtype, device)."""
    return _load_clip_text_cached(model_id, resolve_dtype(dtype), str(torch.device(device)))
