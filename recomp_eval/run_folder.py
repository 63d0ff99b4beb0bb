"""The bookkeeping of one run folder: its claim (lock), identity, processes and supersession.

Files next to ``samples.jsonl`` and ``results.json``:

* ``.lock``: held (``flock``) by the one process working on the run; a second process with the
  same run exits with one line (``runner.on_busy=exit``, the default) or waits for it
  (``on_busy=wait``). The lock dies with its process, so a killed run never leaves a stale claim.
  A shard process of a multi-process run (:mod:`recomp_eval.shards`) holds ``.lock`` shared and
  ``.lock.shard-<r>-of-<W>`` exclusively: the shards of one world run side by side, a second
  process on the same shard (a resubmitted array task while the old one runs) is refused, and a
  single process waits for none of them.
* ``samples.jsonl`` (one process) or ``samples.shard-<r>-of-<W>.jsonl``: per-sample rows; the
  run's rows are the union of all of them, whatever world sizes wrote them.
* ``shard-<r>-of-<W>.json``: written when a process has finished its shard (what it skipped,
  its device, the context the record is built from); a world whose markers are all there
  completes the run, and the record is built once (under ``.record.lock``).
* ``identity.json``: the run key, the settings key (the same command on the same paths) and the
  full identity including the checkpoint and data fingerprints, written when the run starts.
* ``processes.json`` (``processes.shard-<r>-of-<W>.json`` for a shard): one entry per process
  that generated samples (pid, host, samples, peak memory), so a resumed run keeps the original
  process's figures and adds its own; one file per shard, so shards never race on it.
* ``superseded.json``: written when a later run of the same settings found different checkpoint
  or data contents; tables skip superseded runs and say so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from recomp_eval.records import write_json_atomic

IDENTITY = "identity.json"
PROCESSES = "processes.json"
SUPERSEDED = "superseded.json"
LOCK = ".lock"
RECORD_LOCK = ".record.lock"


class RunBusyError(RuntimeError):
    """Another process holds the run folder (message: one line)."""


class ContentsChangedError(RuntimeError):
    """The checkpoint or data changed since an earlier run of the same settings (one line)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunFolder:
    """One run's folder (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # --- the claim ------------------------------------------------------------------------------

    @contextmanager
    def claim(self, on_busy: str = "exit", shard: str | None = None,
              poll_s: float = 2.0) -> Iterator[None]:  # fmt: skip
        """Hold the run's lock (or, with ``shard`` = ``shard-<r>-of-<W>``, the run's lock shared
        and that shard's lock) for the duration of the block.

        ``on_busy``: ``exit`` raises :class:`RunBusyError` when another process holds it;
        ``wait`` blocks until it is free (a log line says whom it waits for).
        """
        if on_busy not in ("exit", "wait"):
            raise ValueError(f"runner.on_busy={on_busy!r}; use exit or wait")
        self.path.mkdir(parents=True, exist_ok=True)
        handles = []
        try:
            if shard is None:
                handles.append(self._lock(LOCK, fcntl.LOCK_EX, on_busy, poll_s, "the same run"))
            else:
                handles.append(self._lock(LOCK, fcntl.LOCK_SH, on_busy, poll_s, "the same run"))
                handles.append(self._lock(f"{LOCK}.{shard}", fcntl.LOCK_EX, on_busy, poll_s,
                                          f"{shard} of the same run"))  # fmt: skip
            mine = handles[-1]
            mine.seek(0)
            mine.truncate()
            mine.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "since": _now()}))  # fmt: skip
            mine.flush()
            yield
        finally:
            for handle in reversed(handles):
                handle.close()  # releases the lock

    def _lock(self, name: str, mode: int, on_busy: str, poll_s: float, what: str) -> Any:
        handle = open(self.path / name, "a+")  # noqa: SIM115 - closed by claim()
        waited = False
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                return handle
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    handle.close()
                    raise
                holder = self._holder(name)
                if on_busy == "exit":
                    handle.close()
                    raise RunBusyError(
                        f"another process ({holder}) is working on {what} in "
                        f"{self.path}; wait for it to finish (or stop it) and rerun the same "
                        f"command to resume, or pass runner.on_busy=wait to queue behind it"
                    ) from None
                if not waited:
                    import logging

                    logging.getLogger(__name__).warning(
                        "waiting for %s to finish %s in %s", holder, what, self.path
                    )
                    waited = True
                time.sleep(poll_s)

    def _holder(self, name: str = LOCK) -> str:
        """Who holds lock file ``name``; for the run's lock, shard holders count too."""
        infos = [read_json(self.path / name) or {}]
        if name == LOCK:
            infos += [read_json(p) or {} for p in sorted(self.path.glob(f"{LOCK}.shard-*"))]
        held = [i for i in infos if i]
        if not held:
            return "unknown pid"
        return ", ".join(f"pid {i.get('pid')} on {i.get('host')} since {i.get('since')}"
                         for i in held)  # fmt: skip

    def shard_holder(self, shard: str) -> str | None:
        """Who is working on ``shard`` now (its lock is held), or None."""
        path = self.path / f"{LOCK}.{shard}"
        if not path.exists():
            return None
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    return self._holder(f"{LOCK}.{shard}")
                raise
        return None

    @contextmanager
    def building(self) -> Iterator[None]:
        """Held while the run's record is built, so that two shards finishing together build
        (and log) it once."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / RECORD_LOCK, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    # --- shard markers --------------------------------------------------------------------------

    def write_marker(self, name: str, document: dict[str, Any]) -> None:
        """``<name>.json`` (``shard-<r>-of-<W>``): this shard of the run is complete."""
        write_json_atomic(self.path / f"{name}.json", {**document, "finished": _now()})

    def markers(self) -> dict[tuple[int, int], dict[str, Any]]:
        """(rank, size) -> marker document of every finished shard, at any world size."""
        out = {}
        for path in self.path.glob("shard-*-of-*.json"):
            doc = read_json(path)
            if doc is not None:
                out[(int(doc["rank"]), int(doc["size"]))] = doc
        return out

    def complete_world(self) -> list[dict[str, Any]] | None:
        """The markers of a world size all of whose shards finished (the most recently
        finished such world), rank order; None while no world is complete."""
        markers = self.markers()
        sizes = {size for _, size in markers}
        complete = [
            [markers[(r, size)] for r in range(size)]
            for size in sizes
            if all((r, size) in markers for r in range(size))
        ]
        if not complete:
            return None
        return max(complete, key=lambda docs: max(d["finished"] for d in docs))

    # --- identity -------------------------------------------------------------------------------

    def write_identity(self, document: dict[str, Any]) -> None:
        write_json_atomic(self.path / IDENTITY, document)

    def identity(self) -> dict[str, Any] | None:
        return read_json(self.path / IDENTITY)

    def siblings(self, settings_key: str) -> list[RunFolder]:
        """Other folders next to this one whose identity has the same settings key."""
        out = []
        if not self.path.parent.is_dir():
            return out
        for candidate in sorted(self.path.parent.iterdir()):
            if candidate == self.path or not candidate.is_dir():
                continue
            doc = read_json(candidate / IDENTITY)
            if doc and doc.get("settings_key") == settings_key:
                out.append(RunFolder(candidate))
        return out

    # --- supersession ---------------------------------------------------------------------------

    def mark_superseded(self, by: RunFolder, changes: list[str]) -> None:
        write_json_atomic(
            self.path / SUPERSEDED,
            {"by": by.path.name, "when": _now(), "changes": changes},
        )

    def superseded(self) -> dict[str, Any] | None:
        return read_json(self.path / SUPERSEDED)

    def clear_superseded(self) -> None:
        (self.path / SUPERSEDED).unlink(missing_ok=True)

    # --- processes ------------------------------------------------------------------------------

    def note_process(self, session: str, samples: int, peak_memory: dict[str, Any],
                     shard: str | None = None, extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Create or update this session's entry (call after each batch it generated).

        ``session``: unique per evaluation in a process (two evaluations of one process that
        work on the same run, e.g. a crash and its resume in a test, get separate entries).
        ``shard``: ``shard-<r>-of-<W>`` for a shard process (its own file); ``extra``: more
        fields of the entry (rank, world size, device).
        """
        name = PROCESSES if shard is None else f"processes.{shard}.json"
        entries = read_json(self.path / name) or []
        me = {"pid": os.getpid(), "host": socket.gethostname(), "session": session}
        for entry in entries:
            if all(entry.get(k) == v for k, v in me.items()):
                entry.update(samples=samples, peak_memory_mb=peak_memory, updated=_now())
                break
        else:
            entries.append({**me, **(extra or {}), "started": _now(), "samples": samples,
                            "peak_memory_mb": peak_memory, "updated": _now()})  # fmt: skip
        write_json_atomic(self.path / name, entries)

    def processes(self) -> list[dict[str, Any]]:
        """Every process entry of the run (all shard files), in the order they started."""
        entries = list(read_json(self.path / PROCESSES) or [])
        for path in sorted(self.path.glob("processes.shard-*.json")):
            entries += read_json(path) or []
        return sorted(entries, key=lambda e: e.get("started", ""))


