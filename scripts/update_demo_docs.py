"""Copy the tables of a finished ``make eval`` into ``docs/demo/`` and the README (``make demo-docs``).

The README shows the demo's tables between markers, e.g.::

    <!-- demo:accuracy -->
    ...the content of accuracy.md...
    <!-- /demo:accuracy -->

``--check`` compares instead of writing and exits 1 when the README or the accuracy and slice
tables of ``docs/demo/`` differ from the tables (the slow test ``test_readme_demo_matches_a_fresh_make_eval`` runs it after a
fresh ``make eval``).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
from pathlib import Path

SECTIONS = {  # README marker -> table file of the demo (the slice tables live in docs/demo/)
    "accuracy": "accuracy.md",
}
COPIED = ("*.md", "*.csv", "*.tex", "plots/*.png")
CHECKED = ("accuracy.", "slices")  # the files --check compares (see below)


def section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- demo:{name} -->\n)(.*?)(<!-- /demo:{name} -->)", re.DOTALL)


def render_readme(readme: str, tables: Path) -> str:
    """The README with every demo section replaced by the table file's content."""
    for name, filename in SECTIONS.items():
        pattern = section_pattern(name)
        if not pattern.search(readme):
            raise SystemExit(f"README has no <!-- demo:{name} --> section; add the markers")
        body = (tables / filename).read_text()
        readme = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(3), readme)
    return readme


def demo_files(tables: Path) -> list[Path]:
    return sorted(p.relative_to(tables) for pat in COPIED for p in tables.glob(pat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=Path, default=Path("results/demo/tables"))
    parser.add_argument("--docs", type=Path, default=Path("docs/demo"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a mismatch")
    args = parser.parse_args(argv)
    if not (args.tables / "accuracy.md").is_file():
        raise SystemExit(f"no demo tables in {args.tables}; run `make eval` first")
    readme = args.readme.read_text()
    updated = render_readme(readme, args.tables)
    files = demo_files(args.tables)
    if args.check:
        problems = []
        if updated != readme:
            problems.append(f"{args.readme} demo sections differ from {args.tables}")
        # accuracy and slice tables are a function of the code, model and data; efficiency
        # (timings, memory) and accuracy_long (run keys include file mtimes) vary per machine
        text = [f for f in files if f.name.startswith(CHECKED) and f.parent == Path(".")]
        for rel in text:
            if not (args.docs / rel).is_file() or not filecmp.cmp(
                args.tables / rel, args.docs / rel, shallow=False
            ):
                problems.append(f"{args.docs / rel} differs from {args.tables / rel}")
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    if args.docs.exists():
        shutil.rmtree(args.docs)
    for rel in files:
        (args.docs / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.tables / rel, args.docs / rel)
    args.readme.write_text(updated)
    print(f"copied {len(files)} files to {args.docs} and updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
