"""The shared measurement method of the benchmark scripts (recomp_eval.efficiency.benchmark)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from recomp_eval.efficiency import benchmark as bm


def test_summarize_matches_numpy():
    rng = np.random.default_rng(0)
    ms = rng.gamma(4.0, 3.0, size=37).tolist()
    s = bm.summarize(ms)
    assert s["min"] == min(ms) and s["n"] == 37
    assert s["median"] == pytest.approx(np.median(ms))
    assert s["p90"] == pytest.approx(np.percentile(ms, 90))  # linear interpolation, as numpy
    with pytest.raises(ValueError):
        bm.summarize([])


def test_agreement_flags_a_measurement_that_is_not_valid():
    same = bm.agreement([10.0, 10.2, 9.9], [10.1, 10.0, 10.3], tolerance=0.05)
    assert same["valid"] and same["verdict"] == "valid"
    off = bm.agreement([21.5, 21.0, 22.0], [16.1, 16.0, 16.3], tolerance=0.10)
    assert not off["valid"] and "not valid" in off["message"]
    assert off["ratio"] == pytest.approx(21.5 / 16.1)


def test_cases_are_interleaved_in_a_shuffled_order_with_warmup():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    out = bm.time_interleaved(cases, warmup=2, reps=5, seed=3)
    assert len(calls) == 4 * 7
    assert all(len(v) == 5 for v in out["ms"].values())
    assert all(len(v) == 2 for v in out["warmup_ms"].values())
    assert len({tuple(o) for o in out["orders"]}) > 1  # the order changes between rounds
    for r, order in enumerate(out["orders"]):
        assert sorted(order) == list("abcd") and calls[4 * r : 4 * r + 4] == order


def test_a_slower_case_measures_slower_and_quiet_reps_keep_idle_ones():
    cases = {"sleep": lambda: time.sleep(0.004), "busy": lambda: sum(range(20000))}
    out = bm.time_interleaved(cases, warmup=1, reps=4)
    assert bm.summarize(out["ms"]["sleep"])["min"] >= 3.5
    quiet = bm.quiet_reps(out, threads=1, frac=0.5)
    assert quiet["sleep"] == []  # sleeping uses no CPU: never "had its cores"


def test_machine_info_and_results_files(tmp_path):
    info = bm.machine_info("cpu", scripts=("scripts/bench_prefill.py",))
    assert info["torch"] and info["threads"] >= 1 and "scripts_modified" in info
    assert len(info["commit"]) in (0, 40)
    md = bm.markdown_table(["case", "ms"], [["a", 1.23456], ["b", 0.5]])
    assert "| a | 1.23 |" in md and "| b | 0.500 |" in md
    j, m = bm.write_results(tmp_path / "sub" / "x", {"machine": info}, md)
    assert json.loads(j.read_text())["machine"]["torch"] == info["torch"]
    assert m.read_text() == md


def test_sanity_line_reports_seconds_ratio_and_verdict() -> None:
    line = bm.sanity_line(
        bm.agreement([12_000.0, 13_000.0], [10_000.0, 10_000.0], 0.10), "evaluation"
    )
    assert line == ("medians 12.5 vs 10.0 s of evaluation (ratio 1.250, tolerance 10%): "
                    "measurement not valid")  # fmt: skip
