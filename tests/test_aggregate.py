"""Table writer on fixed records: golden markdown, relative-to-vanilla arithmetic, plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from recomp_eval.aggregate import write_tables
from recomp_eval.records import RunRecord, write_json_atomic

GOLDEN = Path(__file__).parent / "golden" / "accuracy.md"


def make_record(bench: str, method: str, retention: float | None, value: float, tokens: float):
    metric = f"{bench}/accuracy"
    return RunRecord(
        run_key=f"{bench}-{method}-{retention}",
        model={"name": "tiny", "id": "tiny"},
        benchmark={"name": bench, "dataset_id": f"fixture/{bench}", "revision": "x"},
        protocol="llava15",
        method={"name": method, "label": method, "retention": retention, "options": {}},
        metrics={metric: value},
        primary_metric=metric,
        tokens={"mean": tokens, "min": tokens, "max": tokens},
        latency_ms={"prefill": {"median": tokens / 10, "p90": tokens / 9}},
        flops={"prefill_tflops": tokens / 100},
        samples={"evaluated": 10, "skipped": 0},
        reportable=False,
        created="2026-01-01T00:00:00",
    )


def write_sweep(root: Path) -> None:
    records = [
        make_record("gqa", "none", None, 60.0, 576),
        make_record("pope", "none", None, 80.0, 576),
    ]
    for ratio, gqa, pope in [(0.1, 45.0, 72.0), (0.2, 51.0, 76.0), (0.5, 57.0, 80.0)]:
        records.append(make_record("gqa", "recomp", ratio, gqa, 576 * ratio))
        records.append(make_record("pope", "recomp", ratio, pope, 576 * ratio))
    for i, rec in enumerate(records):
        write_json_atomic(root / f"job{i}" / "results.json", rec.to_dict())


def test_tables_from_a_three_ratio_sweep(tmp_path: Path) -> None:
    write_sweep(tmp_path / "runs")
    out = tmp_path / "tables"
    result = write_tables(tmp_path / "runs", out)
    acc = result["accuracy"].set_index(["method", "retention"])
    assert acc.loc[("recomp", "0.1"), "gqa rel%"] == pytest.approx(75.0)
    assert acc.loc[("recomp", "0.1"), "avg rel%"] == pytest.approx((75.0 + 90.0) / 2)
    assert acc.loc[("none", "adaptive"), "avg rel%"] == pytest.approx(100.0)
    assert len(acc) == 4
    for stem in ("accuracy", "efficiency"):
        for ext in ("md", "csv", "tex"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["gqa.png", "pope.png"]
    assert (out / "accuracy.md").read_text() == GOLDEN.read_text()


def test_latest_record_wins_and_empty_root_errors(tmp_path: Path) -> None:
    write_sweep(tmp_path / "runs")
    newer = make_record("gqa", "recomp", 0.1, 50.0, 57.6)
    newer.created = "2026-02-01T00:00:00"
    write_json_atomic(tmp_path / "runs" / "rerun" / "results.json", newer.to_dict())
    acc = write_tables(tmp_path / "runs", tmp_path / "t")["accuracy"]
    row = acc[(acc["method"] == "recomp") & (acc["retention"] == "0.1")]
    assert row["gqa"].item() == 50.0
    with pytest.raises(SystemExit, match=r"no results\.json"):
        write_tables(tmp_path / "empty", tmp_path / "t2")
