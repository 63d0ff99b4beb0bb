"""lmms-eval task folders (``--include_path``) that run lmms-eval's own task YAMLs on local data.

Each task ``local_<benchmark>`` ``include:``s the built-in task (its prompts, generation kwargs,
``process_results`` and aggregation) and overrides only the dataset: ``dataset_path: parquet``
with the local files in the hub schema (SynthVQA, or a prefetched split). GQA's built-in
``process_docs`` fetches its image config from the hub; here it joins the local image config by
``imageId`` instead (the same join).

    python -m recomp_eval.lmms_plugin.tasks --data results/demo/synth --out results/lmms_tasks
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

# benchmark -> (lmms-eval task YAML, split, parquet glob under the data folder)
TASKS = {
    "pope": ("pope/pope.yaml", "test", "default/test/*.parquet"),
    "mme": ("mme/mme.yaml", "test", "default/test/*.parquet"),
    "gqa": ("gqa/gqa.yaml", "testdev", "testdev_balanced_instructions/testdev/*.parquet"),
}
GQA_IMAGES = "testdev_balanced_images/testdev/*.parquet"
GQA_UTILS = '''"""process_docs for local_gqa: GQA's image join (doc imageId -> image row id) from local files."""

import datasets

IMAGES = {images!r}


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    images = datasets.load_dataset("parquet", data_files={{"testdev": IMAGES}}, split="testdev")
    by_id = {{row["id"]: row["image"].convert("RGB") for row in images}}
    return dataset.map(lambda doc: {{"image": by_id[doc["imageId"]]}})
'''


def lmms_tasks_dir() -> Path:
    """lmms-eval's ``tasks/`` folder, found without importing lmms-eval."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "lmms-eval is not installed; `make install` (or pip install '.[lmms]') installs it"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _one(data: Path, pattern: str) -> Path:
    found = sorted(data.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} under {data}; write it with scripts/make_synth.py")
    return found[0].resolve()


def write_tasks(
    data_root: Path, out: Path, benchmarks: tuple[str, ...] = tuple(TASKS)
) -> list[str]:
    """Write ``local_<benchmark>.yaml`` for each benchmark into ``out``; returns the task names.

    ``data_root``: a folder with one sub-folder per benchmark in the hub layout (SynthVQA's)."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for bench in benchmarks:
        yaml_path, split, pattern = TASKS[bench]
        data = Path(data_root) / bench
        lines = [
            f"include: {lmms_tasks_dir() / yaml_path}",
            f"task: local_{bench}",
            "dataset_path: parquet",
            "dataset_kwargs:",
            "  data_files:",
            f"    {split}: {_one(data, pattern)}",
        ]
        if bench == "gqa":
            (out / "local_gqa_utils.py").write_text(
                GQA_UTILS.format(images=str(_one(data, GQA_IMAGES)))
            )
            lines.append("process_docs: !function local_gqa_utils.process_docs")
        (out / f"local_{bench}.yaml").write_text("\n".join(lines) + "\n")
        names.append(f"local_{bench}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of benchmark folders")
    parser.add_argument("--out", type=Path, required=True, help="the --include_path folder")
    parser.add_argument("--benchmarks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    names = write_tasks(args.data, args.out, tuple(args.benchmarks))
    print(f"wrote {', '.join(names)} to {args.out} (--include_path {args.out})")


if __name__ == "__main__":
    main()
