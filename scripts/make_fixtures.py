"""Write tiny local copies of the five benchmarks in the hub schema (for offline smoke runs).

python scripts/make_fixtures.py --out results/fixtures
make eval-gqa ARGS="model=tiny benchmark.data_dir=results/fixtures/gqa"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recomp_eval.benchmarks.fixtures import write_fixture

BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/fixtures"))
    parser.add_argument("--bad", action="store_true", help="add one bad record of each kind")
    args = parser.parse_args()
    for name in BENCHMARKS:
        path = write_fixture(name, args.out, bad=args.bad)
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
