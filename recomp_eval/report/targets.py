"""Where each method looks: target-recall tables and the accuracy-vs-recall plot.

Built from the ``<bench>/target/*`` and ``<bench>/target_slice/*`` metrics that
:func:`recomp_eval.summary.target_metrics` writes for benchmarks that know the target object of
each question (SynthVQA). ``targets_<bench>``: per run the headline metric, the share of the
target's patches the LLM sees as their own token (recall kept, with its 95 % CI) or inside a
merged token (recall seen), the precision of the kept tokens, the share of text-recovered tokens
on the target, and the localisation (AUROC, rank of the first target patch) of the text score and
of the CLS attention. ``target_slices_<bench>_<tag>``: recall seen per tag value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from recomp_eval.report.format import Column, Table
from recomp_eval.report.tables import (
    VANILLA,
    Scored,
    _ident_columns,
    _order,
    bench_name,
    slice_table_set,
)


def _pct(value: float) -> float:
    return 100.0 * value


def _row(s: Scored, sets: dict[int, str]) -> dict[str, Any]:
    run = s.run
    return {
        "model": run.model, "protocol": run.protocol, "method": run.label,
        "retention": run.retention, "set": sets[id(s)], "_vanilla": run.method_name == VANILLA,
    }  # fmt: skip


def target_table(scored: list[Scored], sets: dict[int, str], bench: str) -> Table | None:
    """Per run of ``bench``: accuracy, target recall (CI), precision, text share, localisation."""
    rows = []
    for s in scored:
        m = s.run.record["metrics"]
        prefix = f"{bench}/target/"
        if s.run.benchmark != bench or f"{prefix}recall_kept" not in m:
            continue
        row = {**_row(s, sets), "value": s.value}
        for stat in ("recall_kept", "recall_seen", "precision", "text_on_target", "recall_llm"):
            if f"{prefix}{stat}" in m:
                row[stat] = _pct(m[f"{prefix}{stat}"])
        low, high = m.get(f"{prefix}recall_kept_lo"), m.get(f"{prefix}recall_kept_hi")
        if low is not None:
            row["recall_ci"] = f"[{_pct(low):.1f}, {_pct(high):.1f}]"
        for stat in ("text_auroc", "text_first_rank", "cls_attn_auroc", "cls_attn_first_rank"):
            row[stat] = m.get(f"{prefix}{stat}", math.nan)
        row["n"] = int(m.get(f"{prefix}recall_kept_n", 0))
        rows.append(row)
    if not rows:
        return None
    notes = []
    compressed = [r for r in rows if not r["_vanilla"] and r["recall_kept"] < 100.0]
    if len(compressed) >= 3:  # pre-LLM runs: the in-LLM ones keep every patch at the input
        from scipy.stats import spearmanr

        rho = spearmanr([r["value"] for r in compressed], [r["recall_kept"] for r in compressed])
        notes.append(
            f"Spearman rank correlation of accuracy with target recall (kept) over the "
            f"{len(compressed)} runs that compress the LLM input: {rho.statistic:.2f}."
        )
    cols = [
        *_ident_columns(scored, sets),
        Column("value", "accuracy", "{:.1f}", best="max"),
        Column("recall_kept", "target recall, kept (%)", "{:.1f}", best="max"),
        Column("recall_ci", "95% CI", align="l"),
        Column("recall_seen", "recall, kept or merged (%)", "{:.1f}", best="max"),
        Column("recall_llm", "recall after in-LLM pruning (%)", "{:.1f}", best="max"),
        Column("precision", "precision (%)", "{:.1f}", best="max"),
        Column("text_on_target", "text tokens on target (%)", "{:.1f}", best="max"),
        Column("text_auroc", "text score AUROC", "{:.3f}", best="max"),
        Column("text_first_rank", "text: first target rank", "{:.1f}", best="min"),
        Column("cls_attn_auroc", "CLS attention AUROC", "{:.3f}", best="max"),
        Column("cls_attn_first_rank", "CLS: first target rank", "{:.1f}", best="min"),
        Column("n", "n"),
    ]
    return Table(
        name=f"targets_{bench}",
        caption=f"{bench_name(bench)}: where each method looks (questions with a target object)",
        columns=cols,
        rows=sorted(rows, key=_order),
        notes=[
            "target recall, kept: share of the asked-about object's patches the LLM receives as "
            "their own token (kept, recovered by text, or a merge centre); kept or merged: also "
            "counting patches absorbed into a kept merged, contextual or pooled token (the summary "
            "token does not count). precision: share of the own-token patches on the target. "
            "text tokens on target: share of text-recovered patches on it (RC). AUROC: the "
            "per-patch score (the method's text score, the CLS attention of its scoring layer) "
            "of target against other patches; first target rank: 1 + the other patches scored "
            "at least as high as the best target patch. 95% CI: percentile bootstrap over the "
            "questions. In-LLM methods pass every patch to the LLM (recall 100 at its input); "
            "recall after in-LLM pruning: the share of target patches whose token is still in "
            "the sequence after the method's last stage.",
            *notes,
        ],
        compete=lambda row: not row["_vanilla"],
    )


def target_slice_tables(scored: list[Scored], sets: dict[int, str]) -> list[Table]:
    """Recall (kept or merged) per SynthVQA tag value, one table per (benchmark, tag)."""

    def with_ci(s: Scored, key: str, value: float) -> str | None:
        if not key.endswith("/recall_seen"):
            return None
        m = s.run.record["metrics"]
        low, high = m.get(f"{key}_lo"), m.get(f"{key}_hi")
        ci = "" if low is None else f" [{_pct(low):.1f}, {_pct(high):.1f}]"
        return f"{_pct(value):.1f}{ci}"

    return slice_table_set(
        scored, sets, "target_slice", with_ci, "target_slices_{bench}_{tag}",
        "{bench_name}: target recall (kept or merged, %) by {tag}",
        "Share of the target's patches the LLM sees (own or merged token), mean over the "
        "questions of each slice [95% percentile bootstrap CI over them]; n = questions with a "
        "target in the slice.",
        fmt="{}", best=None,
    )  # fmt: skip


def recall_points(scored: list[Scored], bench: str) -> list[tuple[Scored, float, float, float]]:
    """The plot's points of ``bench``: (run, recall kept %, its CI low, high) per run."""
    points = []
    for s in scored:
        m = s.run.record["metrics"]
        key = f"{bench}/target/recall_kept"
        if s.run.benchmark == bench and key in m:
            points.append((s, _pct(m[key]), _pct(m[f"{key}_lo"]), _pct(m[f"{key}_hi"])))
    return points


def plot_target_recall(scored: list[Scored], out: Path) -> list[Path]:
    """One scatter per benchmark: headline metric against target recall (kept), one point per
    run, labelled, with the recall CI as horizontal bars. Returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench in sorted({s.run.benchmark for s in scored}):
        points = recall_points(scored, bench)
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for s, x, low, high in points:
            marker = "s" if s.run.method_name == VANILLA else "o"
            ax.errorbar(x, s.value, xerr=[[x - low], [high - x]], yerr=[[s.value - s.ci_low],
                        [s.ci_high - s.value]], fmt=marker, ms=4, lw=0.7, capsize=2)  # fmt: skip
            ax.annotate(f"{s.run.label}@{s.run.retention}", (x, s.value), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("target recall, kept (% of the asked-about object's patches)")
        ax.set_ylabel(f"{bench_name(bench)} (headline metric)")
        ax.set_title(f"{bench_name(bench)}: accuracy against target recall", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"target_recall_{bench}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
