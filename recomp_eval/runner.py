"""The inference loop: stream samples, batch them, generate, append per-sample records.

Records go to an append-only JSONL file, flushed and fsynced after every batch. A killed run is
resumed by running the same command again: samples already in the file are skipped, a torn last
line (the process died mid-write) is cut off, and nothing is written twice, so the final results
equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class SampleStore:
    """Append-only per-sample JSONL records keyed by ``sample_id``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Records written so far; a torn trailing line is truncated away (``repair``) or, in a
        file another live process may still append to, just not read (``repair=False``)."""
        if not self.path.exists():
            return {}
        records: dict[str, dict[str, Any]] = {}
        good_bytes = 0
        with open(self.path, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # torn write from a killed process
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                records[row["sample_id"]] = row
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size and repair:
            log.warning("cutting a torn record at the end of %s", self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)
        return records

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        payload = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        try:
            with open(self.path, "a") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # name the file (a failed write() carries no file name)
            raise OSError(err.errno, err.strerror, str(self.path)) from None


def load_run_rows(folder: Path, own: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every per-sample row of a run folder, by sample id in sorted order: the union of its
    ``samples*.jsonl`` files (one per process that worked on it, at any world size). The order
    is canonical, so that whatever split a run (world size, resumes, batch order) its record and
    bootstrap intervals are the same. Only ``own`` (this process's file) is repaired; the others
    are read as they are (another process may be appending to them)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("samples*.jsonl")):
        for sample_id, row in SampleStore(path).load(repair=path == own).items():
            rows.setdefault(sample_id, row)
    return {sample_id: rows[sample_id] for sample_id in sorted(rows)}


@dataclass
class PendingSample:
    """What the loop needs of one sample (the image is decoded lazily by the benchmark)."""

    sample_id: str
    sample: Any
    user_text: str
    settings_key: str


def sorted_batches(
    pending: Iterable[PendingSample], batch_size: int, window: int
) -> Iterator[list[PendingSample]]:
    """Batches of equal generation settings, sorted by prompt length inside a bounded window.

    Sorting within a window of ``window`` samples keeps memory flat while padding stays small.
    """
    buffer: list[PendingSample] = []

    def flush(items: list[PendingSample]) -> Iterator[list[PendingSample]]:
        groups: dict[str, list[PendingSample]] = {}
        for item in items:
            groups.setdefault(item.settings_key, []).append(item)
        for group in groups.values():
            group.sort(key=lambda p: len(p.user_text))
            for start in range(0, len(group), batch_size):
                yield group[start : start + batch_size]

    for item in pending:
        buffer.append(item)
        if len(buffer) >= max(window, batch_size):
            yield from flush(buffer)
            buffer = []
    if buffer:
        yield from flush(buffer)


GenerateFn = Callable[[list[PendingSample]], list[dict[str, Any]]]


def run_loop(
    pending: Iterable[PendingSample],
    generate_batch: GenerateFn,
    store: SampleStore,
    batch_size: int,
    window: int,
    total: int | None = None,
    desc: str = "eval",
    stop_after: int | None = None,
    after_batch: Callable[[], None] | None = None,
    progress: bool = True,
) -> int:
    """Generate every pending sample in batches and append their records; returns the count.

    ``after_batch`` runs after each batch is stored (progress bookkeeping); ``progress=False``
    hides the bar (torchrun ranks other than 0). ``stop_after``
    (batches) exists for crash tests: the loop raises after that many batches.
    """
    done = 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, mininterval=1.0,
               disable=not progress)  # fmt: skip
    try:
        for n_batch, batch in enumerate(sorted_batches(pending, batch_size, window)):
            if stop_after is not None and n_batch >= stop_after:
                raise KeyboardInterrupt(f"stopped after {stop_after} batches (test hook)")
            rows = generate_batch(batch)
            store.append(rows)
            if after_batch is not None:
                after_batch()
            done += len(rows)
            bar.update(len(rows))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{done / max(elapsed, 1e-9):.2f} samples/s")
    finally:
        bar.close()
    return done


RUNNER_CHOICES = {
    "on_busy": ("exit", "wait"),
    "on_change": ("new", "stop", "resume"),
    "fingerprint": ("quick", "full"),
}
RUNNER_MINIMA = {  # key -> smallest allowed value (null allowed where the default is null)
    "batch_size": 1,
    "sort_window": 1,
    "warmup_batches": 0,
    "keep_maps": 0,
    "torch_threads": 1,
    "max_new_tokens": 1,
    "stop_after_batches": 0,
    "context_length": 1,
    "shard": 0,
    "num_shards": 1,
}
RUNNER_REQUIRED = ("batch_size", "sort_window", "warmup_batches", "keep_maps")


def check_runner_config(runner: Any) -> None:
    """One-line errors for impossible ``runner`` settings, before anything is loaded."""
    for key, smallest in RUNNER_MINIMA.items():
        value = runner.get(key)
        if value is None and key not in RUNNER_REQUIRED:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(
                f"runner.{key}={value}: must be an integer >= {smallest}"
                + ("" if key in RUNNER_REQUIRED else " or null")
            )
    for key, allowed in RUNNER_CHOICES.items():
        value = runner.get(key)
        if value is not None and value not in allowed:
            raise ValueError(f"runner.{key}={value}: use one of {', '.join(allowed)}")
