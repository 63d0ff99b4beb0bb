"""Paper tables from a selection of runs: accuracy (wide and per run), efficiency, slices.

Every number traces to one run (its folder, run key and n are in ``accuracy_long``). "% of
none" is always computed on the samples both the run and its uncompressed reference answered
(paired), with the reference chosen among ``none`` runs that share the run's pairing key (same
model contents, data, protocol and generation settings); the paired n is shown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recomp_eval.report.format import Column, Table
from recomp_eval.report.runs import Run

BENCH_NAMES = {"gqa": "GQA", "vqav2": "VQAv2", "textvqa": "TextVQA", "pope": "POPE", "mme": "MME"}
METRIC_NAMES = {
    "accuracy": "accuracy (%)",
    "f1_mean": "F1, mean of the splits (%)",
    "f1": "F1 (%)",
    "perception": "perception (points)",
    "cognition": "cognition (points)",
}
POINTS = ("perception", "cognition")  # MME scores are points, not fractions
VANILLA = "none"
PCT = "{:.1f}"


def bench_name(bench: str) -> str:
    return BENCH_NAMES.get(bench, bench.upper())


def metric_part(key: str) -> str:
    """``pope/f1_mean_llava`` -> ``f1_mean`` (the name without benchmark and variant)."""
    name = key.split("/", 1)[1]
    for base in sorted(METRIC_NAMES, key=len, reverse=True):
        if name == base or name.startswith(base + "_"):
            return base
    return name


def to_display(key: str, value: float) -> float:
    """Fractions become percentages; points stay points."""
    return value if metric_part(key) in POINTS else 100.0 * value


def metric_label(bench: str, key: str) -> str:
    part = metric_part(key)
    return f"{bench_name(bench)} {METRIC_NAMES.get(part, part)}"


@dataclass
class Scored:
    """A run with its headline number, CI and comparison to its uncompressed reference."""

    run: Run
    key: str  # primary metric key
    value: float  # display units
    ci_low: float
    ci_high: float
    rel: float = math.nan  # % of the reference on the paired samples
    paired_n: int = 0
    reference: Run | None = None
    diff: float = math.nan  # per-question accuracy difference, percentage points
    diff_low: float = math.nan
    diff_high: float = math.nan

    @property
    def partial(self) -> bool:
        """The comparison used fewer samples than the run (or its reference) answered."""
        ref_n = self.reference.n if self.reference is not None else 0
        return self.reference is not None and self.paired_n < max(self.run.n, ref_n)


def _metric_names(run: Run) -> list[str] | None:
    metrics = ((run.record.get("config") or {}).get("benchmark") or {}).get("metrics")
    return metrics.get(run.protocol) if isinstance(metrics, dict) else None


def _reference(run: Run, runs: list[Run]) -> Run | None:
    """The ``none`` run to compare with: same pairing key, same context preferred, else the one
    sharing most samples."""
    if run.method_name == VANILLA:
        return run
    key = run.identity.get("pairing_key")
    candidates = [
        r for r in runs
        if r.method_name == VANILLA and r.identity.get("pairing_key") == key
        and (r.model, r.protocol, r.benchmark) == (run.model, run.protocol, run.benchmark)
    ]  # fmt: skip
    if not candidates:
        return None
    same = [
        r for r in candidates if r.identity.get("context_key") == run.identity.get("context_key")
    ]
    if same:
        return same[0]
    ids = {r["sample_id"] for r in run.rows}
    return max(candidates, key=lambda r: len(ids & {x["sample_id"] for x in r.rows}))


def score_runs(runs: list[Run], n_boot: int = 1000) -> list[Scored]:
    """Headline metric, bootstrap CI and paired comparison with ``none`` for every run."""
    from recomp_eval.metrics import score
    from recomp_eval.metrics.bootstrap import metric_ci
    from recomp_eval.metrics.loyalty import loyalty_metrics

    out = []
    for run in runs:
        key = run.record["primary_metric"]
        names = _metric_names(run)
        value, low, high = metric_ci(run.benchmark, run.protocol, run.rows, key, names, n_boot)
        scored = Scored(run, key, to_display(key, value), to_display(key, low),
                        to_display(key, high))  # fmt: skip
        ref = _reference(run, runs)
        if ref is not None:
            ref_rows = {r["sample_id"]: r for r in ref.rows if r.get("answers")}
            mine = [r for r in run.rows if r["sample_id"] in ref_rows]
            theirs = [ref_rows[r["sample_id"]] for r in mine]
            scored.reference, scored.paired_n = ref, len(mine)
            if mine:
                a = score(run.benchmark, mine, run.protocol, metrics=names).get(key, math.nan)
                b = score(run.benchmark, theirs, run.protocol, metrics=names).get(key, math.nan)
                scored.rel = 100.0 * a / b if b else math.nan
                if ref is not run:
                    loyal = loyalty_metrics(mine, theirs, run.benchmark, run.protocol,
                                            metrics=names)  # fmt: skip
                    prefix = f"{run.benchmark}/loyalty/accuracy_diff"
                    scored.diff = 100.0 * loyal[prefix]
                    scored.diff_low = 100.0 * loyal[f"{prefix}_low"]
                    scored.diff_high = 100.0 * loyal[f"{prefix}_high"]
        out.append(scored)
    return out


# --- row keys ----------------------------------------------------------------------------------


def row_sets(scored: list[Scored], disambiguate: bool) -> dict[int, str]:
    """A short "run set" label per scored run, only as detailed as needed to keep the runs of
    one wide-table cell apart (``--on-conflict rows``); empty strings otherwise."""
    if not disambiguate:
        return {id(s): "" for s in scored}
    levels = [
        lambda s: f"limit={s.run.identity.get('limit')}",
        lambda s: f"ckpt {str(s.run.checkpoint)[:7]}",
        lambda s: f"data {str(s.run.data)[:7]}",
        lambda s: f"run {s.run.run_key[:8]}",
    ]
    for depth in range(1, len(levels) + 1):
        labels = {id(s): ", ".join(f(s) for f in levels[:depth]) for s in scored}
        seen: dict[tuple, int] = {}
        clash = False
        for s in scored:
            cell = (*s.run.cell, labels[id(s)])
            seen[cell] = seen.get(cell, 0) + 1
            clash |= seen[cell] > 1
        if not clash:
            return labels
    return labels


def _constant(scored: list[Scored], attr: str) -> str | None:
    values = {getattr(s.run, attr) for s in scored}
    return values.pop() if len(values) == 1 else None


def _ident_columns(scored: list[Scored], sets: dict[int, str]) -> list[Column]:
    cols = []
    if _constant(scored, "model") is None:
        cols.append(Column("model", "model", align="l"))
    if _constant(scored, "protocol") is None:
        cols.append(Column("protocol", "protocol", align="l"))
    cols += [Column("method", "method", align="l"), Column("retention", "retention")]
    if any(sets.values()):
        cols.append(Column("set", "run set", align="l"))
    return cols


def _context_note(scored: list[Scored]) -> str:
    parts = [f"{k} {v}" for k in ("model", "protocol") if (v := _constant(scored, k))]
    return ", ".join(parts)


def _order(row: dict[str, Any]) -> tuple:
    ret = row["retention"]
    return (row.get("model", ""), row.get("protocol", ""), row["method"] != VANILLA,
            row["method"], ret != "adaptive", float(ret) if ret != "adaptive" else 0.0,
            row.get("set", ""))  # fmt: skip


def accuracy_table(scored: list[Scored], sets: dict[int, str], notes: list[str]) -> Table:
    """Methods x benchmarks: the headline metric, kept tokens, the average % of none."""
    benches = sorted({s.run.benchmark for s in scored}, key=lambda b: list(BENCH_NAMES).index(b)
                     if b in BENCH_NAMES else 99)  # fmt: skip
    rows: dict[tuple, dict[str, Any]] = {}
    partial = False
    for s in scored:
        run = s.run
        key = (run.model, run.protocol, run.label, run.retention, sets[id(s)])
        row = rows.setdefault(key, {"model": run.model, "protocol": run.protocol,
                                    "method": run.label, "retention": run.retention,
                                    "set": sets[id(s)], "_rel": [], "_tokens": [],
                                    "_vanilla": run.method_name == VANILLA})  # fmt: skip
        row[run.benchmark] = s.value
        row[f"{run.benchmark}_n"] = run.n
        row["_tokens"].append(float(run.record["tokens"]["mean"]))
        if not math.isnan(s.rel):
            row["_rel"].append(s.rel)
        partial |= s.partial
    for row in rows.values():
        row["tokens"] = statistics.fmean(row["_tokens"])
        row["avg_rel"] = statistics.fmean(row["_rel"]) if row["_rel"] else math.nan
    cols = [*_ident_columns(scored, sets), Column("tokens", "kept tokens", "{:.1f}")]
    for bench in benches:
        ns = {r.get(f"{bench}_n") for r in rows.values() if bench in r}
        label = bench_name(bench) + (f" (n={ns.pop()})" if len(ns) == 1 else "")
        fmt = "{:.1f}"
        cols.append(Column(bench, label, fmt, best="max"))
        if len(ns) > 1:
            cols.append(Column(f"{bench}_n", f"{bench_name(bench)} n", "{:d}"))
    cols.append(Column("avg_rel", "avg % of none", PCT, best="max"))
    metric_notes = sorted({f"{bench_name(s.run.benchmark)}: {metric_label(s.run.benchmark, s.key)}"
                           for s in scored})  # fmt: skip
    context = _context_note(scored)
    return Table(
        name="accuracy",
        caption="Accuracy by method and visual-token budget" + (f" ({context})" if context else ""),
        columns=cols,
        rows=sorted(rows.values(), key=_order),
        notes=[
            "Metrics: " + "; ".join(metric_notes) + ".",
            "avg % of none: mean over benchmarks of the run's score over the uncompressed run's "
            "score, both computed on the samples the two runs answered (paired); per-benchmark "
            "values, paired n and 95% CIs are in accuracy_long."
            + (" Some comparisons used fewer paired samples than a run's n." if partial else ""),
            "Bold: best per column among compressed runs (ties at the shown precision all bold).",
            *notes,
        ],
        compete=lambda row: not row["_vanilla"],
    )


def _interval(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"[{low:.1f}, {high:.1f}]"


def accuracy_long_table(scored: list[Scored], sets: dict[int, str], notes: list[str]) -> Table:
    """One row per run: value, CI, n, skipped, % of none on the paired samples, Δ with its CI."""
    rows = []
    for s in scored:
        run = s.run
        rows.append({
            "model": run.model, "protocol": run.protocol, "benchmark": bench_name(run.benchmark),
            "method": run.label, "retention": run.retention, "set": sets[id(s)],
            "tokens": float(run.record["tokens"]["mean"]),
            "metric": metric_label(run.benchmark, s.key), "value": s.value,
            "ci": _interval(s.ci_low, s.ci_high), "n": run.n,
            "skipped": int(run.record["samples"].get("skipped", 0)),
            "rel": s.rel, "paired_n": s.paired_n if s.reference is not None else None,
            "diff": s.diff, "diff_ci": _interval(s.diff_low, s.diff_high),
            "run": run.run_key[:12], "_vanilla": run.method_name == VANILLA,
        })  # fmt: skip
    cols = [
        Column("benchmark", "benchmark", align="l"),
        *_ident_columns(scored, sets),
        Column("tokens", "kept tokens", "{:.1f}"),
        Column("metric", "metric", align="l"),
        Column("value", "value", "{:.1f}"),
        Column("ci", "95% CI"),
        Column("n", "n", "{:d}"),
        Column("skipped", "skipped", "{:d}"),
        Column("rel", "% of none (paired)", PCT),
        Column("paired_n", "paired n", "{:d}"),
        Column("diff", "Δ acc. vs none (pp)", "{:+.1f}"),
        Column("diff_ci", "Δ 95% CI"),
        Column("run", "run key", align="l"),
    ]  # fmt: skip
    context = _context_note(scored)
    return Table(
        name="accuracy_long",
        caption="Every run behind the accuracy table" + (f" ({context})" if context else ""),
        columns=cols,
        rows=sorted(rows, key=lambda r: (r["benchmark"], *_order(r))),
        notes=[
            "95% CI: percentile bootstrap of the metric over the run's samples (1,000 resamples; "
            "POPE within each split, MME over image pairs within each category).",
            "% of none (paired): the metric of the run over that of the uncompressed run, both on "
            "the paired n samples answered by both. Δ acc.: mean per-question accuracy "
            "difference to the uncompressed run on those samples (percentage points), with its "
            "paired bootstrap 95% CI.",
            *notes,
        ],
    )


def flops_unit(scored: list[Scored]) -> tuple[str, float]:
    """GFLOPs when every run's prefill is below one TFLOP (small models), else TFLOPs."""
    peak = max((float(s.run.record["flops"].get("prefill_tflops") or 0.0) for s in scored),
               default=0.0)  # fmt: skip
    return ("GFLOPs", 1e3) if peak < 1.0 else ("TFLOPs", 1.0)


