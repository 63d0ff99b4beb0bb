"""Tables from run folders: explicit selection, no silent mixing, paired % of none, formats.

Run folders are written here with known answers (results.json of the current schema plus
samples.jsonl), so every number in the tables can be computed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recomp_eval.aggregate import main, write_tables
from recomp_eval.metrics import score
from recomp_eval.metrics.bootstrap import metric_ci
from recomp_eval.records import RunRecord, stable_hash, write_json_atomic
from recomp_eval.report.runs import TableInputError

CONTEXT = {"checkpoint": "ckpt0", "data": "data0"}


def gqa_rows(n: int, correct: int, offset: int = 0) -> list[dict]:
    """``n`` GQA rows (ids offset..offset+n-1), the first ``correct`` of them right."""
    return [
        {"sample_id": f"q{offset + i}", "question": "what?", "answers": ["cat"],
         "meta": {}, "prediction": "cat" if i < correct else "dog", "kept_tokens": 1.0}
        for i in range(n)
    ]  # fmt: skip


def write_run(
    root: Path,
    name: str,
    method: str,
    retention: float | None,
    rows: list[dict],
    label: str | None = None,
    limit: int | None = None,
    tokens: float = 576.0,
    contents: dict | None = None,
    experiments: tuple[str, ...] = ("main",),
    bench: str = "gqa",
    extra_metrics: dict | None = None,
    tflops: float = 1.5,
) -> Path:
    contents = contents or CONTEXT
    identity = {"method": method, "retention": retention, "limit": limit, "contents": contents}
    pairing = stable_hash({"contents": contents, "bench": bench})
    context = stable_hash({"contents": contents, "bench": bench, "limit": limit})
    metrics = score(bench, rows, "llava15")
    metrics.update(extra_metrics or {})
    record = RunRecord(
        run_key=stable_hash(identity),
        model={"name": "m7b", "id": "org/m7b"},
        benchmark={"name": bench},
        protocol="llava15",
        method={"name": method, "label": label or method, "retention": retention},
        metrics=metrics,
        primary_metric=f"{bench}/accuracy_llava",
        tokens={"mean": tokens},
        latency_ms={"prefill": {"median": tokens / 10}, "decode_per_token": {"median": 20.0}},
        flops={"prefill_tflops": tflops * tokens / 576},
        samples={"evaluated": len(rows), "skipped": 1},
        reportable=False,
        peak_memory_mb={"total": 1000.0},
        identity={
            "pairing_key": pairing,
            "context_key": context,
            "contents": contents,
            "limit": limit,
        },
        experiments=list(experiments),
    )
    folder = root / bench / name
    write_json_atomic(folder / "results.json", record.to_dict())
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sweep(root: Path) -> None:
    write_run(root, "none", "none", None, gqa_rows(10, 6))
    write_run(root, "rc01", "recomp", 0.1, gqa_rows(10, 5), "recomp[paper]", tokens=58)
    write_run(root, "rc02", "recomp", 0.2, gqa_rows(10, 6), "recomp[paper]", tokens=115)
    write_run(root, "fz01", "fastervlm", 0.1, gqa_rows(10, 4), tokens=58)


def row(table, method: str, retention: str) -> dict:
    (found,) = [r for r in table.rows if r["method"] == method and r["retention"] == retention]
    return found


def test_values_relative_to_none_and_formats(tmp_path: Path) -> None:
    sweep(tmp_path / "runs")
    out = tmp_path / "tables"
    result = write_tables(tmp_path / "runs", out, n_boot=200)
    acc = result["accuracy"]
    assert row(acc, "recomp[paper]", "0.1")["gqa"] == pytest.approx(50.0)
    assert row(acc, "recomp[paper]", "0.1")["avg_rel"] == pytest.approx(100 * 5 / 6)
    assert row(acc, "none", "adaptive")["avg_rel"] == pytest.approx(100.0)
    md = (out / "accuracy.md").read_text()
    assert "| recomp[paper] | 0.1 | 58.0 | 50.0 | 83.3 |" in md  # one decimal, percent
    assert "GQA (n=10)" in md  # n in the header when every run of the column has it
    assert "| recomp[paper] | 0.2 | 115.0 | **60.0** | **100.0** |" in md  # best compressed
    assert "| none | adaptive | 576.0 | 60.0 | 100.0 |" in md  # the baseline is not marked
    tex = (out / "accuracy.tex").read_text()
    assert r"\caption{Accuracy by method" in tex and r"\label{tab:accuracy}" in tex
    assert r"\textbf{60.0}" in tex and r"\toprule" in tex
    csv_text = (out / "accuracy.csv").read_text()
    assert "83.33333" in csv_text  # full precision in CSV
    eff = (out / "efficiency.md").read_text()
    assert "prefill TFLOPs" in eff and "| 0.151 |" in eff  # 1.5 * 58 / 576
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["gqa-m7b-llava15.png"]


def test_confidence_intervals_and_paired_difference(tmp_path: Path) -> None:
    sweep(tmp_path / "runs")
    result = write_tables(tmp_path / "runs", tmp_path / "t", n_boot=200)
    (scored,) = [s for s in result["scored"] if s.run.label == "fastervlm"]
    value, low, high = metric_ci("gqa", "llava15", gqa_rows(10, 4), "gqa/accuracy_llava",
                                 n_boot=200)  # fmt: skip
    assert (scored.value, scored.ci_low, scored.ci_high) == pytest.approx(
        (100 * value, 100 * low, 100 * high)
    )
    assert scored.diff == pytest.approx(-20.0) and scored.diff_low <= -20.0 <= scored.diff_high
    long = (tmp_path / "t" / "accuracy_long.md").read_text()
    assert "| 40.0 | [" in long and "| -20.0 |" in long and "paired n" in long


def test_mixed_sample_sets_in_one_cell_are_an_error(tmp_path: Path) -> None:
    sweep(tmp_path / "runs")
    quick = write_run(tmp_path / "runs", "none_quick", "none", None, gqa_rows(3, 3), limit=3)
    with pytest.raises(TableInputError) as err:
        write_tables(tmp_path / "runs", tmp_path / "t", plots=False)
    text = str(err.value)
    assert "\n" not in text and "n 10 vs 3" in text and str(quick) in text
    assert "--on-conflict rows" in text


def test_mixed_sample_sets_as_separate_rows(tmp_path: Path) -> None:
    sweep(tmp_path / "runs")
    write_run(tmp_path / "runs", "none_quick", "none", None, gqa_rows(3, 3), limit=3)
    result = write_tables(tmp_path / "runs", tmp_path / "t", on_conflict="rows", plots=False)
    sets = {r["set"] for r in result["accuracy"].rows if r["method"] == "none"}
    assert sets == {"limit=None", "limit=3"}
    # the compressed runs are still compared with the none run of their own sample set
    assert row_with_set(result["accuracy"], "recomp[paper]", "0.1")["avg_rel"] == pytest.approx(
        100 * 5 / 6
    )


def row_with_set(table, method: str, retention: str) -> dict:
    (found,) = [r for r in table.rows if r["method"] == method and r["retention"] == retention]
    return found


def test_percent_of_none_uses_only_the_paired_samples(tmp_path: Path) -> None:
    """A full compressed run against a quick limit=4 baseline: compared on those 4 samples."""
    root = tmp_path / "runs"
    write_run(root, "none", "none", None, gqa_rows(4, 2), limit=4)
    # samples q0..q9; on the paired q0..q3 it gets 3 right (q0, q1, q2), on all 10 it gets 3
    write_run(root, "rc", "recomp", 0.1, gqa_rows(10, 3), "recomp[paper]", tokens=58)
    result = write_tables(root, tmp_path / "t", plots=False)
    (scored,) = [s for s in result["scored"] if s.run.method_name == "recomp"]
    assert scored.paired_n == 4 and scored.partial
    assert scored.value == pytest.approx(30.0)  # its own value on all of its samples
    assert scored.rel == pytest.approx(100 * (3 / 4) / (2 / 4))  # on the paired samples only
    assert "fewer paired samples" in (tmp_path / "t" / "accuracy.md").read_text()


def test_no_reference_across_different_contents(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "none", "none", None, gqa_rows(10, 6), contents={"checkpoint": "other"})
    write_run(root, "rc", "recomp", 0.1, gqa_rows(10, 5), "recomp[paper]")
    result = write_tables(root, tmp_path / "t", plots=False)
    assert math.isnan(row(result["accuracy"], "recomp[paper]", "0.1")["avg_rel"])


def test_selection_superseded_schema_experiment_glob_and_copies(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    sweep(root)
    stale = write_run(root, "rc01_old", "recomp", 0.1, gqa_rows(10, 1), "recomp[paper]",
                      contents={"checkpoint": "old", "data": "data0"})  # fmt: skip
    (stale / "superseded.json").write_text(json.dumps({"by": "rc01", "changes": ["x"]}))
    old = root / "gqa" / "schema1"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"schema": 1}))
    copy = root / "copy" / "rc01"
    copy.parent.mkdir()
    import shutil

    shutil.copytree(root / "gqa" / "rc01", copy)  # the same run twice counts once
    write_run(root, "other_exp", "pool", 0.1, gqa_rows(10, 2), experiments=("ablation",))
    result = write_tables(root, tmp_path / "t", plots=False)
    methods = sorted({r["method"] for r in result["accuracy"].rows})
    assert methods == ["fastervlm", "none", "pool", "recomp[paper]"]
    assert row(result["accuracy"], "recomp[paper]", "0.1")["gqa"] == pytest.approx(50.0)
    notes = " ".join(result["accuracy"].notes)
    assert "superseded" in notes and "schema 1" in notes
    only = write_tables(root, tmp_path / "t2", experiment="main", plots=False)["accuracy"]
    assert "pool" not in {r["method"] for r in only.rows}
    with pytest.raises(TableInputError, match="different runs"):
        write_tables(root, tmp_path / "t3", include_superseded=True, plots=False)
    globbed = write_tables(None, tmp_path / "t4", pattern=str(root / "gqa" / "rc0*"), plots=False)
    assert {r["retention"] for r in globbed["accuracy"].rows} == {"0.1", "0.2"}


def test_small_models_get_gflops_and_slices_split(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    slices = {"gqa/slice/size=small/accuracy_llava": 0.5, "gqa/slice/size=small/n": 4.0,
              "gqa/slice/size=large/accuracy_llava": 0.75, "gqa/slice/size=large/n": 6.0,
              "gqa/slice/family=count/accuracy_llava": 0.2, "gqa/slice/family=count/n": 5.0}  # fmt: skip
    write_run(root, "none", "none", None, gqa_rows(10, 6), tflops=0.004, extra_metrics=slices)
    write_run(root, "rc", "recomp", 0.1, gqa_rows(10, 5), "recomp[paper]", tokens=58,
              tflops=0.004, extra_metrics=slices)  # fmt: skip
    result = write_tables(root, tmp_path / "t", plots=False)
    eff = (tmp_path / "t" / "efficiency.md").read_text()
    assert "prefill GFLOPs" in eff and "| 0.403 |" in eff and "| 4 |" in eff
    names = sorted(t.name for t in result["slices"])
    assert names == ["slices_gqa_family", "slices_gqa_size"]
    size = (tmp_path / "t" / "slices_gqa_size.md").read_text()
    assert "size=large (n=6)" in size and "size=small (n=4)" in size and "75.0" in size
    assert (tmp_path / "t" / "slices.md").is_file()


def test_cli_conflict_is_one_line(tmp_path: Path, capsys) -> None:
    sweep(tmp_path / "runs")
    write_run(tmp_path / "runs", "none_quick", "none", None, gqa_rows(3, 3), limit=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--no-plots"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "different runs" in err
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")])
    assert "is not a folder" in capsys.readouterr().err
