"""Load one split of a benchmark from the HF hub (pinned revision) or from local parquet.

Local layout written by ``scripts/prefetch.py`` (and by ``recomp_eval/benchmarks/fixtures.py``)::

    <data_dir>/manifest.json                      # dataset id, requested + resolved revision
    <data_dir>/<config or "default">/<split>/*.parquet

Offline without data, :class:`DatasetUnavailableError` carries one line naming the dataset, its
revision and the fix; nothing is retried.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

DEFAULT_CONFIG_DIR = "default"
MANIFEST = "manifest.json"


class DatasetUnavailableError(RuntimeError):
    """A benchmark split can be neither downloaded nor read locally (message: one line)."""


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SplitSource:
    """Where a loaded split came from (recorded in every result)."""

    dataset_id: str
    config_name: str | None
    split: str
    revision: str
    resolved_revision: str | None
    data_dir: str | None
    fingerprint: str
    num_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_dir(data_dir: str | Path, config_name: str | None, split: str) -> Path:
    """Folder holding the parquet shards of one (config, split)."""
    return Path(data_dir) / (config_name or DEFAULT_CONFIG_DIR) / split


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _fix_hint(benchmark: str) -> str:
    return (
        f"fix: run `python scripts/prefetch.py {benchmark}` on a connected machine, "
        "or set benchmark.data_dir=/path/to/parquet"
    )


def load_split(
    benchmark: str,
    dataset_id: str,
    split: str,
    revision: str = "main",
    config_name: str | None = None,
    alt_dataset_id: str | None = None,
    data_dir: str | Path | None = None,
):
    """Return ``(datasets.Dataset, SplitSource)`` for exactly one split.

    Only the requested split is read: from ``data_dir`` when given, otherwise from the hub
    (``dataset_id`` first, then ``alt_dataset_id``) at ``revision``. The ``image`` column, when
    present, is left undecoded (``{"bytes", "path"}`` dicts).
    """
    import datasets  # imported here: importing the package stays cheap

    from recomp_eval.fingerprint import data_fingerprint

    if data_dir is not None:
        folder = split_dir(data_dir, config_name, split)
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        if not files:
            raise DatasetUnavailableError(
                f"no parquet files for {dataset_id} (config {config_name or DEFAULT_CONFIG_DIR}, "
                f"split {split}) under {folder}; {_fix_hint(benchmark)}"
            )
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        manifest = read_manifest(data_dir)
        used_id = manifest.get("dataset_id", dataset_id)
        resolved = manifest.get("resolved_revision")
        revision = manifest.get("revision", revision)
    else:
        failures: list[str] = []
        ds = None
        for candidate in [dataset_id] + ([alt_dataset_id] if alt_dataset_id else []):
            try:
                ds = datasets.load_dataset(candidate, config_name, split=split, revision=revision)
            except (OSError, datasets.exceptions.DatasetsError) as err:
                failures.append(f"{candidate}: {type(err).__name__}")
                continue
            used_id = candidate
            break
        if ds is None:
            tried = "; ".join(failures)
            raise DatasetUnavailableError(
                f"dataset {dataset_id} (config {config_name or DEFAULT_CONFIG_DIR}, split {split}, "
                f"revision {revision}) is not reachable or cached [{tried}]; {_fix_hint(benchmark)}"
            ) from None
        resolved = None
    if "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    source = SplitSource(
        dataset_id=used_id,
        config_name=config_name,
        split=split,
        revision=revision,
        resolved_revision=resolved,
        data_dir=None if data_dir is None else str(data_dir),
        # local data: a fingerprint of the files themselves (manifest + parquet contents), so it
        # changes when the data does; hub data: the datasets library's cache fingerprint
        fingerprint=data_fingerprint(data_dir).digest if data_dir is not None else ds._fingerprint,
        num_rows=ds.num_rows,
    )
    return ds, source


def decode_image(value: Any, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Decode an undecoded ``image`` cell into an RGB PIL image.

    Args:
        value: ``{"bytes": ..., "path": ...}`` (hub/parquet schema) or a PIL image.
        max_pixels: images with more pixels are rejected before decoding (``huge_image``);
            defaults to PIL's decompression-bomb limit.

    Returns:
        ``(rgb_image, original_mode)``; grayscale, palette, CMYK, 16-bit and RGBA images are
        converted with ``Image.convert("RGB")`` (alpha dropped, as LLaVA and lmms-eval do).

    Raises:
        BadImageError: ``missing_image``, ``undecodable_image`` or ``huge_image``.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if value is None:
        raise BadImageError("missing_image")
    if isinstance(value, Image.Image):
        img = value
    else:
        data, path = value.get("bytes"), value.get("path")
        if not data and not path:
            raise BadImageError("missing_image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data) if data else path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise BadImageError("huge_image", type(err).__name__) from None
        except (OSError, ValueError) as err:
            raise BadImageError("undecodable_image", type(err).__name__) from None
    width, height = img.size
    if limit is not None and width * height > limit:
        raise BadImageError("huge_image", f"{width}x{height}")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError("undecodable_image", type(err).__name__) from None
    mode = img.mode
    return (img if mode == "RGB" else img.convert("RGB")), mode
