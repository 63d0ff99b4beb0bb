"""scripts/bench_scaling.py follows the shared benchmark method: whole launches as interleaved
cases, statistics per world size, and a repeated first world size as its sanity check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scripts_module

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return scripts_module("bench_scaling")


def launch(nproc: int, span: float, samples: int = 300) -> dict:
    return {"nproc": nproc, "samples": samples, "generation_s": span,
            "samples_per_s": samples / span, "wall_s": span + 10.0, "devices": ["cpu"]}  # fmt: skip


def test_case_labels_repeat_the_first_world_size():
    labels = load_script().case_labels([1, 2, 4])
    assert labels == {"world1": 1, "world2": 2, "world4": 4, "world1_repeat": 1}


def test_speedups_come_from_medians_and_the_repeat_decides_validity():
    bench = load_script()
    launches = {
        "world1": [launch(1, 60.0), launch(1, 58.0), launch(1, 90.0)],  # median 60 s
        "world1_repeat": [launch(1, 59.0), launch(1, 61.0), launch(1, 62.0)],
        "world2": [launch(2, 30.0), launch(2, 31.0), launch(2, 29.0)],  # median 30 s
    }
    out = bench.aggregate([1, 2], launches, tolerance=0.10)
    one, two = out["results"]
    assert one["launches"] == 3 and one["generation_s"]["median"] == pytest.approx(60.0)
    assert one["generation_s"]["min"] == pytest.approx(58.0)
    assert two["speedup"] == pytest.approx((300 / 30) / (300 / 60))  # 2.00x, the outlier ignored
    assert out["sanity"]["valid"] and out["sanity"]["ratio"] == pytest.approx(61.0 / 60.0)
    launches["world1_repeat"] = [launch(1, 80.0)] * 3
    assert not bench.aggregate([1, 2], launches, tolerance=0.10)["sanity"]["valid"]


@pytest.mark.slow  # two torchrun launches, about 25 s; the logic above is in `make test`
def test_smoke_run_interleaves_launches_and_reports_a_verdict(tmp_path):
    from recomp_eval.synth.writers import write_benchmark

    write_benchmark("pope", tmp_path / "synth", n_images=2)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_scaling.py"), "--model", "tiny",
           "--benchmark", "pope", "--data", str(tmp_path / "synth" / "pope"), "--limit", "4",
           "--batch-size", "4", "--nprocs", "1", "--rounds", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    report = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert report["machine"]["torch"] and len(report["orders"]) == 1
    assert sorted(report["orders"][0]) == ["world1", "world1_repeat"]
    assert report["results"][0]["samples"] == 8  # 4 questions x 2 runs
    assert report["sanity"]["verdict"] in ("valid", "not valid")
    assert not list((tmp_path / "out").glob("world1*"))  # launch folders are not left behind
    assert "Sanity (1 process(es)" in (tmp_path / "out" / "scaling.md").read_text()


@pytest.mark.parametrize("script", ["bench_scaling.py", "bench_peer.py"])
@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--tolerance", "-0.1"]])
def test_bad_rounds_or_tolerance_is_one_line_before_any_run(script, bad, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / script), *bad, "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "expected at least 1 round" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was launched or written
