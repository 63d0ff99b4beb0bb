"""The README and docs/: links resolve, the README stays short, the code's citations of
docs/method.md exist, and the demo markers that ``scripts/update_demo_docs.py`` fills are there."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import scripts_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHOD_MD = ROOT / "docs" / "method.md"
README_MAX_CHARS = 12_000
# where the code cites docs/method.md (this file excluded: its docstrings hold examples)
CITING_GLOBS = ("recomp_eval/**/*.py", "configs/**/*.yaml", "scripts/**/*.py", "tests/**/*.py")

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# "method.md section 4", "method.md sections 3-6", "(section 6)" in a file that cites method.md;
# a section of another document ("protocol.md section 6") is not a method.md reference
SECTION_REF = re.compile(r"(?:([\w.-]+\.md)\s+)?(?:\bsections?\s+|§\s*)(\d+)(?:\s*[-–]\s*(\d+))?")
# quirk ids (the IQR quartiles Q1/Q3 of outliers.py match too; both ids exist, so they pass)
QUIRK_REF = re.compile(r"\bQ(\d{1,2})\b")
SECTION_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
QUIRK_ROW = re.compile(r"^\| Q(\d+) \|", re.MULTILINE)


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without code blocks and inline code (links there are examples, not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.relative_to(ROOT)}: {target} (no heading #{anchor})")
    return problems


def test_relative_links_resolve() -> None:
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    size = len(README.read_text())
    assert size < README_MAX_CHARS, (
        f"README.md has {size:,} characters (limit {README_MAX_CHARS:,}); move detail into docs/"
    )


def method_md_citations() -> tuple[dict[int, set[str]], dict[int, set[str]]]:
    """Sections and quirk ids cited by files that mention method.md -> the citing files."""
    sections: dict[int, set[str]] = {}
    quirks: dict[int, set[str]] = {}
    this = Path(__file__).resolve()
    for pattern in CITING_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            if path.resolve() == this or ".venv" in path.parts:
                continue
            text = path.read_text(errors="replace")
            if "method.md" not in text:
                continue
            name = str(path.relative_to(ROOT))
            for doc, first, last in SECTION_REF.findall(text):
                if doc and not doc.endswith("method.md"):
                    continue
                for number in range(int(first), int(last or first) + 1):
                    sections.setdefault(number, set()).add(name)
            for number in QUIRK_REF.findall(text):
                quirks.setdefault(int(number), set()).add(name)
    return sections, quirks


def test_method_md_has_every_cited_section_and_quirk() -> None:
    sections, quirks = method_md_citations()
    assert sections and quirks, "found no citation of docs/method.md in the code (scanner broken?)"
    text = METHOD_MD.read_text()
    have_sections = {int(n) for n in SECTION_HEADING.findall(text)}
    have_quirks = {int(n) for n in QUIRK_ROW.findall(text)}
    missing = [
        f"section {n} (cited in {', '.join(sorted(files))})"
        for n, files in sorted(sections.items())
        if n not in have_sections
    ] + [
        f"Q{n} (cited in {', '.join(sorted(files))})"
        for n, files in sorted(quirks.items())
        if n not in have_quirks
    ]
    assert not missing, "docs/method.md lacks what the code cites:\n" + "\n".join(missing)


def test_readme_has_demo_markers() -> None:
    demo = scripts_module("update_demo_docs")
    readme = README.read_text()
    missing = [name for name in demo.SECTIONS if not demo.section_pattern(name).search(readme)]
    assert not missing, (
        "README.md lacks the demo sections "
        + ", ".join(f"<!-- demo:{n} --> ... <!-- /demo:{n} -->" for n in missing)
        + " that `make demo-docs` fills"
    )
