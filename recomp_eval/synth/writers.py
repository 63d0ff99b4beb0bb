"""Write SynthVQA as synth-GQA, -VQAv2, -TextVQA, -POPE and -MME in the real hub schemas.

``write_benchmark(name, out, seed, n_images)`` writes ``out/<name>/`` in the layout
``scripts/prefetch.py`` produces (``manifest.json`` + ``<config>/<split>/*.parquet``), so
``benchmark=<name> benchmark.data_dir=out/<name>`` runs the real loader and metrics unchanged.
The loaders copy no free-form column into ``Sample.meta``, so the slicing tags (question family,
object size, near-large flag, target) go to a side table ``out/<name>/tags.parquet`` keyed by the
loader's ``sample_id`` (read it with :func:`read_tags`).

Deterministic: the same ``(seed, n_images)`` gives byte-identical files (seeded numpy streams per
image and benchmark, fixed PNG and parquet options, no timestamps in the manifest). The manifest
records ``dataset_id = synthvqa/<name>`` and ``revision = <SYNTH_VERSION>-seed<seed>``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recomp_eval.synth import builders
from recomp_eval.synth.scenes import Scene, make_scene
from recomp_eval.synth.schemas import BENCHMARKS, CONFIGS, GQA_IMAGE_CONFIG, SPLITS, hub_features

SYNTH_VERSION = "synthvqa-1"  # bump on any change to scenes.py, questions.py or the builders
EVAL_SEED = 1_000_003  # held out: the demo model trains on seed 0
DEFAULT_IMAGES = 100  # images per benchmark: a few hundred questions each
PNG_COMPRESS_LEVEL = 6
TAGS_FILE = "tags.parquet"
MANIFEST = "manifest.json"
_SALT = {name: k + 1 for k, name in enumerate(BENCHMARKS)}  # independent rng stream per benchmark


def png_cell(image) -> dict[str, Any]:
    """``{"bytes", "path"}`` cell of the HF ``Image`` feature, PNG-encoded deterministically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return {"bytes": buf.getvalue(), "path": None}


def scenes_for(
    name: str, seed: int, n_images: int, accept: Callable[[Scene], bool] | None = None
) -> Iterator[tuple[int, Scene, np.random.Generator]]:
    """The first ``n_images`` scenes of stream ``seed`` that ``accept`` (all by default), each
    with its own question rng for benchmark ``name``."""
    taken = index = 0
    while taken < n_images:
        scene = make_scene(seed, index)
        if accept is None or accept(scene):
            yield index, scene, np.random.default_rng([seed, index, _SALT[name]])
            taken += 1
        index += 1


def _write_parquet(rows: list[dict], features, folder: Path, split: str) -> None:
    """One shard named as ``scripts/prefetch.py`` names it, written by ``datasets`` (as the hub
    export and the test fixtures are), its progress bar silenced and restored."""
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    folder.mkdir(parents=True, exist_ok=True)
    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        Dataset.from_list(rows, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet")
        )
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def _write_tags(tags: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("sample_id", pa.string()), ("scene_id", pa.string()), ("family", pa.string()),
            ("size", pa.string()), ("near_large", pa.bool_()), ("target", pa.string()),
            ("question", pa.string()), ("answer", pa.string()),
        ]
    )  # fmt: skip
    table = pa.Table.from_pylist(tags, schema=schema)
    pq.write_table(table, str(path), compression="snappy", write_statistics=False)


def read_tags(data_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``sample_id -> {scene_id, family, size, near_large, target, question, answer}``."""
    import pyarrow.parquet as pq

    rows = pq.read_table(str(Path(data_dir) / TAGS_FILE)).to_pylist()
    return {r.pop("sample_id"): r for r in rows}


def write_benchmark(
    name: str, out: str | Path, seed: int = EVAL_SEED, n_images: int = DEFAULT_IMAGES
) -> Path:
    """Write synth-``name`` under ``out/name`` and return that ``data_dir``."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    data_dir = Path(out) / name
    split = SPLITS[name]
    build = builders.BUILDERS[name]
    accept = builders.ACCEPT.get(name)
    rows, tags, images = build(list(scenes_for(name, seed, n_images, accept)), png_cell)
    if name == "gqa":
        image_rows = [{"id": scene_id, "image": cell} for scene_id, cell in images.items()]
        folder = data_dir / GQA_IMAGE_CONFIG / split
        _write_parquet(image_rows, hub_features("gqa_images"), folder, split)
    folder = data_dir / CONFIGS.get(name, "default") / split
    _write_parquet(rows, hub_features(name), folder, split)
    _write_tags(tags, data_dir / TAGS_FILE)
    revision = f"{SYNTH_VERSION}-seed{seed}"
    manifest = {
        "benchmark": name,
        "dataset_id": f"synthvqa/{name}",
        "revision": revision,
        "resolved_revision": revision,
        "generator": SYNTH_VERSION,
        "seed": seed,
        "n_images": n_images,
        "num_rows": len(rows),
        "config": CONFIGS.get(name),
        "split": split,
        "tags": TAGS_FILE,
    }
    (data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return data_dir


def write_all(
    out: str | Path,
    seed: int = EVAL_SEED,
    n_images: int = DEFAULT_IMAGES,
    benchmarks: tuple[str, ...] = BENCHMARKS,
) -> dict[str, Path]:
    """Write every synthetic benchmark; returns ``name -> data_dir``."""
    return {name: write_benchmark(name, out, seed, n_images) for name in benchmarks}
