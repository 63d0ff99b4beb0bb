"""Materialise one benchmark split as local parquet for air-gapped machines.

Usage (on a machine that reaches the Hugging Face hub)::

    python scripts/prefetch.py gqa textvqa --out /data/recomp   # one folder per benchmark config
    python scripts/prefetch.py vqav2 --revision <sha> --alt   # pin a commit / use the mirror

Then on the offline machine: ``recomp-eval benchmark=gqa benchmark.data_dir=/data/recomp/gqa``.
Only the evaluated split is downloaded. The commit the revision resolved to is written to
``<out>/<benchmark>/manifest.json`` so that results computed from the parquet files record it;
pin that hash in ``configs/benchmark/<benchmark>.yaml``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_CONFIGS = REPO / "configs" / "benchmark"
SHARD_ROWS = 2000  # rows per parquet shard (keeps files well under 1 GB with images)


def read_benchmark_config(name: str) -> dict[str, Any]:
    """Plain-YAML view of ``configs/benchmark/<name>.yaml`` merged over ``_base.yaml``."""
    path = BENCHMARK_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in BENCHMARK_CONFIGS.glob("[!_]*.yaml"))
        raise SystemExit(f"unknown benchmark '{name}'; known: {', '.join(known)}")
    base = yaml.safe_load((BENCHMARK_CONFIGS / "_base.yaml").read_text()) or {}
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("defaults", None)
    return base | cfg


def resolve_revision(dataset_id: str, revision: str) -> str:
    """Commit hash that ``revision`` (branch, tag or hash) points to on the hub."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset_id, revision=revision).sha


def write_split(dataset_id: str, config: str | None, split: str, sha: str, out: Path) -> dict:
    """Download one (config, split) at commit ``sha`` and write parquet shards under ``out``."""
    import datasets

    ds = datasets.load_dataset(dataset_id, config, split=split, revision=sha)
    folder = out / (config or "default") / split
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, -(-ds.num_rows // SHARD_ROWS))
    for k in range(n_shards):
        shard = ds.shard(num_shards=n_shards, index=k, contiguous=True)
        shard.to_parquet(str(folder / f"{split}-{k:05d}-of-{n_shards:05d}.parquet"))
    return {
        "config": config,
        "split": split,
        "num_rows": ds.num_rows,
        "fingerprint": ds._fingerprint,
    }


def prefetch(name: str, root: Path, revision: str | None, use_alt: bool) -> Path:
    cfg = read_benchmark_config(name)
    dataset_id = cfg["alt_dataset_id"] if use_alt else cfg["dataset_id"]
    requested = revision or cfg.get("revision") or "main"
    sha = resolve_revision(dataset_id, requested)
    out = root / name
    parts = [write_split(dataset_id, cfg.get("config_name"), cfg["split"], sha, out)]
    if cfg.get("image_config_name"):  # GQA keeps its images in a second config
        parts.append(write_split(dataset_id, cfg["image_config_name"], cfg["split"], sha, out))
    import datasets

    manifest = {
        "benchmark": name,
        "dataset_id": dataset_id,
        "revision": requested,
        "resolved_revision": sha,
        "parts": parts,
        "datasets_version": datasets.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"{name}: {dataset_id}@{sha} -> {out} ({sum(p['num_rows'] for p in parts)} rows)")
    print(f"  pin it: revision: {sha}   # in configs/benchmark/{name}.yaml")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", help="config names under configs/benchmark/")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("DATA_ROOT", "data")))
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: config)")
    parser.add_argument("--alt", action="store_true", help="use the lmms-lab-encoder mirror id")
    args = parser.parse_args(argv)
    for name in args.benchmarks:
        prefetch(name, args.out, args.revision, args.alt)


if __name__ == "__main__":
    main()
