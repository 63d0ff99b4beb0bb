"""scripts/compare_runs.py: the regression check of refactors that must not change answers."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import scripts_module


def write(root: Path, name: str, rows: list[dict]) -> None:
    folder = root / "gqa" / "m" / "llava15" / name
    folder.mkdir(parents=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_runs_finds_every_kind_of_difference(tmp_path: Path) -> None:
    compare = scripts_module("compare_runs").compare
    rows = [{"sample_id": "a", "prediction": "cat", "kept_tokens": 58.0, "keep_map": "12"}]
    write(tmp_path / "a", "recomp-paper-adaptive-k1", rows)
    write(tmp_path / "b", "recomp-paper-adaptive-k2", rows)  # same run, other data folder key
    assert compare(tmp_path / "a", tmp_path / "b") == []
    assert any("only in" in p for p in compare(tmp_path / "a", tmp_path / "b", same_keys=True))
    write(tmp_path / "c", "recomp-paper-adaptive-k1", [{**rows[0], "prediction": "dog"}])
    assert compare(tmp_path / "a", tmp_path / "c") == [
        "gqa/m/llava15/recomp-paper-adaptive a: prediction differ"
    ]
    write(tmp_path / "d", "recomp-paper-adaptive-k1", [{**rows[0], "kept_tokens": 57.0}])
    write(tmp_path / "d", "pool-r0.1-k3", rows)
    problems = compare(tmp_path / "a", tmp_path / "d")
    assert "only in" in problems[0] and "kept_tokens differ" in problems[1]
