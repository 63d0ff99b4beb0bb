"""The headline figure of each GPU part next to the same figure measured on this CPU.

``make bench-gpu`` measures four parts on a GPU; the CPU scripts measure the same figures at
CPU shapes (``bench_compression.py``, ``bench_vision_path.py``, ``bench_prefill.py``,
``bench_peer.py``). :func:`side_by_side` reads both sets of JSON records and writes one table:
figure, target, the CPU value with its file and commit, and the GPU value of every
``bench_gpu`` record (or "not run"). Nothing in it is typed by hand: a missing file or row
shows as "not measured".

Each headline names how to find its value in each record; a value is looked up, never
recomputed from other tables, except the vision ratio against ``none`` on CPU (the CPU script
records the two medians, the GPU script their ratio).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from recomp_eval.efficiency.benchmark import markdown_table

Record = dict[str, Any]


def _rows(record: Record | None, part: str | None = None) -> list[dict[str, Any]]:
    if record is None:
        return []
    if part is not None:
        return (record.get("parts", {}).get(part) or {}).get("rows") or []
    return record.get("rows") or record.get("results") or []


def _find(rows: Sequence[dict[str, Any]], key: str, **match: Any) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and row.get(key) is not None:
            return float(row[key])
    return None


def _cpu_vision_x_none(record: Record | None, batch: int) -> float | None:
    rows = _rows(record)
    rc = _find(rows, "ms", batch=batch, case="rc_paper")
    none = _find(rows, "ms", batch=batch, case="none")
    return rc / none if rc is not None and none else None


class Headline(NamedTuple):
    """One figure: its label, its target, the CPU record it comes from and how to read its
    value from that record and from a ``bench_gpu`` record (a ratio, or None when absent)."""

    figure: str
    target: str
    cpu_file: str
    cpu: Callable[[Record | None], float | None]
    gpu: Callable[[Record], float | None]


RC_TORCH = "recomp[official,lof=torch]"
OURS = "recomp_llava (ours)"
HEADLINES = [
    Headline(
        "RC `official` (torch LOF) vs the release loop, B = 8",
        ">= 20x on GPU",
        "compression.json",
        lambda r: _find(_rows(r), "x_faster_than_oracle", method=RC_TORCH, batch=8),
        lambda g: _find(_rows(g, "compression"), "x_vs_release_device", method=RC_TORCH, batch=8),
    ),
    Headline(
        "vision path, RC `paper` / our `none`, B = 1",
        "<= 1.05x",
        "vision_path.json",
        lambda r: _cpu_vision_x_none(r, 1),
        lambda g: _find(_rows(g, "vision"), "x_none", case="rc_paper", batch=1),
    ),
    Headline(
        "vision path, RC `paper` speed-up vs the release's profile, B = 1",
        "reported",
        "vision_path.json",
        lambda r: _find(_rows(r), "speedup_vs_release", case="rc_paper", batch=1),
        lambda g: _find(_rows(g, "vision"), "speedup_vs_release", case="rc_paper", batch=1),
    ),
    *[
        Headline(
            f"prefill, 58 vs 576 visual tokens, measured / analytic, B = {b}",
            ">= 0.9 on GPU" if b == 32 else "reported",
            "prefill_cpu.json",
            lambda r, b=b: _find(_rows(r), "efficiency", retention=0.1, batch=b),
            lambda g, b=b: _find(_rows(g, "prefill"), "efficiency", case="K=58", batch=b),
        )
        for b in (1, 8, 32)
    ],
    *[
        Headline(
            f"end to end, ours `none` at batch {b} vs `llava_hf` at batch 1",
            ">= 4x on GPU" if b == 16 else "reported",
            "peer/peer.json",
            lambda r, b=b: _find(_rows(r), "speedup", harness=OURS, batch=b),
            lambda g, b=b: _find(
                _rows(g, "e2e"), "speedup_vs_llava_hf", harness=OURS, method="none", batch=b
            ),
        )
        for b in (16, 32)
    ],
]


def load_cpu(root: Path, name: str) -> Record | None:
    try:
        record = json.loads((Path(root) / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def cpu_commit(record: Record | None) -> str:
    """The commit a CPU record was measured at (the scripts keep it in different places)."""
    if record is None:
        return ""
    for holder in (record.get("machine"), record.get("meta"), (record.get("meta") or {})
                   .get("machine"), (record.get("env") or {}).get("machine")):  # fmt: skip
        if isinstance(holder, dict) and holder.get("commit"):
            return str(holder["commit"])[:7]
    return ""


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def side_by_side(cpu_root: Path, gpu_records: Sequence[tuple[str, Record]]) -> list[str]:
    """Markdown lines: one row per headline, the CPU value and one column per GPU record."""
    gpu = [(name, rec) for name, rec in gpu_records if not rec.get("smoke")]
    header = ["figure", "target", "CPU (this 2-core machine)", "CPU source",
              *([f"GPU `{n}`" for n, _ in gpu] or ["GPU"])]  # fmt: skip
    rows = []
    for h in HEADLINES:
        record = load_cpu(cpu_root, h.cpu_file)
        commit = cpu_commit(record)
        source = f"`results/bench/{h.cpu_file}`" + (f" @ {commit}" if commit else "")
        gpus = [_fmt(h.gpu(rec)) for _, rec in gpu] or ["not run"]
        rows.append([h.figure, h.target, _fmt(h.cpu(record)), source, *gpus])
    return markdown_table(header, rows).splitlines()
