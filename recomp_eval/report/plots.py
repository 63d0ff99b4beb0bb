"""Paper figures: one per (model, protocol, benchmark), the metric against kept tokens and FLOPs.

:func:`method_styles` gives every method label one (colour, marker) pair for a whole call,
:func:`figure_for` draws one group and returns the Figure (tests inspect its artists), and
:func:`plot_runs` writes one file per group and format. Figures are built with the object API on an
Agg canvas, never through ``pyplot``: no backend switch, no global figure registry, nothing to leak.
matplotlib is imported inside the functions only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GROUP_KEYS = ("model", "protocol", "benchmark")
COLUMNS = (
    *GROUP_KEYS,
    *("method", "method_name", "budget", "retention", "tokens", "tflops"),
    *("value", "ci_low", "ci_high", "metric_label"),
)
BASELINE = "none"  # method_name of the uncompressed run
BUDGETS = ("adaptive", "fixed")
# matplotlib's qualitative tab10, spelled out so that importing this module imports no matplotlib.
PALETTE = (
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"),
    *("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
)
# Filled markers (hollow = adaptive needs a face to empty). 11 is coprime with the 10 colours, so
# method i gets (PALETTE[i % 10], MARKERS[i % 11]): unique pairs for i < 110 by the Chinese remainder
# theorem, and the first 10 methods differ in colour and in marker.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h")
MAX_METHODS = len(PALETTE) * len(MARKERS)
REFERENCE_LINESTYLES = ("--", ":", "-.")
LEGEND_ROWS = 24  # entries per legend column before another column starts


@dataclass(frozen=True)
class Style:
    """How one method label is drawn in every figure of one call."""

    color: str
    marker: str


def method_styles(frame: pd.DataFrame) -> dict[str, Style]:
    """Deterministic style per method label: i-th label of the sorted set gets pair i.

    Args:
        frame: run frame (columns ``method``, ``method_name``); baseline rows
            (``method_name == "none"``) are reference lines and get no style.

    Returns:
        ``{method label: Style}``; no two labels share a (colour, marker) pair.
    """
    runs = frame[frame["method_name"].astype(str) != BASELINE]
    labels = sorted(set(runs["method"].astype(str)))
    if len(labels) > MAX_METHODS:
        raise ValueError(f"{len(labels)} methods but only {MAX_METHODS} distinct styles")
    return {
        label: Style(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)])
        for i, label in enumerate(labels)
    }


def safe_name(text: object) -> str:
    """File-name-safe spelling: runs of anything but ``[A-Za-z0-9._=+-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(text)).strip("._") or "_"


def flops_unit(tflops: pd.Series) -> tuple[float, str]:
    """``(factor from TFLOPs, axis label)``: GFLOPs when the largest value is below 1 TFLOP."""
    peak = pd.to_numeric(tflops, errors="coerce").max()
    if pd.notna(peak) and peak < 1.0:
        return 1e3, "prefill GFLOPs"
    return 1.0, "prefill TFLOPs"


