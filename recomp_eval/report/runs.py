"""Which runs a table is built from, and the one run behind each cell.

A table is built from one explicit set of runs: every ``results.json`` under a root, the run
folders a glob matches, optionally only those an experiment produced. Left out, and said so:
records of an older schema, and runs superseded by a later run of the same settings on changed
checkpoint or data contents. A *cell* is (model, protocol, benchmark, method label, retention);
two different runs in one cell (another n, other data, another run key) are an error, or, by
choice, separate rows; never one silently replacing the other.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from recomp_eval.records import SCHEMA_VERSION
from recomp_eval.run_folder import SUPERSEDED
from recomp_eval.runner import load_run_rows


class TableInputError(ValueError):
    """The selected runs cannot make one honest table (message: one line)."""


def retention_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "adaptive"
    return f"{float(value):g}"


@dataclass
class Run:
    """One run folder's record (``results.json``) and, on demand, its per-sample rows."""

    record: dict[str, Any]
    folder: Path

    @property
    def model(self) -> str:
        return str(self.record["model"].get("name", self.record["model"].get("id")))

    @property
    def benchmark(self) -> str:
        return str(self.record["benchmark"]["name"])

    @property
    def protocol(self) -> str:
        return str(self.record["protocol"])

    @property
    def label(self) -> str:
        method = self.record["method"]
        return str(method.get("label", method["name"]))

    @property
    def method_name(self) -> str:
        return str(self.record["method"]["name"])

    @property
    def retention(self) -> str:
        return retention_label(self.record["method"].get("retention"))

    @property
    def cell(self) -> tuple[str, str, str, str, str]:
        return (self.model, self.protocol, self.benchmark, self.label, self.retention)

    @property
    def run_key(self) -> str:
        return str(self.record["run_key"])

    @property
    def n(self) -> int:
        return int(self.record["samples"].get("evaluated", 0))

    @property
    def identity(self) -> dict[str, Any]:
        return self.record.get("identity") or {}

    @property
    def data(self) -> str | None:
        return (self.identity.get("contents") or {}).get("data")

    @property
    def checkpoint(self) -> str | None:
        return (self.identity.get("contents") or {}).get("checkpoint")

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        if not any(self.folder.glob("samples*.jsonl")):
            raise TableInputError(
                f"{self.folder} has results.json but no samples.jsonl; the per-sample answers "
                f"are needed for paired comparisons: copy the whole run folder"
            )
        return list(load_run_rows(self.folder).values())


@dataclass
class Selection:
    """The runs of a table and what was left out (reason -> folders)."""

    runs: list[Run]
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def notes(self) -> list[str]:
        return [f"left out {len(v)} run(s): {k}" for k, v in sorted(self.left_out.items())]


def _result_files(root: Path | None, pattern: str | None) -> list[Path]:
    files: set[Path] = set()
    if root is not None:
        if not Path(root).is_dir():
            raise TableInputError(f"--root {root} is not a folder; point it at a results folder")
        files |= set(Path(root).rglob("results.json"))
    if pattern is not None:
        for match in (
            Path().glob(pattern) if not Path(pattern).is_absolute() else _abs_glob(pattern)
        ):
            if match.is_dir():
                files |= set(match.rglob("results.json"))
            elif match.name == "results.json":
                files.add(match)
    return sorted(files)


def _abs_glob(pattern: str) -> list[Path]:
    parts = Path(pattern).parts
    return list(Path(parts[0]).glob(str(Path(*parts[1:]))))


def select_runs(
    root: Path | None = None,
    pattern: str | None = None,
    experiment: str | None = None,
    include_superseded: bool = False,
) -> Selection:
    """Runs under ``root`` and/or matching the glob ``pattern``, optionally of one experiment."""
    if root is None and pattern is None:
        raise TableInputError("no runs selected; pass --root FOLDER or --glob PATTERN")
    selection = Selection(runs=[])
    left = defaultdict(list)
    for path in _result_files(root, pattern):
        record = json.loads(path.read_text())
        folder = path.parent
        if record.get("schema") != SCHEMA_VERSION:
            left[f"schema {record.get('schema')} (written before run keys covered contents; "
                 f"rerun them)"].append(str(folder))  # fmt: skip
            continue
        if experiment is not None and experiment not in (record.get("experiments") or []):
            continue  # not part of the selection, not worth a note
        if (folder / SUPERSEDED).is_file() and not include_superseded:
            left["superseded by a run on changed checkpoint/data (--include-superseded to "
                 "show)"].append(str(folder))  # fmt: skip
            continue
        selection.runs.append(Run(record=record, folder=folder))
    selection.left_out = dict(left)
    if not selection.runs:
        where = " and ".join(x for x in (str(root) if root else "", pattern or "") if x)
        extra = f" of experiment '{experiment}'" if experiment else ""
        raise TableInputError(f"no runs{extra} found in {where}; run an evaluation first")
    return selection


def _differences(a: Run, b: Run) -> str:
    diffs = []
    if a.n != b.n:
        diffs.append(f"n {a.n} vs {b.n}")
    if a.data != b.data:
        diffs.append("data contents")
    if a.checkpoint != b.checkpoint:
        diffs.append("checkpoint contents")
    la, lb = a.identity.get("limit"), b.identity.get("limit")
    if la != lb:
        diffs.append(f"limit {la} vs {lb}")
    return ", ".join(diffs) or f"run key {a.run_key} vs {b.run_key}"


def resolve_cells(selection: Selection, on_conflict: str = "error") -> list[Run]:
    """One run per cell; a copy of the same run (equal run key) counts once.

    ``on_conflict``: ``error`` raises :class:`TableInputError` naming the cell, how its runs
    differ and the two ways out; ``rows`` keeps every run as its own row.
    """
    if on_conflict not in ("error", "rows"):
        raise TableInputError(f"--on-conflict {on_conflict}: use error or rows")
    by_cell: dict[tuple, dict[str, Run]] = defaultdict(dict)
    for run in selection.runs:
        by_cell[run.cell].setdefault(run.run_key, run)  # copies of one run count once
    out = []
    for cell, runs in by_cell.items():
        distinct = list(runs.values())
        if len(distinct) > 1 and on_conflict == "error":
            a, b = distinct[0], distinct[1]
            model, protocol, bench, label, ret = cell
            raise TableInputError(
                f"{len(distinct)} different runs for {label} at retention {ret} on {bench} "
                f"({model}, {protocol}) differ in {_differences(a, b)}: {a.folder} and "
                f"{b.folder}; build the table from one set of runs (--root, --glob, "
                f"--experiment) or pass --on-conflict rows to show each run as its own row"
            )
        out.extend(distinct)
    return sorted(out, key=lambda r: (r.model, r.protocol, r.benchmark, r.label, r.retention))
