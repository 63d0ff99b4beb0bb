"""Records from shards: ``finish_run`` (called by every process that finishes a shard) and the
``recomp-eval-merge`` command (after a SLURM array; ``make tables`` runs it first).

A run folder is complete when every shard of one world size has its marker
(``shard-<r>-of-<W>.json``, :mod:`recomp_eval.run_folder`). Its record is built from the folder
alone: the union of the per-sample files, the markers (what each process skipped, its device and
the record context) and the process entries; no model is loaded. Building takes the folder's
record lock and is skipped when ``results.json`` was already built from the same markers, so a
record (and its dashboard entry) is made once however many processes finish together.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from recomp_eval.records import RunRecord, write_json_atomic
from recomp_eval.run_folder import IDENTITY, RunFolder, read_json
from recomp_eval.runner import load_run_rows

log = logging.getLogger(__name__)


def shard_stamps(shards: list[dict[str, Any]]) -> list[list[Any]]:
    """What identifies one finished set of shards (each marker's rank, size and session)."""
    return [[m["rank"], m["size"], m["session"]] for m in shards]


def finish_run(folder: RunFolder) -> RunRecord | None:
    """Build and write the run's ``results.json`` if its shards are complete and the record is
    not already built from them; returns the record built here, else None."""
    from recomp_eval.metrics.submission import write_configured_submission
    from recomp_eval.summary import build_record

    with folder.building():
        shards = folder.complete_world()
        if shards is None:
            return None
        earlier = read_json(folder.path / "results.json") or {}
        stamps = shard_stamps(shards)
        if (earlier.get("world") or {}).get("stamps") == stamps:
            return None  # another process of the same world built it
        rows = list(load_run_rows(folder.path).values())
        ref_dir = shards[0]["context"]["reference_dir"]
        reference = list(load_run_rows(Path(ref_dir)).values()) if ref_dir else []
        record = build_record(shards, folder.identity(), rows, folder.processes(), reference,
                              folder.path)  # fmt: skip
        record.world["stamps"] = stamps
        record.experiments = sorted(set(record.experiments) | set(earlier.get("experiments") or []))
        write_json_atomic(folder.path / "results.json", record.to_dict())
        bench_cfg = shards[0]["context"]["bench_cfg"]
        if (sub := write_configured_submission(bench_cfg, rows, folder.path)) is not None:
            log.info("wrote the EvalAI submission %s", sub)
        log.info("%s %s", "rewrote" if earlier else "wrote", folder.path / "results.json")
        return record


def incomplete(folder: RunFolder) -> str | None:
    """One line on what an unfinished run folder lacks and the command that finishes it."""
    markers = folder.markers()
    if folder.complete_world() is not None:
        return None
    if not markers and (folder.path / "results.json").is_file():
        return None  # finished before runs had shard markers
    if not markers:
        started = (folder.processes() or [{}])[0]
        done = len(load_run_rows(folder.path))
        return (f"{folder.path}: no shard finished ({done} samples answered so far, started "
                f"{started.get('started', '?')}); {finish_command(folder)}")  # fmt: skip
    size = max(s for _, s in markers)
    missing = [r for r in range(size) if (r, size) not in markers]
    context = next(iter(markers.values()))["context"]
    done = len(load_run_rows(folder.path))
    running = {r: h for r in missing if (h := folder.shard_holder(f"shard-{r}-of-{size}"))}
    state = "; ".join(f"shard {r} is running ({h})" for r, h in running.items())
    return (
        f"{folder.path}: shard{'s' if len(missing) > 1 else ''} "
        f"{', '.join(map(str, missing))} of {size} not finished ({done} of "
        f"{next(iter(markers.values()))['n_total']} samples answered"
        f"{'; ' + state if state else ''}); {finish_command(folder, context, missing, size)}"
    )


def finish_command(folder: RunFolder, context: dict[str, Any] | None = None,
                   missing: list[int] | None = None, size: int | None = None) -> str:  # fmt: skip
    """How to finish a run: the command that started it (it resumes at any world size)."""
    if context is None:
        docs = folder.processes()
        command = next((d.get("command") for d in docs if d.get("command")), None)
    else:
        command = context.get("command")
    shards = ""
    if missing and size:
        shards = (f"; or only the missing shards: add runner.num_shards={size} "
                  f"runner.shard={','.join(map(str, missing))} (with -m)")  # fmt: skip
    if not command:
        return f"rerun the command that started it (any world size resumes it){shards}"
    return f"finish it with `{command}` (any world size resumes it){shards}"


def run_folders(root: Path) -> list[RunFolder]:
    """Every run folder under ``root`` (those with an ``identity.json``)."""
    return [RunFolder(p.parent) for p in sorted(Path(root).rglob(IDENTITY))]


def merge(root: Path) -> tuple[list[RunRecord], list[str]]:
    """Build every complete record under ``root`` not yet built from its shards; returns the
    records built and one line per incomplete run."""
    built, waiting = [], []
    for folder in run_folders(root):
        if folder.superseded():
            continue
        if (line := incomplete(folder)) is not None:
            waiting.append(line)
            continue
        if (record := finish_run(folder)) is not None:
            built.append(record)
    return built, waiting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recomp-eval-merge",
        description="Build the record of every run whose shards are all finished (after a "
        "SLURM array or an interrupted multi-process run) and list the unfinished ones.",
    )
    parser.add_argument("--root", type=Path, default=Path("results/raw"),
                        help="results folder to scan (default: results/raw)")  # fmt: skip
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a run is unfinished")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"recomp-eval-merge: error: no results folder {args.root}; pass --root "
              f"<paths.root>/raw", file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        built, waiting = merge(args.root)
    except ValueError as err:
        print(f"recomp-eval-merge: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for record in built:
        print(f"merged {record.run_dir} ({record.samples['evaluated']} samples from "
              f"{record.world['size']} shard{'s' if record.world['size'] > 1 else ''})")  # fmt: skip
    for line in waiting:
        print(f"unfinished: {line}")
    print(f"{len(built)} record{'s' if len(built) != 1 else ''} built, "
          f"{len(waiting)} run{'s' if len(waiting) != 1 else ''} unfinished under {args.root}")  # fmt: skip
    return 1 if waiting and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
