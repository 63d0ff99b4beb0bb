"""Compare two results roots run by run: the same run keys, answers, kept tokens and keep maps.

    python scripts/compare_runs.py results/demo/raw /tmp/other/raw

A regression check for refactors that must not change behaviour: every run folder (by its path
under the root, which ends in the run key) must exist in both roots with identical per-sample
``prediction``, ``kept_tokens`` and ``keep_map``. Exits 1 and lists the differences otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recomp_eval.runner import SampleStore

FIELDS = ("prediction", "kept_tokens", "keep_map", "new_tokens", "text_tokens")


def runs(root: Path) -> dict[str, Path]:
    return {str(p.parent.relative_to(root)): p for p in sorted(root.rglob("samples.jsonl"))}


def compare(before: Path, after: Path) -> list[str]:
    """Differences between the runs of two roots (empty when equal)."""
    a, b = runs(before), runs(after)
    problems = [f"only in {before}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in {after}: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        rows_a, rows_b = SampleStore(a[key]).load(), SampleStore(b[key]).load()
        if rows_a.keys() != rows_b.keys():
            problems.append(f"{key}: different samples ({len(rows_a)} vs {len(rows_b)})")
            continue
        for sid, row in rows_a.items():
            diff = [f for f in FIELDS if row.get(f) != rows_b[sid].get(f)]
            if diff:
                problems.append(f"{key} {sid}: {', '.join(diff)} differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    problems = compare(args.before, args.after)
    for line in problems[:50]:
        print(line)
    n = len(runs(args.before))
    print(f"{n} runs compared: {'identical' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
