"""``recomp-eval-tables``: paper tables and plots from one explicit set of runs.

    recomp-eval-tables --root results/raw --out results/tables
    recomp-eval-tables --root results/demo/raw --experiment synth_demo --out results/demo/tables
    recomp-eval-tables --glob 'results/raw/gqa/*/llava15/*' --out tables/gqa

writes ``accuracy`` (methods x benchmarks, average % of none), ``accuracy_long`` (every run with
its CI, n, skipped, paired comparison, run key), ``efficiency`` (tokens, FLOPs, latency, memory)
``slices_<benchmark>_<tag>`` (SynthVQA slices) and, where the data knows each question's target
object, ``targets_<benchmark>`` and ``target_slices_<benchmark>_<tag>`` (target recall,
localisation), each as ``.md``, ``.csv`` and ``.tex`` (caption, best value per column in bold),
plus ``plots/<benchmark>-<model>-<protocol>.png`` and ``plots/target_recall_<benchmark>.png``.
Two different runs of one cell stop the table (``--on-conflict rows`` shows both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recomp_eval.report.runs import TableInputError, resolve_cells, select_runs
from recomp_eval.report.tables import (
    accuracy_long_table,
    accuracy_table,
    efficiency_table,
    metric_label,
    row_sets,
    score_runs,
    slice_tables,
)
from recomp_eval.report.targets import plot_target_recall, target_slice_tables, target_table


def plot_frame(scored: list[Any]):
    """The long frame :func:`recomp_eval.report.plots.plot_runs` draws (one row per run)."""
    import pandas as pd

    return pd.DataFrame([
        {
            "model": s.run.model, "protocol": s.run.protocol, "benchmark": s.run.benchmark,
            "method": s.run.label, "method_name": s.run.method_name,
            "budget": "adaptive" if s.run.retention == "adaptive" else "fixed",
            "retention": s.run.retention, "tokens": float(s.run.record["tokens"]["mean"]),
            "tflops": float(s.run.record["flops"].get("prefill_tflops", float("nan"))),
            "value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high,
            "metric_label": metric_label(s.run.benchmark, s.key),
        }
        for s in scored
    ])  # fmt: skip


def write_tables(
    root: Path | None,
    out: Path,
    pattern: str | None = None,
    experiment: str | None = None,
    on_conflict: str = "error",
    include_superseded: bool = False,
    n_boot: int = 1000,
    plots: bool = True,
) -> dict[str, Any]:
    """Select runs, build every table and plot under ``out``; returns the tables and paths."""
    selection = select_runs(root, pattern, experiment, include_superseded)
    runs = resolve_cells(selection, on_conflict)
    scored = score_runs(runs, n_boot=n_boot)
    sets = row_sets(scored, disambiguate=on_conflict == "rows")
    notes = selection.notes()
    tables = {
        "accuracy": accuracy_table(scored, sets, notes),
        "accuracy_long": accuracy_long_table(scored, sets, notes),
        "efficiency": efficiency_table(scored, sets, notes),
    }
    slices = slice_tables(scored, sets)
    benches = sorted({s.run.benchmark for s in scored})
    targets = [t for b in benches if (t := target_table(scored, sets, b)) is not None]
    targets += target_slice_tables(scored, sets)
    files = [p for t in [*tables.values(), *slices, *targets] for p in t.write(out)]
    for name, group in (("slices.md", slices), ("targets.md", targets)):
        if group:
            (out / name).write_text("\n".join(t.to_markdown() for t in group))
            files.append(out / name)
    figures = []
    if plots:
        from recomp_eval.report.plots import plot_runs

        figures = plot_runs(plot_frame(scored), out / "plots")
        if targets:
            figures += plot_target_recall(scored, out / "plots")
    return {**tables, "slices": slices, "targets": targets, "scored": scored, "files": files,
            "plots": figures, "left_out": selection.left_out}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="every results.json under this folder")
    parser.add_argument("--glob", dest="pattern", help="run folders (or results.json) to use")
    parser.add_argument("--experiment", help="only runs made by this experiment file")
    parser.add_argument("--out", type=Path, default=Path("results/tables"), help="output folder")
    parser.add_argument(
        "--on-conflict",
        choices=("error", "rows"),
        default="error",
        help="two different runs in one cell: stop (default) or one row each",
    )
    parser.add_argument(
        "--include-superseded",
        action="store_true",
        help="also show runs made on an earlier checkpoint/data content",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--print-slices",
        nargs="*",
        default=(),
        metavar="NAME",
        help="also print these slice tables, e.g. slices_gqa_size",
    )
    args = parser.parse_args(argv)
    if args.root is None and args.pattern is None:
        args.root = Path("results/raw")
    try:
        result = write_tables(
            args.root, args.out, args.pattern, args.experiment, args.on_conflict,
            args.include_superseded, plots=not args.no_plots,
        )  # fmt: skip
    except TableInputError as err:
        print(f"recomp-eval-tables: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["accuracy"].to_markdown())
    for table in [*result["slices"], *result["targets"]]:
        if table.name in args.print_slices:
            print(table.to_markdown())
    print(
        f"wrote {len(result['files'])} table files and {len(result['plots'])} plots to {args.out}"
    )


if __name__ == "__main__":
    main()
