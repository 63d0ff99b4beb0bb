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

import contextlib
import functools
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from recomp_eval.models.base import ModelBundle
from recomp_eval.models.checkpoint_checks import (
    BadCheckpointError,
    ModelUnavailableError,
    check_checkpoint_folder,
)
from recomp_eval.models.llava.images import PINNED_IMAGE_PROCESSOR, check_pinnable
from recomp_eval.models.llava.pairing import (  # noqa: F401 - re-exported
    PAIRING_RTOL,
    checkpoint_name,
    clip_pairing_check,
    pairing_tensor_names,
    pairing_warning,
    vision_tower,
)

log = logging.getLogger(__name__)

DEFAULT_CLIP_TEXT_ID = "openai/clip-vit-large-patch14-336"
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


# Reports that are noise for the loads made here. The tensor-parallel plan check ("The following
# layers were not sharded: ...", "TP rules were not applied ...") means nothing without a
# ``tp_plan``, which these loads never pass; transformers 5.24 runs it whenever the
# ``transformers.modeling_utils`` logger's own level is WARNING or above (so silencing the load
# report below is what switches it on). 5.24 logs it from ``distributed.tensor_parallel``; the
# ``integrations`` name (which re-exports it) is covered too, for other releases in the range.
_TP_LOGGERS = (
    "transformers.distributed.tensor_parallel",
    "transformers.integrations.tensor_parallel",
)
_REPORT_LOGGER = "transformers.modeling_utils"  # the per-load LOAD REPORT (missing/unexpected keys)


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


def _local_folder(model_id: str) -> Path | None:
    """The folder ``model_id`` names, or ``None`` for a hub id (``org/name``: at most one ``/``)."""
    path = Path(model_id).expanduser()
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        return path
    return None


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _from_pretrained(cls: Any, model_id: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with missing or damaged checkpoints turned into one readable line.

    Local folders should pass :func:`check_checkpoint_folder` first; what it cannot see (a file
    a loader still fails to read) is reported here, never with hub download advice.
    """
    return _load_with(cls.__name__, cls.from_pretrained, model_id, **kwargs)


def _load_with(what: str, load: Callable[..., Any], model_id: str, **kwargs: Any) -> Any:
    """``load(model_id, **kwargs)`` with the error handling of :func:`_from_pretrained`."""
    from safetensors import SafetensorError

    folder = _local_folder(model_id)
    try:
        return load(model_id if folder is None else str(folder), **kwargs)
    except Exception as err:
        unreadable = (OSError, SafetensorError, json.JSONDecodeError)
        if folder is not None and isinstance(err, unreadable):
            raise BadCheckpointError(
                f"{what} could not load the checkpoint in {folder} ({_one_line(err)}); "
                f"re-download or re-save the checkpoint"
            ) from err
        if folder is None and _is_missing_error(err):
            raise _unavailable(model_id, err) from None
        raise


@contextlib.contextmanager
def _quiet_load(*logger_names: str, progress: bool = True) -> Iterator[None]:
    """Raise the named loggers to ERROR (and hide progress bars unless ``progress``) for one load.

    Levels and the bar switch are restored on exit; nothing else is touched, so real warnings of
    other loads and other libraries still show.
    """
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if bars and not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars and not progress:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def without_launch_env() -> Iterator[None]:
    """Hide torchrun/accelerate's RANK, WORLD_SIZE, ... from the environment for the block."""
    from recomp_eval.shards import DISTRIBUTED_VARS

    saved = {k: os.environ.pop(k) for k in DISTRIBUTED_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


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
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    torch_dtype = resolve_dtype(dtype)
    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder)
    placement = {} if device_map is None else {"device_map": device_map}
    # launcher variables (torchrun's WORLD_SIZE) hidden: transformers must not switch to tensor
    # parallelism because of them; each process loads its own whole model
    with _quiet_load(*_TP_LOGGERS), without_launch_env():
        model = _from_pretrained(
            LlavaForConditionalGeneration,
            model_id,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            **placement,
        )
    if device_map is None:
        model = model.to(device)
    else:  # inputs go to the device of the embeddings (accelerate moves the rest)
        device = model.get_input_embeddings().weight.device
    model = model.eval()
    processor = _from_pretrained(AutoProcessor, model_id)
    auto_class = type(processor.image_processor).__name__
    processor.image_processor = load_image_processor(model_id)
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    tokenizer.padding_side = "left"
    _check_config(model, tokenizer, model_id)
    if clip_text_id is None:
        sub = Path(model_id).expanduser() / "clip"
        clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
    from recomp_eval.models.llava.adapter import LlavaAdapter

    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=model_id,
        dtype=torch_dtype,
        device=torch.device(device),
        clip_text_id=clip_text_id,
        adapter=LlavaAdapter(),
        auto_image_processor_class=auto_class,
    )


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
