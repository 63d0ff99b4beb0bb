"""The measurement method every ``scripts/bench_*.py`` shares.

- **Interleaved cases**: every round times each case once, in a freshly shuffled order, so that
  drift (thermal, other processes, allocator state) hits every case alike. Each case has
  ``warmup`` untimed rounds first, and every case gets the same inputs: the scripts build them
  once and the cases close over them.
- **Timers**:
  - on CPU, ``perf_counter`` around a call, with torch's intra-op threads pinned
    (:func:`pin_threads`) and this process's CPU time recorded next to it. :func:`quiet_reps`
    keeps the reps in which the process had its cores to itself;
  - on CUDA, a pair of CUDA events around the call, read after a device synchronisation.
- **Statistics**: min, median, p90 and mean per case (:func:`summarize`). Ratios quote medians
  measured in the same run.
- **Sanity**: two cases that compute the same thing (the vanilla tower and our ``none`` path;
  FastV prune and mask; one case timed twice) must agree within a stated tolerance
  (:func:`agreement`). Otherwise the script records and prints that the measurement is not valid.
- **Record**: machine, library versions, threads, load and commit (:func:`machine_info`),
  written with the raw timings as JSON next to a markdown table (:func:`write_results`).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """min / median / p90 / mean of a timing series (ms); p90 by linear interpolation."""
    if not ms:
        raise ValueError("summarize: empty timing series")
    ms = list(ms)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return {"min": min(ms), "median": statistics.median(ms), "p90": p90,
            "mean": statistics.fmean(ms), "n": len(ms)}  # fmt: skip


def agreement(
    a_ms: Sequence[float], b_ms: Sequence[float], tolerance: float = 0.10
) -> dict[str, Any]:
    """Sanity check of a measurement: two timing series of the same computation (``a``, ``b``)
    must have medians within ``tolerance`` (relative to ``b``), else the run is not valid.

    Returns ``valid`` (bool), ``verdict`` (``valid`` / ``not valid``), ``ratio`` (median a /
    median b), both medians, ``tolerance`` and a one-line ``message``.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}; expected >= 0")
    med_a, med_b = statistics.median(a_ms), statistics.median(b_ms)
    ratio = med_a / med_b
    valid = abs(ratio - 1.0) <= tolerance + 1e-12  # the edge counts as inside
    verdict = "valid" if valid else "not valid"
    message = (f"medians {med_a:.2f} vs {med_b:.2f} ms (ratio {ratio:.3f}, tolerance "
               f"{tolerance:.0%}): measurement {verdict}")  # fmt: skip
    return {"valid": valid, "verdict": verdict, "ratio": ratio, "median_a_ms": med_a,
            "median_b_ms": med_b, "tolerance": tolerance, "message": message}  # fmt: skip


def sanity_line(sanity: dict[str, Any], what: str) -> str:
    """One line for a report on an :func:`agreement` verdict over whole runs timed in ms,
    with the medians in seconds (``what``: what was timed, e.g. "evaluation")."""
    return (f"medians {sanity['median_a_ms'] / 1e3:.1f} vs {sanity['median_b_ms'] / 1e3:.1f} s "
            f"of {what} (ratio {sanity['ratio']:.3f}, tolerance {sanity['tolerance']:.0%}): "
            f"measurement {sanity['verdict']}")  # fmt: skip


def _timed_call(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(wall ms, CPU ms, result) of one call; CUDA events on a GPU."""
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        cpu = time.process_time()
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), (time.process_time() - cpu) * 1e3, result
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3, result


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    warmup: int,
    reps: int,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time every case in a freshly shuffled order each round, ``warmup`` untimed rounds first.

    ``cases``: label -> callable; whatever it returns (e.g. per-stage ms) is kept per timed rep.
    Returns ``ms`` (label -> timed ms list), ``warmup_ms``, ``cpu_ms`` (this process's CPU time
    per timed call, all threads: about ``threads x ms`` on an idle machine, less when other
    processes share the cores), ``extra`` (label -> returned values), ``orders`` and ``loadavg``
    (1-minute, per round).
    """
    rng = random.Random(seed)
    order = list(cases)
    out: dict[str, Any] = {"ms": {k: [] for k in cases}, "warmup_ms": {k: [] for k in cases},
                           "cpu_ms": {k: [] for k in cases}, "extra": {k: [] for k in cases},
                           "orders": [], "loadavg": []}  # fmt: skip
    for r in range(warmup + reps):
        rng.shuffle(order)
        out["orders"].append(list(order))
        for label in order:
            ms, cpu_ms, extra = _timed_call(cases[label], device)
            if r < warmup:
                out["warmup_ms"][label].append(ms)
            else:
                out["ms"][label].append(ms)
                out["cpu_ms"][label].append(cpu_ms)
                out["extra"][label].append(extra)
        out["loadavg"].append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return out


def quiet_reps(timed: dict[str, Any], threads: int, frac: float = 0.9) -> dict[str, list[float]]:
    """Per case the timed ms of the reps in which this process had its cores to itself: CPU
    time over wall time at least ``frac x threads`` (CPU only; other processes on the cores
    lower it). A secondary, contention-free estimate next to the all-reps statistics."""
    return {label: [w for w, c in zip(ms, timed["cpu_ms"][label]) if c >= frac * threads * w]
            for label, ms in timed["ms"].items()}  # fmt: skip


def pin_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (default: every CPU core) and return the count."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info(device: str, scripts: Sequence[str] = ()) -> dict[str, Any]:
    """Machine, library versions, threads, load and commit, for the record."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                 .splitlines() if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": _git("rev-parse", "HEAD"),
    }  # fmt: skip
    if scripts:  # uncommitted changes to the benchmark scripts themselves
        info["scripts_modified"] = bool(_git("status", "--porcelain", "--", *scripts))
    return info


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 2 decimals (3 below 1)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(stem: str | Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the payload, raw timings included) and ``<stem>.md``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
