"""Write the five SynthVQA benchmarks (synth-GQA, -VQAv2, -TextVQA, -POPE, -MME) as local parquet.

Usage::

    python scripts/make_synth.py --out data/synth               # seed 1_000_003, 100 images each
    recomp-eval benchmark=gqa benchmark.data_dir=data/synth/gqa  # the real loader, unchanged

Each ``<out>/<benchmark>/`` holds ``manifest.json`` (dataset id ``synthvqa/<benchmark>``, revision
``<generator version>-seed<seed>``), the parquet files in the hub layout and ``tags.parquet``
(question family, object size, near-large flag per sample id). The same arguments give
byte-identical files. The evaluation seed is distinct from the training seed (0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recomp_eval.synth.schemas import BENCHMARKS
from recomp_eval.synth.writers import (
    DEFAULT_IMAGES,
    EVAL_SEED,
    SYNTH_VERSION,
    read_tags,
    write_benchmark,
)

STAMP = ".synth_args.json"  # what the folder was written with (for --skip-existing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="*", help=f"subset of {', '.join(BENCHMARKS)} (all)")
    parser.add_argument(
        "--out", type=Path, required=True, help="root folder, one dir per benchmark"
    )
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="scene stream (train uses 0)")
    parser.add_argument("--n-images", type=int, default=DEFAULT_IMAGES, help="images per benchmark")
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="keep a benchmark folder already written with the same seed, size and version",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    stamp_payload = {"seed": args.seed, "n_images": args.n_images, "version": SYNTH_VERSION}
    for name in args.benchmarks or BENCHMARKS:
        stamp = args.out / name / STAMP
        if args.skip_existing and stamp.exists() and json.loads(stamp.read_text()) == stamp_payload:
            print(f"{name}: up to date in {stamp.parent}")
            continue
        data_dir = write_benchmark(name, args.out, args.seed, args.n_images)
        stamp.write_text(json.dumps(stamp_payload))
        print(f"{name}: {len(read_tags(data_dir))} questions -> {data_dir}")


if __name__ == "__main__":
    main()