def efficiency_table(scored: list[Scored], sets: dict[int, str], notes: list[str]) -> Table:
    """Kept tokens, prefill FLOPs, latency per stage and peak memory per run."""
    unit, scale = flops_unit(scored)
    rows = []
    for s in scored:
        rec = s.run.record
        latency = rec.get("latency_ms", {})
        rows.append({
            "model": s.run.model, "protocol": s.run.protocol,
            "benchmark": bench_name(s.run.benchmark), "method": s.run.label,
            "retention": s.run.retention, "set": sets[id(s)],
            "tokens": float(rec["tokens"]["mean"]),
            "dtype": str(rec["model"].get("dtype", "")),
            "flops": scale * float(rec["flops"].get("prefill_tflops", math.nan)),
            "prefill_ms": latency.get("prefill", {}).get("median", math.nan),
            "decode_ms": latency.get("decode_per_token", {}).get("median", math.nan),
            "memory": (rec.get("peak_memory_mb") or {}).get("total", math.nan),
            "n": s.run.n, "reportable": "yes" if rec.get("reportable") else "no",
            "timing": (rec.get("world") or {}).get("timing", "one process"),
            "_vanilla": s.run.method_name == VANILLA,
        })  # fmt: skip
    cols = [
        Column("benchmark", "benchmark", align="l"),
        *_ident_columns(scored, sets),
        Column("tokens", "kept tokens", "{:.1f}"),
        Column("dtype", "dtype", align="l"),
        Column("flops", f"prefill {unit}", "{:.3g}"),
        Column("prefill_ms", "prefill ms (median)", "{:.1f}"),
        Column("decode_ms", "decode ms/token", "{:.1f}"),
        Column("memory", "peak memory MB", "{:.0f}"),
        Column("n", "n", "{:d}"),
        Column("reportable", "reportable", align="l"),
    ]  # fmt: skip
    shared = any(r["timing"] != "one process" for r in rows)
    if shared:  # latencies of data-parallel runs: say how many processes shared what
        cols.append(Column("timing", "timed with", align="l"))
        notes = [*notes, "timed with: latencies of runs evaluated by several processes "
                 "(torchrun, job arrays) are not single-process latencies; for latency figures "
                 "run experiment=latency in one process per device."]  # fmt: skip
    context = _context_note(scored)
    return Table(
        name="efficiency",
        caption="Cost per run" + (f" ({context})" if context else ""),
        columns=cols,
        rows=sorted(rows, key=lambda r: (r["benchmark"], *_order(r))),
        notes=[
            f"prefill {unit}: analytic, per sample, from the visual tokens the LLM saw. Adaptive "
            "budgets depend on the dtype the signals are computed in (RC official keeps more "
            "tokens in fp16 than in fp32 on the same image), so the dtype is shown beside them. "
            "Latency is the batch's stage time divided by its size; reportable = full split on a "
            "GPU (CPU timings and limited runs are not).",
            *notes,
        ],
        compete=lambda row: not row["_vanilla"],
    )