def run_peak_memory(entries: list[dict[str, Any]], current: dict[str, Any]) -> dict[str, Any]:
    """The run's peak memory over the processes that generated its samples.

    ``total`` is the largest peak of those processes; ``by_process`` lists each (the first one is
    the original process, later ones resumed it). A process that only rebuilt the record (nothing
    left to generate) does not count; with no entry at all, ``current`` is used.
    """
    if not entries:
        return {**current, "by_process": []}
    peaks = [e["peak_memory_mb"] for e in entries]
    top = max(peaks, key=lambda p: p.get("total", 0.0))
    by_process = [
        {"pid": e["pid"], "host": e["host"], "samples": e["samples"], **e["peak_memory_mb"]}
        for e in entries
    ]
    return {"total": top.get("total"), "kind": top.get("kind"), "by_process": by_process}


CONTENT_NAMES = {
    "checkpoint": "the checkpoint",
    "data": "the data",
    "clip_text": "the CLIP text tower",
}


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> list[str]:
    """What differs between two runs' fingerprints (``identity.json`` ``fingerprints`` maps), e.g.
    ``the checkpoint changed (model.safetensors: modified ...)``; at most ``limit`` files each."""
    from recomp_eval.fingerprint import Fingerprint

    out = []
    for kind, name in CONTENT_NAMES.items():
        a, b = (old or {}).get(kind), (new or {}).get(kind)
        if a is None or b is None:
            if (a is None) != (b is None) and kind != "clip_text":
                out.append(f"{name} fingerprint is {'new' if a is None else 'gone'}")
            continue
        before, after = Fingerprint.from_dict(a), Fingerprint.from_dict(b)
        if before.digest == after.digest:
            continue
        if before.mode != after.mode:
            out.append(f"{name} fingerprint mode changed ({before.mode} -> {after.mode})")
            continue
        files = before.changes(after)
        more = f", and {len(files) - limit} more" if len(files) > limit else ""
        out.append(f"{name} changed ({'; '.join(files[:limit])}{more})")
    return out


