"""Family-neutral checkpoint loading: dtypes, readable load errors, quiet loads, launcher env.

Every family's loader (``recomp_eval/models/<family>/loader.py``) goes through these, so a
missing, incomplete or truncated checkpoint is one line naming the file, whatever the family;
transformers' reports that are noise for these loads are silenced for the load call only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from recomp_eval.models.checkpoint_checks import BadCheckpointError, ModelUnavailableError

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


def load_hf_model(
    model_class: Any,
    model_id: str,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_implementation: str,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, torch.device]:
    """``model_class.from_pretrained`` in eval mode, and the device its inputs go to.

    Launcher variables (torchrun's ``WORLD_SIZE``) are hidden during the load: transformers must
    not switch to tensor parallelism because of them; each process loads its own whole model.
    With ``device_map`` (``auto``) the model spreads over the visible GPUs and inputs go where
    the embeddings live.
    """
    placement = {} if device_map is None else {"device_map": device_map}
    with _quiet_load(*_TP_LOGGERS), without_launch_env():
        model, info = _from_pretrained(
            model_class, model_id, dtype=dtype, attn_implementation=attn_implementation,
            output_loading_info=True, **placement,
        )  # fmt: skip
    check_loading_info(info, model_id)
    if device_map is None:
        model = model.to(device)
    else:
        device = model.get_input_embeddings().weight.device
    return model.eval(), torch.device(device)


def check_loading_info(info: dict[str, Any], model_id: str) -> None:
    """One line when the checkpoint's tensors do not fill the model: a missing tensor would
    stay randomly initialised and every result from it would be noise."""
    problems = {key: sorted(info.get(key) or ()) for key in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}  # fmt: skip
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {len(v)} (e.g. {v[0]})"
                           for k, v in problems.items())  # fmt: skip
        raise BadCheckpointError(
            f"{model_id} does not match its model class ({detail}); the weights are incomplete "
            f"or from another architecture: re-download the checkpoint or check model.family"
        )