SliceRows = dict[tuple[str, str], dict[tuple, dict[str, Any]]]
SliceCounts = dict[tuple[str, str, str], set[int]]


def slice_groups(
    scored: list[Scored], sets: dict[int, str], part: str,
    display: Callable[[Scored, str, float], float | str | None],
) -> tuple[SliceRows, SliceCounts]:  # fmt: skip
    """Rows per (benchmark, tag) from the metrics ``<bench>/<part>/<tag>=<value>/<stat>``.

    ``display(scored, key, value)`` gives the cell shown under ``<value>`` for the metric ``key``
    (None: not shown);
    ``.../n`` entries count the questions per (benchmark, tag, value).
    """
    groups: SliceRows = {}
    counts: SliceCounts = {}
    for s in scored:
        run = s.run
        for key, value in run.record["metrics"].items():
            parts = key.split("/")
            if len(parts) != 4 or parts[1] != part:
                continue
            tag, val = parts[2].split("=", 1)
            if parts[3] == "n":
                counts.setdefault((run.benchmark, tag, val), set()).add(int(value))
                continue
            shown = display(s, key, float(value))
            if shown is None:
                continue
            rows = groups.setdefault((run.benchmark, tag), {})
            row = rows.setdefault((run.model, run.protocol, run.label, run.retention, sets[id(s)]), {
                "model": run.model, "protocol": run.protocol, "method": run.label,
                "retention": run.retention, "set": sets[id(s)],
                "_vanilla": run.method_name == VANILLA,
            })  # fmt: skip
            row[val] = shown
    return groups, counts


