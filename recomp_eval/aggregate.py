"""Turn every ``results.json`` under a folder into paper tables (markdown, CSV, LaTeX) and plots.

``recomp-eval-tables [--root results] [--out results/tables]`` (also ``make tables``) writes:

* ``accuracy.{md,csv,tex}``: the primary metric per benchmark for each method x retention, the
  percentage relative to the uncompressed run (``none``) of the same model and protocol, and the
  average of those percentages;
* ``efficiency.{md,csv,tex}``: kept visual tokens, prefill TFLOPs, prefill ms, decode ms/token and
  peak memory per benchmark x method x retention;
* ``slices.{md,csv,tex}``: the primary metric per tagged slice (SynthVQA: object size, question
  family), when records carry slices;
* ``plots/<benchmark>.png``: primary metric against kept tokens and against prefill TFLOPs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd

from recomp_eval.records import load_records

VANILLA = "none"


def _retention_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "adaptive"
    return f"{float(value):g}"


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record with the fields the tables need (latest record wins per key)."""
    rows = []
    for rec in records:
        method = rec["method"]
        latency = rec.get("latency_ms", {})
        rows.append(
            {
                "model": rec["model"].get("name", rec["model"].get("id")),
                "protocol": rec["protocol"],
                "benchmark": rec["benchmark"]["name"],
                "method": method.get("label", method["name"]),
                "method_name": method["name"],
                "retention": _retention_label(method.get("retention")),
                "metric": rec["primary_metric"],
                "value": rec["metrics"].get(rec["primary_metric"], float("nan")),
                "tokens": rec["tokens"].get("mean", float("nan")),
                "tflops": rec["flops"].get("prefill_tflops", float("nan")),
                "prefill_ms": latency.get("prefill", {}).get("median", float("nan")),
                "decode_ms_per_token": latency.get("decode_per_token", {}).get(
                    "median", float("nan")
                ),
                "peak_memory_mb": rec.get("peak_memory_mb", {}).get("total", float("nan")),
                "reportable": rec.get("reportable", False),
                "samples": rec["samples"].get("evaluated", 0),
                "created": rec.get("created", ""),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keys = ["model", "protocol", "benchmark", "method", "retention"]
    return frame.sort_values("created").drop_duplicates(keys, keep="last").reset_index(drop=True)


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Primary metric per benchmark (columns) for each model/protocol/method/retention row."""
    index = ["model", "protocol", "method", "retention"]
    table = frame.pivot_table(index=index, columns="benchmark", values="value", aggfunc="first")
    vanilla = frame[frame["method_name"] == VANILLA]
    base = vanilla.pivot_table(
        index=["model", "protocol"], columns="benchmark", values="value", aggfunc="first"
    )
    rel_cols = []
    for bench in table.columns:
        if bench not in base.columns:
            continue
        ref = table.index.droplevel(["method", "retention"]).map(
            lambda key, b=bench: base[b].get(key, float("nan"))
        )
        col = f"{bench} rel%"
        table[col] = 100.0 * table[bench] / ref.to_numpy()
        rel_cols.append(col)
    table["avg rel%"] = table[rel_cols].mean(axis=1) if rel_cols else float("nan")
    return table.reset_index()


def slice_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Primary metric per tagged slice (``benchmark/slice/<tag>=<value>/<metric>`` keys).

    Columns are ``<benchmark> <tag>=<value>``; empty when no record carries slices.
    """
    rows = []
    for rec in records:
        method = rec["method"]
        for key, value in rec["metrics"].items():
            parts = key.split("/")
            if len(parts) != 4 or parts[1] != "slice" or parts[3] == "n":
                continue
            rows.append({
                "model": rec["model"].get("name", rec["model"].get("id")),
                "protocol": rec["protocol"],
                "method": method.get("label", method["name"]),
                "retention": _retention_label(method.get("retention")),
                "slice": f"{parts[0]} {parts[2]}",
                "value": value,
                "created": rec.get("created", ""),
            })  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    index = ["model", "protocol", "method", "retention"]
    frame = frame.sort_values("created").drop_duplicates([*index, "slice"], keep="last")
    table = frame.pivot_table(index=index, columns="slice", values="value", aggfunc="first")
    return table.reset_index()


def efficiency_table(frame: pd.DataFrame) -> pd.DataFrame:
    cols = [
        "model",
        "protocol",
        "benchmark",
        "method",
        "retention",
        "tokens",
        "tflops",
        "prefill_ms",
        "decode_ms_per_token",
        "peak_memory_mb",
        "samples",
        "reportable",
    ]
    return frame[cols].sort_values(cols[:5]).reset_index(drop=True)


def _write(table: pd.DataFrame, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{stem}.csv", index=False, float_format="%.4g")
    (out / f"{stem}.md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n")
    (out / f"{stem}.tex").write_text(
        table.to_latex(index=False, float_format="%.2f", na_rep="--", escape=True)
    )


def plot_benchmarks(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Per benchmark: primary metric against kept tokens and against prefill TFLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for bench, group in frame.groupby("benchmark"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (method, _proto, _model), rows in group.groupby(["method", "protocol", "model"]):
            rows = rows.sort_values("tokens")
            for ax, x in zip(axes, ("tokens", "tflops")):
                ax.plot(rows[x], rows["value"], marker="o", label=method)
        metric = group["metric"].iloc[0]
        for ax, xlabel in zip(axes, ("kept visual tokens", "prefill TFLOPs")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="best")
        fig.suptitle(str(bench))
        fig.tight_layout()
        path = out / f"{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_tables(root: Path, out: Path) -> dict[str, Any]:
    """Aggregate every record under ``root`` into ``out``; returns the frames and plot paths."""
    records = load_records(root)
    frame = records_frame(records)
    if frame.empty:
        raise SystemExit(f"no results.json found under {root}; run an evaluation first")
    acc = accuracy_table(frame)
    eff = efficiency_table(frame)
    slices = slice_table(records)
    _write(acc, out, "accuracy")
    _write(eff, out, "efficiency")
    if not slices.empty:
        _write(slices, out, "slices")
    plots = plot_benchmarks(frame, out / "plots")
    return {"frame": frame, "accuracy": acc, "efficiency": eff, "slices": slices, "plots": plots}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("results"), help="folder to scan")
    parser.add_argument("--out", type=Path, default=Path("results/tables"), help="output folder")
    parser.add_argument("--slices", action="store_true", help="also print the slices table")
    args = parser.parse_args(argv)
    result = write_tables(args.root, args.out)
    print(result["accuracy"].to_markdown(index=False, floatfmt=".2f"))
    if args.slices and not result["slices"].empty:
        table = result["slices"]
        cols = [c for c in table.columns if "size=" in c and "size=none" not in c]
        print("\nBy size of the object asked about (all slices in slices.md):\n")
        print(table[["method", "retention", *cols]].to_markdown(index=False, floatfmt=".2f"))
    print(f"\nwrote tables and plots to {args.out}")


if __name__ == "__main__":
    main()
