"""scripts/bench_compression.py follows the shared benchmark method (smoke run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_interleaved_timings_and_a_sanity_verdict(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_compression.py"), "--smoke",
           "--methods", "random", "pool", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    payload = json.loads((tmp_path / "compression_random_pool.json").read_text())
    assert payload["env"]["machine"]["torch"] and payload["env"]["smoke"]
    assert {c["batch"] for c in payload["sanity"]} == {1, 2}
    assert all(c["verdict"] in ("valid", "not valid") for c in payload["sanity"])
    labels = {r["method"] for r in payload["rows"]}
    assert {"random", "pool", "oracle (release loop, B=1 each)"} <= labels
    raw = payload["raw_ms"]["cpu/B=1"]
    assert len(raw["random"]) == 2 and len(raw["oracle"]) == len(raw["oracle_repeat"]) == 2
    assert "sanity cpu B=1" in (tmp_path / "compression_random_pool.md").read_text()
