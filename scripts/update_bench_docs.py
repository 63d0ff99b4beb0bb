"""Fill the GPU-figures block of ``docs/performance.md`` from ``results/bench/gpu/*.json``.

The block sits between ``<!-- bench-gpu -->`` and ``<!-- /bench-gpu -->``; everything between
the markers is rewritten from the records that ``scripts/bench_gpu.py`` writes (one section per
JSON file, in name order; a file that is not such a record is ignored). With no record the block
says that no GPU run is recorded yet. Nothing in the block is written by hand.

    python scripts/update_bench_docs.py                 # rewrite the block
    python scripts/update_bench_docs.py --check         # exit 1 when the block is stale

``scripts/bench_gpu.py`` writes its markdown with :func:`render_record` too, so the docs block
and ``results/bench/gpu/bench_gpu.md`` show the same tables. The block opens with the headline
figure of each part measured on this CPU beside the same figure of every GPU record
(``scripts/bench_headlines.py``, from ``results/bench/*.json``), so a new CPU run makes the
block stale too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_headlines import side_by_side

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "bench_gpu/1"
BEGIN, END = "<!-- bench-gpu -->", "<!-- /bench-gpu -->"
BLOCK = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.DOTALL)
GENERATED = ("<!-- written by `python scripts/update_bench_docs.py` from "
             "results/bench/gpu/*.json and results/bench/*.json: do not edit by hand -->")  # fmt: skip
NO_RUN = ("No GPU run is recorded yet: run `make bench-gpu` on a machine with one H100/H200 "
          "(it writes `results/bench/gpu/bench_gpu.json`), then "
          "`python scripts/update_bench_docs.py`.")  # fmt: skip

PART_ORDER = ("compression", "vision", "prefill", "e2e")
PART_TITLES = {
    "compression": "Compression step against the release loop",
    "vision": "Vision path at LLaVA-1.5 shapes",
    "prefill": "Prefill and decode, 7B-shape decoder",
    "e2e": "End to end: our pipeline vs lmms-eval's `llava_hf`",
}
# part -> (column header, row key, format); the fields bench_gpu.py writes per row
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "compression": [
        ("method", "method", "s"), ("B", "batch", "d"), ("ms median", "ms_median", ".3f"),
        ("ms min", "ms_min", ".3f"), ("x release loop (device)", "x_vs_release_device", ".1f"),
        ("x release loop (CPU, sklearn)", "x_vs_release_cpu", ".1f"),
        ("% of one ViT pass", "pct_of_vit", ".2f"),
    ],
    "vision": [
        ("B", "batch", "d"), ("case", "case", "s"), ("ms median", "ms_median", ".2f"),
        ("vision", "vision_ms", ".2f"), ("text", "text_ms", ".2f"),
        ("compression", "compression_ms", ".2f"), ("x none", "x_none", ".3f"),
        ("x vanilla tower", "x_vanilla", ".3f"), ("speed-up vs release", "speedup_vs_release", ".2f"),
    ],
    "prefill": [
        ("B", "batch", "d"), ("K", "visual_tokens", "d"), ("case", "case", "s"),
        ("prefill ms median", "prefill_ms_median", ".2f"), ("speed-up", "speedup", ".2f"),
        ("analytic", "analytic_speedup", ".2f"), ("measured / analytic", "efficiency", ".2f"),
        ("decode ms / token", "decode_ms_per_token", ".2f"), ("peak GiB", "peak_gib", ".2f"),
    ],
    "e2e": [
        ("harness", "harness", "s"), ("method", "method", "s"), ("batch", "batch", "d"),
        ("samples", "samples", "d"), ("model s", "model_s", ".2f"),
        ("samples/s", "samples_per_s", ".2f"), ("vs llava_hf b1", "speedup_vs_llava_hf", ".2f"),
        ("answers as llava_hf", "same_answers", "s"),
    ],
}  # fmt: skip


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if fmt == "s":
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _target_line(t: dict[str, Any]) -> str:
    where = f" at B = {t['batch']}" if t.get("batch") is not None else ""
    value = "n/a" if t.get("value") is None else f"{t['value']:.3g}"
    if t.get("threshold") is None:
        return f"- {t['name']}{where}: {value} (reported, no threshold)"
    met = {True: "met", False: "not met", None: "not measured"}[t.get("met")]
    return f"- {t['name']}{where}: {value} (target {t['op']} {t['threshold']:g}): **{met}**"


def _sanity_line(s: dict[str, Any]) -> str:
    where = f" (B = {s['batch']})" if s.get("batch") is not None else ""
    return f"- sanity, {s['check']}{where}: {s['message']}"


def render_part(name: str, part: dict[str, Any]) -> list[str]:
    title = PART_TITLES.get(name, name)
    status = part.get("status", "?")
    head = f"#### {title}: {status}"
    lines = [head, ""]
    if part.get("reason"):
        lines += [f"Reason: {part['reason']}", ""]
    if part.get("description"):
        lines += [part["description"], ""]
    rows = part.get("rows") or []
    if rows and name in COLUMNS:
        cols = COLUMNS[name]
        lines += table([c[0] for c in cols], [[_cell(r.get(k), f) for _, k, f in cols]
                                              for r in rows])  # fmt: skip
        lines.append("")
    checks = [_sanity_line(s) for s in part.get("sanity") or []]
    goals = [_target_line(t) for t in part.get("targets") or []]
    if checks or goals:
        lines += checks + goals + [""]
    valid = part.get("valid")
    if valid is not None:
        lines += [f"Measurement {'valid' if valid else '**not valid**'} (sanity checks above); "
                  f"wall {part.get('wall_s', 0):.0f} s of a {part.get('budget_s', 0):.0f} s "
                  f"budget.", ""]  # fmt: skip
    return lines


def render_record(record: dict[str, Any], source: str = "") -> str:
    """Markdown of one bench_gpu record (the docs block's section, the script's ``.md``)."""
    m = record.get("machine", {})
    commit = (m.get("commit") or "")[:10] or "unknown"
    dirty = " + uncommitted script changes" if m.get("scripts_modified") else ""
    lines = []
    if record.get("smoke"):
        lines += ["**Smoke run on CPU at tiny shapes: these are not GPU figures.**", ""]
    lines += [
        f"{source + ': ' if source else ''}{m.get('device_name', '?')} (CUDA {m.get('cuda')}), "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, commit {commit}{dirty}, "
        f"{record.get('started', '?')}; wall {record.get('wall_s', 0):.0f} s of a "
        f"{record.get('budget_s', 0):.0f} s deadline.",
        "",
    ]
    parts = record.get("parts", {})
    for name in [*PART_ORDER, *sorted(set(parts) - set(PART_ORDER))]:
        if name in parts:
            lines += render_part(name, parts[name])
    return "\n".join(lines).rstrip() + "\n"


def load_records(results: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(Path(results).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            out.append((path.name, record))
    return out


def render_block(records: list[tuple[str, dict[str, Any]]],
                 cpu_results: Path = ROOT / "results" / "bench") -> str:  # fmt: skip
    """What goes between the markers: the CPU-beside-GPU headlines, then every GPU record."""
    body = [GENERATED, "", "Headline figures: this CPU beside the GPU (ratios; CPU shapes as in "
            "the sections above, GPU shapes as below).", "", *side_by_side(cpu_results, records),
            ""]  # fmt: skip
    if not records:
        return "\n".join([*body, NO_RUN]) + "\n"
    for name, record in records:
        if len(records) > 1:
            body += [f"### `{name}`", ""]
        body.append(render_record(record, source=f"`{name}`"))
    return "\n".join(body).rstrip() + "\n"


def fill(doc: str, block: str) -> str:
    if not BLOCK.search(doc):
        raise SystemExit(f"update_bench_docs: no {BEGIN} ... {END} block in the docs file; "
                         f"add the two markers where the GPU figures go")  # fmt: skip
    return BLOCK.sub(lambda _m: f"{BEGIN}\n{block}{END}", doc, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "bench" / "gpu")
    parser.add_argument("--cpu-results", type=Path, default=ROOT / "results" / "bench",
                        help="the CPU scripts' JSON records (the headline table's CPU column)")  # fmt: skip
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--check", action="store_true",
                        help="compare only; exit 1 when the block differs from the records")  # fmt: skip
    args = parser.parse_args(argv)
    doc = args.docs.read_text()
    records = load_records(args.results)
    updated = fill(doc, render_block(records, args.cpu_results))
    if args.check:
        if updated != doc:
            print(f"update_bench_docs: the {BEGIN} block of {args.docs} is stale against "
                  f"{args.results}/*.json; run `python scripts/update_bench_docs.py`",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"{args.docs}: the {BEGIN} block matches {len(records)} record(s)")
        return 0
    if updated != doc:
        args.docs.write_text(updated)
    print(f"{args.docs}: {BEGIN} block filled from {len(records)} record(s) in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
