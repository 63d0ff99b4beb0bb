"""A small table type written as markdown, CSV and LaTeX with a caption and best-value marking.

Numbers keep full precision in CSV; markdown and LaTeX use each column's format (one decimal
for percentages). A column with ``best="max"`` (or ``"min"``) has its best value marked in bold
among the rows that compete (``compete`` marks them; the uncompressed baseline does not).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class Column:
    """One column: ``key`` into the row dicts, a header, a formatter and best-value direction."""

    key: str
    header: str
    fmt: Callable[[Any], str] | str = "{}"
    best: str | None = None  # "max" | "min" | None
    align: str = "r"

    def render(self, value: Any) -> str:
        if is_missing(value):
            return "–"
        if callable(self.fmt):
            return self.fmt(value)
        return self.fmt.format(value)


@dataclass
class Table:
    """Rows (dicts) under columns, with a caption and notes printed under the table."""

    name: str
    caption: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    compete: Callable[[dict[str, Any]], bool] = lambda row: True

    def best_rows(self) -> dict[str, set[int]]:
        """Column key -> indices of the rows holding its best value (ties all marked)."""
        out: dict[str, set[int]] = {}
        for col in self.columns:
            if col.best is None:
                continue
            values = [
                (i, row.get(col.key))
                for i, row in enumerate(self.rows)
                if self.compete(row) and not is_missing(row.get(col.key))
            ]
            if len(values) < 2:
                continue
            pick = max if col.best == "max" else min
            # compare what the reader sees: values equal after rounding tie
            shown = {i: col.render(v) for i, v in values}
            best_value = pick(v for _, v in values)
            best_text = col.render(best_value)
            out[col.key] = {i for i, _ in values if shown[i] == best_text}
        return out

    def to_markdown(self) -> str:
        best = self.best_rows()
        head = "| " + " | ".join(c.header for c in self.columns) + " |"
        rule = "|" + "|".join("---:" if c.align == "r" else "---" for c in self.columns) + "|"
        lines = [f"**{self.caption}**", "", head, rule]
        for i, row in enumerate(self.rows):
            cells = []
            for col in self.columns:
                text = col.render(row.get(col.key))
                cells.append(f"**{text}**" if i in best.get(col.key, ()) else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"{note}  " for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_latex(self) -> str:
        best = self.best_rows()
        spec = "".join(c.align for c in self.columns)
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{latex_escape(self.caption)}}}",
            rf"\label{{tab:{self.name}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(latex_escape(c.header) for c in self.columns) + r" \\",
            r"\midrule",
        ]
        for i, row in enumerate(self.rows):
            cells = []
            for col in self.columns:
                text = latex_escape(col.render(row.get(col.key)))
                cells.append(rf"\textbf{{{text}}}" if i in best.get(col.key, ()) else text)
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if self.notes:
            lines.append(r"\par\smallskip\footnotesize " + " ".join(map(latex_escape, self.notes)))
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([c.header for c in self.columns])
            for row in self.rows:
                writer.writerow(["" if is_missing(row.get(c.key)) else row.get(c.key)
                                 for c in self.columns])  # fmt: skip

    def write(self, out: Path) -> list[Path]:
        """``<out>/<name>.{md,csv,tex}``."""
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.name}.{ext}" for ext in ("md", "csv", "tex")]
        paths[0].write_text(self.to_markdown())
        self.to_csv(paths[1])
        paths[2].write_text(self.to_latex())
        return paths
