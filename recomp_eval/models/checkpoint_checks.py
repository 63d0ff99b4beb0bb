"""Cheap checks of a local checkpoint folder before transformers loads it (one-line errors).

Reads the JSON files and the safetensors headers, never the tensor data, so a missing,
incomplete or truncated download is reported naming the file instead of a traceback from deep
inside the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the limit safetensors itself enforces


class ModelUnavailableError(RuntimeError):
    """Weights for a model id are not available (offline and not cached, or a bad path)."""


class BadCheckpointError(ModelUnavailableError):
    """A local checkpoint folder is missing, incomplete or damaged (one line naming file and fix)."""


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
