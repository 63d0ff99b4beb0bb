"""scripts/bench_peer.py follows the shared benchmark method: every model loaded once, whole
evaluations as interleaved cases, lmms-eval's llava_hf timed twice as the sanity check, and
predictions compared in every evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scripts_module

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return scripts_module("bench_peer")


def evaluation(seconds: float, answers: dict[int, str]) -> dict:
    return {"seconds": seconds, "answers": dict(answers)}


def test_ratios_from_medians_and_predictions_checked_in_every_evaluation():
    bench = load_script()
    ref = {0: "yes", 1: "no", 2: "yes", 3: "no"}
    wrong = {**ref, 3: "yes"}
    extra = {
        "llava_hf": [evaluation(10.0, ref), evaluation(11.0, ref), evaluation(30.0, ref)],
        "ours_b8": [evaluation(5.0, ref), evaluation(4.0, ref), evaluation(6.0, ref)],
        "ours_b1": [evaluation(9.0, ref), evaluation(9.0, wrong), evaluation(9.0, ref)],
        "llava_hf_repeat": [evaluation(10.5, ref), evaluation(11.5, ref), evaluation(10.0, ref)],
    }
    out = bench.summarize_cases(extra, {"llava_hf": 1, "ours_b8": 8, "ours_b1": 1}, 0.10)
    rows = {r["case"]: r for r in out["results"]}
    assert set(rows) == {"llava_hf", "ours_b8", "ours_b1"}  # the repeat is not a row
    assert rows["llava_hf"]["seconds"]["median"] == pytest.approx(11.0)
    assert rows["ours_b8"]["speedup"] == pytest.approx(11.0 / 5.0)  # the 30 s outlier ignored
    assert rows["ours_b8"]["identical"] and not rows["ours_b1"]["identical"]
    assert rows["ours_b1"]["identical_count"] == 3  # the worst evaluation counts
    assert not out["predictions_identical"]
    assert out["sanity"]["valid"] and out["sanity"]["ratio"] == pytest.approx(10.5 / 11.0)
    extra["llava_hf_repeat"] = [evaluation(20.0, ref)] * 3
    assert not bench.summarize_cases(extra, {"llava_hf": 1, "ours_b8": 8, "ours_b1": 1},
                                     0.10)["sanity"]["valid"]  # fmt: skip


def test_smoke_run_against_lmms_evals_llava_hf(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_peer.py"),
        "--limit",
        "6",
        "--batch-sizes",
        "1",
        "4",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
    ]  # synth-llava
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    report = json.loads((tmp_path / "peer.json").read_text())
    assert report["machine"]["torch"] and len(report["orders"]) == 1
    assert sorted(report["orders"][0]) == ["llava_hf", "llava_hf_repeat", "ours_b1", "ours_b4"]
    assert [r["samples"] for r in report["results"]] == [6, 6, 6]
    assert report["predictions_identical"], report["results"]
    assert report["sanity"]["verdict"] in ("valid", "not valid")
    assert "Sanity (llava_hf timed as two cases)" in (tmp_path / "peer.md").read_text()