def settle(folder: RunFolder, document: dict[str, Any], policy: str) -> tuple[RunFolder, list[str]]:
    """Compare with earlier runs of the same settings and apply ``runner.on_change``.

    Earlier folders with the same settings key but other contents (checkpoint, data, CLIP text
    tower) are marked superseded by ``folder`` (``new``), stop the run (``stop``), or are
    resumed instead (``resume``). Returns the folder to use and notes for the record.
    """
    import logging

    log = logging.getLogger(__name__)
    earlier = [s for s in folder.siblings(document["settings_key"]) if not s.superseded()]
    notes: list[str] = []
    for other in earlier:
        changes = describe_changes(other.identity()["fingerprints"], document["fingerprints"])
        what = "; ".join(changes) or "contents changed"
        if policy == "stop":
            raise ContentsChangedError(
                f"{what} since the earlier run in {other.path}; rerun with runner.on_change=new "
                f"to start a new run folder, or runner.on_change=resume to keep the earlier answers"
            )
        if policy == "resume":
            notes.append(f"resumed {other.path.name} across a change: {what}")
            log.warning("resuming %s although %s (runner.on_change=resume)", other.path, what)
            return other, notes
        other.mark_superseded(folder, changes)
        log.warning(
            "%s since %s: starting a new run in %s (the earlier answers stay there, marked "
            "superseded; runner.on_change=stop to stop instead)", what, other.path, folder.path
        )  # fmt: skip
    folder.clear_superseded()
    return folder, notes
