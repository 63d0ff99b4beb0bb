"""Paper plots on synthetic run frames: one file per group, styles, budgets, CIs, axes, no leaks."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.ticker import FixedLocator

from recomp_eval.report.plots import figure_for, method_styles, plot_runs, safe_name

BIG = "llava-hf/llava-1.5-7b-hf"  # slash: must not become a sub-folder
TINY = "tiny"  # prefill well below 1 TFLOP -> GFLOPs axis
LABELS = {"gqa": "GQA accuracy (%)", "pope": "POPE F1 (%)"}
NONE_VALUE = 61.5
RETENTIONS = (0.2, 0.05, 0.1)  # deliberately not sorted


def run_row(group, method, name, budget, retention, tokens, value, ci):
    model, protocol, bench = group
    per_token = 0.01 if model == BIG else 1e-6  # TFLOPs per visual token
    return {
        "model": model,
        "protocol": protocol,
        "benchmark": bench,
        "method": method,
        "method_name": name,
        "budget": budget,
        "retention": retention,
        "tokens": tokens,
        "tflops": (0.6 if model == BIG else 2e-4) + per_token * tokens,
        "value": value,
        "ci_low": value - ci[0] if ci else math.nan,
        "ci_high": value + ci[1] if ci else math.nan,
        "metric_label": LABELS[bench],
    }


def make_frame(n_methods: int = 25, adaptive_only: bool = False) -> pd.DataFrame:
    """2 models x 2 benchmarks under llava15, plus the 7B on gqa under lmms_eval (5 groups)."""
    groups = [(m, "llava15", b) for m in (BIG, TINY) for b in ("gqa", "pope")]
    rows = []
    for group in [*groups, (BIG, "lmms_eval", "gqa")]:
        rows.append(run_row(group, "none", "none", "fixed", "1.0", 576, NONE_VALUE, None))
        for i in range(n_methods):
            name = f"m{i:02d}"
            label = f"{name}[paper,text_weight={i % 3}]"
            retentions = () if adaptive_only else RETENTIONS
            for j, r in enumerate(retentions):
                ci = None if (i + j) % 4 == 0 else (0.5 + 0.1 * j, 0.8)  # asymmetric, some NaN
                value = 40 + 80 * r + 0.2 * i
                rows.append(run_row(group, label, name, "fixed", str(r), 576 * r, value, ci))
            if adaptive_only or i % 3 == 0:
                ci = (0.4, 0.6) if i % 2 else None
                value = 55 + 0.1 * i
                rows.append(run_row(group, label, name, "adaptive", "adaptive", 70 + i, value, ci))
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)  # shuffled on purpose


def group_of(frame, model=BIG, protocol="llava15", bench="gqa"):
    sel = (frame.model == model) & (frame.protocol == protocol) & (frame.benchmark == bench)
    return frame[sel]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture(scope="module")
def big_fig(frame):
    return figure_for(group_of(frame), method_styles(frame))


def lines_by_gid(ax) -> dict[str, list]:
    found: dict[str, list] = {}
    for line in ax.get_lines():
        if line.get_gid():
            found.setdefault(line.get_gid(), []).append(line)
    return found


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty tick labels on one axis whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels), 2):
                width = min(a.x1, b.x1) - max(a.x0, b.x0)
                height = min(a.y1, b.y1) - max(a.y0, b.y0)
                if width > 0 and height > 0:
                    clashes.append((ta.get_text(), tb.get_text()))
    return clashes


def test_one_file_per_model_protocol_benchmark_and_no_open_figure(frame, tmp_path):
    plt.close("all")
    frame = frame[frame["method"].isin(sorted(set(frame["method"]))[:4])]  # speed: few methods
    paths = plot_runs(frame, tmp_path, formats=("png", "pdf"))
    keys = frame[["model", "protocol", "benchmark"]].drop_duplicates().itertuples(index=False)
    expected = {
        tmp_path / f"{b}-{safe_name(m)}-{p}.{ext}" for m, p, b in keys for ext in ("png", "pdf")
    }
    assert len(expected) == 10
    assert set(paths) == expected and len(paths) == len(expected)
    assert set(tmp_path.iterdir()) == expected  # nothing else, no sub-folder from the "/"
    assert all(p.stat().st_size > 0 for p in paths)
    assert (tmp_path / "gqa-llava-hf_llava-1.5-7b-hf-lmms_eval.png") in expected
    assert plt.get_fignums() == []


def test_styles_unique_for_40_methods_and_stable():
    frame = make_frame(n_methods=40)
    styles = method_styles(frame)
    assert len(styles) == 40 and "none" not in styles
    pairs = {(s.color, s.marker) for s in styles.values()}
    assert len(pairs) == 40
    assert len({s.color for s in styles.values()}) == 10
    assert len({s.marker for s in styles.values()}) > 10  # markers vary too, not only colours
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert method_styles(shuffled) == styles == method_styles(frame)
    assert list(styles) == sorted(styles)  # assigned over the sorted labels


def test_same_method_same_style_in_every_figure(frame):
    styles = method_styles(frame)
    seen: dict[str, set] = {}
    for model, bench in [(BIG, "gqa"), (TINY, "pope")]:
        fig = figure_for(group_of(frame, model=model, bench=bench), styles)
        for gid, lines in lines_by_gid(fig.axes[0]).items():
            if gid.endswith("|fixed"):
                seen.setdefault(gid, set()).add((lines[0].get_color(), lines[0].get_marker()))
    assert len(seen) == 25
    assert all(len(v) == 1 for v in seen.values())
    label = "m07[paper,text_weight=1]"
    assert seen[f"{label}|fixed"] == {(styles[label].color, styles[label].marker)}


def test_too_many_methods_raise():
    labels = [f"m{i}" for i in range(111)]
    frame = pd.DataFrame({"method": labels, "method_name": labels})
    with pytest.raises(ValueError, match="distinct styles"):
        method_styles(frame)


def test_adaptive_points_hollow_and_not_joined(frame, big_fig):
    group = group_of(frame)
    adaptive = group[group.budget == "adaptive"]
    assert not adaptive.empty
    for ax in big_fig.axes:
        lines = lines_by_gid(ax)
        for label, rows in adaptive.groupby("method"):
            (point,) = lines[f"{label}|adaptive"]
            assert point.get_linestyle() == "None"
            assert point.get_markerfacecolor() == "none"
            (fixed,) = lines[f"{label}|fixed"]
            assert point.get_marker() == fixed.get_marker()
            assert point.get_markeredgecolor() == fixed.get_color()
            assert rows.value.iloc[0] in point.get_ydata()
            assert rows.value.iloc[0] not in fixed.get_ydata()
    legend_texts = [t.get_text() for t in big_fig.legends[0].get_texts()]
    assert "hollow: adaptive budget" in legend_texts


def test_fixed_line_sorted_by_tokens(frame, big_fig):
    group = group_of(frame)
    fixed = group[(group.budget == "fixed") & (group.method_name != "none")]
    assert fixed.method.nunique() == 25
    for label, rows in fixed.groupby("method"):
        (line,) = lines_by_gid(big_fig.axes[0])[f"{label}|fixed"]
        x = np.asarray(line.get_xdata(), dtype=float)
        assert list(x) == sorted(rows.tokens)
        assert line.get_linestyle() == "-"
        (flops_line,) = lines_by_gid(big_fig.axes[1])[f"{label}|fixed"]
        assert list(flops_line.get_xdata()) == list(rows.sort_values("tokens").tflops)


def test_error_bars_exactly_for_rows_with_ci(frame, big_fig):
    group = group_of(frame)
    runs = group[group.method_name != "none"]
    with_ci = runs[runs.ci_low.notna()]
    assert 0 < len(with_ci) < len(runs)
    expected = sorted(zip(with_ci.tokens, with_ci.ci_low, with_ci.ci_high))
    drawn = []
    for container in big_fig.axes[0].containers:
        assert isinstance(container, ErrorbarContainer)
        (bars,) = container.lines[2]
        drawn += [(seg[0][0], seg[0][1], seg[1][1]) for seg in bars.get_segments()]
    assert len(drawn) == len(expected)
    np.testing.assert_allclose(sorted(drawn), expected)


def test_axis_labels_title_and_flops_unit(frame, big_fig):
    ax_tokens, ax_flops = big_fig.axes
    assert ax_tokens.get_ylabel() == ax_flops.get_ylabel() == "GQA accuracy (%)"
    assert ax_tokens.get_xlabel() == "kept visual tokens"
    assert ax_flops.get_xlabel() == "prefill TFLOPs"
    title = big_fig.get_suptitle()
    assert BIG in title and "llava15" in title and "gqa" in title

    tiny = group_of(frame, model=TINY, bench="pope")
    fig = figure_for(tiny, method_styles(frame))
    assert fig.axes[0].get_ylabel() == "POPE F1 (%)"
    assert fig.axes[1].get_xlabel() == "prefill GFLOPs"
    label = "m01[paper,text_weight=1]"
    (line,) = lines_by_gid(fig.axes[1])[f"{label}|fixed"]
    rows = tiny[(tiny.method == label) & (tiny.budget == "fixed")].sort_values("tokens")
    np.testing.assert_allclose(line.get_xdata(), rows.tflops * 1e3)


def test_reference_line_at_uncompressed_value(big_fig):
    for ax in big_fig.axes:
        (ref,) = lines_by_gid(ax)["reference"]
        assert list(ref.get_ydata()) == [NONE_VALUE, NONE_VALUE]
        assert ref.get_linestyle() == "--"
        assert "none|fixed" not in lines_by_gid(ax)  # not drawn as a method as well
    legend_texts = [t.get_text() for t in big_fig.legends[0].get_texts()]
    assert f"uncompressed: {NONE_VALUE:.2f}" in legend_texts


def test_tick_labels_do_not_overlap(frame, big_fig):
    assert overlapping_tick_labels(big_fig) == []
    tiny = figure_for(group_of(frame, model=TINY), method_styles(frame))
    assert overlapping_tick_labels(tiny) == []


def test_overlap_check_catches_crowded_ticks(frame):
    fig = figure_for(group_of(frame), method_styles(frame))
    fig.axes[1].xaxis.set_major_locator(FixedLocator(np.linspace(0.8, 2.0, 60)))
    assert overlapping_tick_labels(fig) != []


def test_legend_outside_every_axes(frame, big_fig):
    big_fig.canvas.draw()
    renderer = big_fig.canvas.get_renderer()
    (legend,) = big_fig.legends
    assert len(legend.get_texts()) == 25 + 1 + 2  # methods, reference, budget note
    box = legend.get_window_extent(renderer)
    for ax in big_fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))


def test_only_adaptive_points(tmp_path):
    frame = make_frame(n_methods=6, adaptive_only=True)
    one = group_of(frame)
    paths = plot_runs(one, tmp_path)
    assert len(paths) == 1 and all(p.exists() for p in paths)
    fig = figure_for(group_of(frame), method_styles(frame))
    lines = lines_by_gid(fig.axes[0])
    assert not [gid for gid in lines if gid.endswith("|fixed")]
    assert len([gid for gid in lines if gid.endswith("|adaptive")]) == 6
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "filled, joined: fixed budget" not in legend_texts


def test_mixed_group_and_bad_frames_rejected(frame, tmp_path):
    both = frame[(frame.benchmark == "gqa") & (frame.protocol == "llava15")]
    with pytest.raises(ValueError, match="exactly one"):
        figure_for(both, method_styles(frame))
    with pytest.raises(ValueError, match="lacks columns"):
        plot_runs(frame.drop(columns=["tflops"]), tmp_path)
    bad = frame.copy()
    bad.loc[bad.method_name != "none", "budget"] = "sometimes"
    with pytest.raises(ValueError, match="budget"):
        plot_runs(bad, tmp_path)
    clash = frame.copy()
    clash.loc[clash.model == TINY, "model"] = "llava-hf_llava-1.5-7b-hf"
    with pytest.raises(ValueError, match="file stem"):
        plot_runs(clash, tmp_path)
    assert list(Path(tmp_path).iterdir()) == []
