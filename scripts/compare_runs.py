"""Compare two results roots run by run: the same run keys, answers, kept tokens and keep maps.

    python scripts/compare_runs.py results/demo/raw /tmp/other/raw

A regression check for refactors that must not change behaviour: every run (its folder path
under the root without the run key: benchmark/model/protocol/label-retention) must exist in both
roots with identical per-sample ``prediction``, ``kept_tokens`` and ``keep_map``; with
``--same-keys`` the run keys must be equal too (true when both roots use the same data folder:
the keys cover the data's contents, and in quick mode the mtimes of its large files). Exits 1
and lists the differences otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recomp_eval.runner import load_run_rows

FIELDS = ("prediction", "kept_tokens", "keep_map", "new_tokens", "text_tokens")


def runs(root: Path, with_keys: bool = False) -> dict[str, Path]:
    """Run folder path (relative, the trailing ``-<run key>`` dropped unless ``with_keys``) ->
    the folder (its rows: every ``samples*.jsonl``, whatever world size wrote them)."""
    out = {}
    for folder in sorted({p.parent for p in root.rglob("samples*.jsonl")}):
        rel = str(folder.relative_to(root))
        out[rel if with_keys else rel.rsplit("-", 1)[0]] = folder
    return out


def compare(before: Path, after: Path, same_keys: bool = False) -> list[str]:
    """Differences between the runs of two roots (empty when equal)."""
    a, b = runs(before, same_keys), runs(after, same_keys)
    problems = [f"only in {before}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in {after}: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        rows_a, rows_b = load_run_rows(a[key]), load_run_rows(b[key])
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
    parser.add_argument("--same-keys", action="store_true", help="run keys must match too")
    args = parser.parse_args(argv)
    problems = compare(args.before, args.after, args.same_keys)
    for line in problems[:50]:
        print(line)
    n = len(runs(args.before))
    print(f"{n} runs compared: {'identical' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