def slice_table_set(
    scored: list[Scored], sets: dict[int, str], part: str,
    display: Callable[[Scored, str, float], float | str | None],
    name: str, caption: str, note: str, fmt: str = "{:.1f}", best: str | None = "max",
) -> list[Table]:  # fmt: skip
    """One table per (benchmark, tag) of the ``<bench>/<part>/<tag>=<value>/...`` metrics: a
    column per tag value (its n in the header), the ``display`` cell of each run.

    ``name`` and ``caption`` are format strings over ``bench``, ``tag`` and ``bench_name``.
    """
    groups, counts = slice_groups(scored, sets, part, display)
    tables = []
    for (bench, tag), rows in sorted(groups.items()):
        values = sorted({k for r in rows.values() for k in r if not k.startswith("_")}
                        - {"model", "protocol", "method", "retention", "set"})  # fmt: skip
        cols = _ident_columns(scored, sets)
        for val in values:
            ns = counts.get((bench, tag, val), set())
            header = f"{tag}={val}" + (f" (n={next(iter(ns))})" if len(ns) == 1 else "")
            cols.append(Column(val, header, fmt, best=best))
        names = {"bench": bench, "tag": tag, "bench_name": bench_name(bench)}
        tables.append(Table(
            name=name.format(**names), caption=caption.format(**names), columns=cols,
            rows=sorted(rows.values(), key=_order), notes=[note],
            compete=lambda row: not row["_vanilla"],
        ))  # fmt: skip
    return tables


def slice_tables(scored: list[Scored], sets: dict[int, str]) -> list[Table]:
    """One table per (benchmark, tag): the headline metric per tag value, n in the header."""
    return slice_table_set(
        scored, sets, "slice", lambda s, _key, v: to_display(s.key, v),
        "slices_{bench}_{tag}", "{bench_name} by {tag} of the question's target",
        "Headline metric of the benchmark on each slice; n = questions in the slice.",
    )  # fmt: skip
