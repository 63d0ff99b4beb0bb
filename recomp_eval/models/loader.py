"""Load LLaVA checkpoints and the CLIP text tower (hub id or local folder, same code path).

Written against transformers 5.23-5.29 (``LlavaForConditionalGeneration`` with
``mm_encoder_outputs``; ``CLIPVisionModel`` without the ``.vision_model`` wrapper); the range is
pinned in ``pyproject.toml``. Local folders are checked first (:func:`check_checkpoint_folder`), so
a missing, incomplete or truncated checkpoint is one line naming the file; transformers' reports
that are noise for these loads are silenced for the load call only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
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
_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the limit safetensors itself enforces


class ModelUnavailableError(RuntimeError):
    """Weights for a model id are not available (offline and not cached, or a bad path)."""


class BadCheckpointError(ModelUnavailableError):
    """A local checkpoint folder is missing, incomplete or damaged (one line naming file and fix)."""


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
    from safetensors import SafetensorError

    folder = _local_folder(model_id)
    try:
        return cls.from_pretrained(model_id if folder is None else str(folder), **kwargs)
    except Exception as err:
        unreadable = (OSError, SafetensorError, json.JSONDecodeError)
        if folder is not None and isinstance(err, unreadable):
            raise BadCheckpointError(
                f"{cls.__name__} could not load the checkpoint in {folder} ({_one_line(err)}); "
                f"re-download or re-save the checkpoint"
            ) from err
        if folder is None and _is_missing_error(err):
            raise _unavailable(model_id, err) from None
        raise


def _json_error(file: Path) -> str | None:
    """Why ``file`` is not valid JSON (with line and column), or ``None`` when it parses."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        return f"invalid JSON in {file}: not UTF-8 text (byte {err.start})"
    except json.JSONDecodeError as err:
        what = "empty file" if not err.doc.strip() else err.msg
        return f"invalid JSON in {file}: {what} at line {err.lineno} column {err.colno}"
    return None


def _safetensors_error(file: Path) -> str | None:
    """Why ``file`` cannot be a complete safetensors file, from its header and size alone.

    Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor to
    its ``data_offsets`` ``[begin, end)`` in the data that follows; the file ends where the last
    tensor ends. The tensor data itself is never read.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return (
                f"truncated weight file {file}: {size} bytes, shorter than the 8-byte header length"
            )
        n = int.from_bytes(prefix, "little")
        if n > _MAX_SAFETENSORS_HEADER:
            return f"corrupt weight file {file}: header length {n} is not plausible"
        if 8 + n > size:
            return f"truncated weight file {file}: {size} bytes, but its header alone needs {8 + n}"
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [
            int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"
        ]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"corrupt weight file {file}: its safetensors header is not valid"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return (
            f"truncated weight file {file}: {size} of {expected} bytes ({100 * size // expected}%)"
        )
    if size > expected:
        return f"corrupt weight file {file}: {size} bytes, {size - expected} past its tensor data"
    return None


def check_checkpoint_folder(path: str | Path, setting: str = "model.id") -> None:
    """Raise :class:`BadCheckpointError` unless ``path`` looks like a complete local checkpoint.

    Cheap (reads the JSON files and the safetensors headers, never the tensor data); checks, in
    order: the folder exists; it holds ``config.json``; every ``*.json`` in it parses; every shard
    a ``*.index.json`` names is present; there is at least one weight file; every
    ``*.safetensors`` file is as long as its header says.

    Args:
        path: the checkpoint folder (``~`` is expanded).
        setting: the config key named in the fix (``model.id``, ``model.clip_text_id``).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise BadCheckpointError(
            f"model folder '{folder}' does not exist; fix the path ({setting}) or use a hub id"
        )
    point = f"point {setting} at the folder that holds config.json and the weights"
    if not folder.is_dir():
        raise BadCheckpointError(f"not a checkpoint folder: {folder} is a file; {point}")
    if not (folder / "config.json").is_file():
        raise BadCheckpointError(f"not a checkpoint folder: no config.json in {folder}; {point}")
    for file in sorted(folder.glob("*.json")):
        if problem := _json_error(file):
            raise BadCheckpointError(f"{problem}; fix the file or re-download it")
    for index in sorted(folder.glob("*.index.json")):
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise BadCheckpointError(f"{index} has no 'weight_map'; re-download it")
        missing = sorted({str(s) for s in weight_map.values()} - {p.name for p in folder.iterdir()})
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise BadCheckpointError(
                f"{index} names {len(missing)} shard(s) missing from {folder}: {shown}; "
                f"re-download them (partial download?)"
            )
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("pytorch_model*.bin")):
        raise BadCheckpointError(
            f"no weight files in {folder} (model.safetensors, model-*.safetensors with their "
            f"index, or pytorch_model*.bin); re-download the checkpoint or {point}"
        )
    for file in shards:
        if problem := _safetensors_error(file):
            raise BadCheckpointError(f"{problem}; re-download it (partial download?)")


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
    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder)
    with _quiet_load(*_TP_LOGGERS):  # keeps the one "Loading weights" bar of the main load
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