def check_frame(frame: pd.DataFrame) -> None:
    """Raise ``ValueError`` on missing columns, empty group keys or unknown budgets."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"run frame lacks columns {missing}")
    if frame[list(GROUP_KEYS)].isna().any().any():
        raise ValueError(f"run frame has empty {GROUP_KEYS} values")
    runs = frame[frame["method_name"].astype(str) != BASELINE]
    unknown = set(runs["budget"].astype(str)) - set(BUDGETS)
    if unknown:
        raise ValueError(f"budget must be one of {BUDGETS}, got {sorted(unknown)}")


def _error_bars(ax: Axes, rows: pd.DataFrame, x: str, scale: float, label: str, style: Style):
    """Asymmetric vertical bars ``[ci_low, ci_high]`` for the rows whose CI is known (both ends)."""
    ci = rows[rows["ci_low"].notna() & rows["ci_high"].notna()]
    if ci.empty:
        return
    below = (ci["value"] - ci["ci_low"]).clip(lower=0).to_numpy()  # (R,)
    above = (ci["ci_high"] - ci["value"]).clip(lower=0).to_numpy()  # (R,)
    bar = dict(fmt="none", ecolor=style.color, elinewidth=0.9, capsize=2.5, zorder=2)
    ax.errorbar(ci[x] * scale, ci["value"], yerr=[below, above], label=f"_ci {label}", **bar)


def _draw_method(panels: tuple, rows: pd.DataFrame, label: str, style: Style) -> dict:
    """Fixed budgets as one line in order of tokens, adaptive as hollow unjoined markers.

    Returns the keyword arguments of this method's legend entry.
    """
    fixed = rows[rows["budget"] == "fixed"].sort_values("tokens", kind="stable")
    adaptive = rows[rows["budget"] == "adaptive"]
    solid = dict(color=style.color, marker=style.marker, linestyle="-", lw=1.3, ms=5, zorder=3)
    hollow = dict(
        color=style.color,
        marker=style.marker,
        linestyle="none",
        ms=7,
        mfc="none",
        mew=1.5,
        zorder=4,
    )
    for ax, x, factor, _ in panels:
        if not fixed.empty:
            ax.plot(fixed[x] * factor, fixed["value"], gid=f"{label}|fixed", **solid)
        if not adaptive.empty:
            ax.plot(adaptive[x] * factor, adaptive["value"], gid=f"{label}|adaptive", **hollow)
        _error_bars(ax, rows, x, factor, label, style)
    return {**(hollow if fixed.empty else solid), "label": label}


def figure_for(group: pd.DataFrame, styles: dict[str, Style]) -> Figure:
    """Two panels for one (model, protocol, benchmark): metric vs kept tokens, metric vs FLOPs.

    Args:
        group: rows of the run frame (see :func:`plot_runs`) sharing one model, protocol and
            benchmark; raises ``ValueError`` otherwise.
        styles: ``{method label: Style}`` from :func:`method_styles` over the whole frame.

    Returns:
        The Figure on an Agg canvas. Artists carry a ``gid`` for inspection: ``"<label>|fixed"``
        (line through the fixed budgets in order of tokens), ``"<label>|adaptive"`` (hollow markers,
        no line), ``"reference"`` (the baseline's dashed line); CI bars are ``ErrorbarContainer``s.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    check_frame(group)
    keys = [group[k].astype(str).unique() for k in GROUP_KEYS]
    if group.empty or any(len(k) != 1 for k in keys):
        raise ValueError(f"figure_for needs exactly one {GROUP_KEYS}, got {keys}")
    model, protocol, benchmark = (k[0] for k in keys)
    is_base = group["method_name"].astype(str) == BASELINE
    base, runs = group[is_base], group[~is_base]
    scale, flops_label = flops_unit(runs["tflops"] if not runs.empty else group["tflops"])

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_tokens, ax_flops = fig.subplots(1, 2)
    panels = (
        (ax_tokens, "tokens", 1.0, "kept visual tokens"),
        (ax_flops, "tflops", scale, flops_label),
    )
    entries = []  # keyword arguments of the legend's Line2D proxies
    for i, (_, row) in enumerate(base.iterrows()):
        dashes = dict(color="black", linestyle=REFERENCE_LINESTYLES[i % len(REFERENCE_LINESTYLES)])
        name = f" ({row['method']})" if len(base) > 1 else ""
        for ax, *_ in panels:
            ax.axhline(row["value"], lw=1.1, gid="reference", **dashes)
            if pd.notna(row["ci_low"]) and pd.notna(row["ci_high"]):
                ax.axhspan(row["ci_low"], row["ci_high"], color="black", alpha=0.07, lw=0)
        entries.append({**dashes, "label": f"uncompressed{name}: {row['value']:.2f}"})
    for label in sorted(set(runs["method"].astype(str))):
        rows = runs[runs["method"].astype(str) == label]
        entries.append(_draw_method(panels, rows, label, styles[label]))
    grey = dict(color="0.35", marker="o")
    if (runs["budget"] == "fixed").any():
        entries.append({**grey, "label": "filled, joined: fixed budget"})
    if (runs["budget"] == "adaptive").any():
        entries.append(
            {**grey, "mfc": "none", "linestyle": "none", "label": "hollow: adaptive budget"}
        )

    metric = group["metric_label"].dropna().astype(str)
    for ax, _, _, xlabel in panels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.iloc[0] if not metric.empty else "value")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=7))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{benchmark} · {model} · {protocol}")
    fig.tight_layout()
    # Outside the axes, right of the figure; savefig(bbox_inches="tight") widens the canvas for it.
    handles = [Line2D([], [], **entry) for entry in entries]
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        ncol=max(1, math.ceil(len(handles) / LEGEND_ROWS)),
        frameon=False,
    )
    return fig


def plot_runs(frame: pd.DataFrame, out: Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write one figure per (model, protocol, benchmark) and format; return the paths written.

    Args:
        frame: one row per evaluated run. Columns: ``model``, ``protocol``, ``benchmark``,
            ``method`` (label, e.g. ``"recomp[paper]"``), ``method_name`` (``"none"`` = the
            uncompressed reference), ``budget`` (``"adaptive"`` | ``"fixed"``), ``retention`` (str),
            ``tokens`` (mean visual tokens seen by the LLM), ``tflops`` (mean prefill TFLOPs per
            sample), ``value``, ``ci_low``, ``ci_high`` (display units; CIs may be NaN),
            ``metric_label`` (y-axis label).
        out: folder, created if needed; files are ``{benchmark}-{model}-{protocol}.{ext}`` with
            each part passed through :func:`safe_name`.
        formats: file extensions, e.g. ``("png", "pdf")``.

    Returns:
        Paths in order of sorted group keys, then ``formats``.
    """
    check_frame(frame)
    if frame.empty:
        return []
    styles = method_styles(frame)
    groups = list(frame.groupby(list(GROUP_KEYS), sort=True))
    stems: dict[str, tuple] = {}
    for keys, _ in groups:
        model, protocol, benchmark = keys
        stem = "-".join(safe_name(part) for part in (benchmark, model, protocol))
        if stem in stems:
            raise ValueError(f"groups {stems[stem]} and {keys} both map to file stem {stem!r}")
        stems[stem] = keys
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, (_, group) in zip(stems, groups):
        fig = figure_for(group, styles)
        for ext in formats:
            path = out / f"{stem}.{ext.lstrip('.')}"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            paths.append(path)
    return paths
