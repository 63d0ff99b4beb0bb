"""scripts/bench_gpu.py (``make bench-gpu``) in its CPU smoke mode (every part at tiny shapes,
with its sanity verdicts and the fields the docs command reads), its one-line exit without
CUDA, its deadline and per-part limits, the release loop on a device, and
scripts/update_bench_docs.py filling and checking the docs block."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import scripts_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"
PARTS = ("compression", "vision", "prefill", "e2e")
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", **extra}  # fmt: skip
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, float]:
    """One ``--smoke`` run of the script as `make test` runs it (a subprocess: lmms-eval's
    import side effects stay out of this session)."""
    stem = tmp_path_factory.mktemp("bench_gpu") / "bench_gpu"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(stem)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)  # fmt: skip
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench_gpu summary:" in proc.stdout
    return json.loads(stem.with_suffix(".json").read_text()), stem, wall


def test_smoke_writes_every_part_with_sanity_verdicts(smoke) -> None:
    record, stem, wall = smoke
    assert record["schema"] == "bench_gpu/1" and record["smoke"] is True
    assert record["parts_requested"] == list(PARTS) and list(record["parts"]) == list(PARTS)
    for key in ("device_name", "torch", "transformers", "commit", "threads", "cpu"):
        assert key in record["machine"], key
    assert 0 < record["wall_s"] < wall
    docs = scripts_module("update_bench_docs")
    for name in PARTS:
        part = record["parts"][name]
        if name == "e2e" and not HAS_LMMS:
            assert part["status"] == "failed" and "lmms_eval" in part["reason"]
            continue
        assert part["status"] == "done", (name, part.get("reason"), part.get("traceback"))
        assert part["rows"] and part["sanity"] and part["targets"], name
        for check in part["sanity"]:
            assert check["verdict"] in ("valid", "not valid") and isinstance(check["valid"], bool)
            assert check["message"].endswith(check["verdict"])
        assert part["valid"] == all(c["valid"] for c in part["sanity"])
        for target in part["targets"]:
            assert {"name", "batch", "value", "op", "threshold", "met"} <= target.keys()
        for _, key, _ in docs.COLUMNS[name]:  # every field the docs table reads
            assert all(key in row for row in part["rows"]), (name, key)
        assert part["budget_s"] > 0 and part["estimate_gpu_s"] > 0 and part["estimate_basis"]
        assert 0 < part["wall_s"] < part["budget_s"]
    assert stem.with_suffix(".md").read_text() == docs.render_record(record)


def test_smoke_parts_measure_what_they_name(smoke) -> None:
    parts = smoke[0]["parts"]
    comp = {(r["method"], r["batch"]) for r in parts["compression"]["rows"]}
    target = "recomp[official,lof=torch]"
    for b in (1, 2):
        for label in ("none", "recomp[paper]", target, f"{target}#repeat",
                      "release loop (device)", "release loop (CPU)", "CLIP ViT pass"):  # fmt: skip
            assert (label, b) in comp, (label, b)
    loop = next(r for r in parts["compression"]["rows"] if r["method"] == "release loop (CPU)")
    assert loop["x_vs_release_cpu"] == pytest.approx(1.0)
    vision = {(r["case"], r["batch"]) for r in parts["vision"]["rows"]}
    for case in ("vanilla_tower", "none", "rc_paper", "rc_official", "release_recreation"):
        assert (case, 1) in vision and (case, 2) in vision
    assert "vanilla tower vs our none path" in parts["vision"]["sanity"][0]["check"]
    prefill = parts["prefill"]["rows"]
    assert {r["visual_tokens"] for r in prefill} == {576, 288, 144, 58, 29}
    full = next(r for r in prefill if r["case"] == "K=576")
    assert full["speedup"] == 1.0 and full["analytic_speedup"] == 1.0
    analytic = [r["analytic_speedup"] for r in prefill if r["batch"] == 1][:5]  # K = 576 ... 29
    assert analytic == sorted(analytic) and analytic[0] == 1.0 < analytic[-1]
    assert all(r["decode_ms_per_token"] > 0 for r in prefill)
    assert parts["prefill"]["targets"][0]["batch"] == 2  # the smoke's largest batch
    if not HAS_LMMS:
        return
    e2e = parts["e2e"]
    rows = {(r["harness"], r["method"].split()[0], r["batch"]): r for r in e2e["rows"]}
    assert ("lmms-eval llava_hf", "none", 1) in rows
    for method in ("none", "recomp"):
        for b in (1, 16, 32):
            assert ("recomp_llava (ours)", method, b) in rows, (method, b)
    assert ("recomp_llava (ours) again", "none", 16) in rows
    ours = rows[("recomp_llava (ours)", "none", 1)]
    assert ours["identical"], ours  # our none path answers as lmms-eval's llava_hf
    assert e2e["checkpoint"]["text_layers"] == 2 and e2e["checkpoint"]["bytes"] > 0
    assert all(r["model_s"] > 0 and r["samples"] == 2 for r in e2e["rows"])


def test_without_cuda_one_line_error() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=_env(CUDA_VISIBLE_DEVICES=""), cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "CUDA is not available" in lines[0] and "--smoke" in lines[0]
    assert "CUDA build of torch" in lines[0]
    assert time.monotonic() - started < 30


def test_deadline_skips_parts(tmp_path: Path) -> None:
    bg = scripts_module("bench_gpu")
    stem = tmp_path / "bench_gpu"
    assert bg.main(["--smoke", "--budget-s", "0", "--parts", "prefill", "e2e",
                    "--out", str(stem), "--threads", str(torch.get_num_threads())]) == 0  # fmt: skip
    record = json.loads(stem.with_suffix(".json").read_text())
    assert list(record["parts"]) == ["prefill", "e2e"]
    for part in record["parts"].values():
        assert part["status"] == "skipped" and "deadline" in part["reason"]
        assert part["rows"] == [] and part["valid"] is None
    assert "skipped" in stem.with_suffix(".md").read_text()


def test_part_limits_timeout_failure_partial() -> None:
    bg = scripts_module("bench_gpu")
    ctx = bg.Context(bg.parse_args(["--smoke", "--budget-s", "30"]), time.monotonic())
    ctx.budgets = {"slow": 0.2, "broken": 5.0, "short": 5.0}
    record: dict = {"parts": {}}
    handler = signal.getsignal(signal.SIGALRM)

    def slow(ctx, rec):
        rec["rows"].append({"kept": "rows before the limit"})
        time.sleep(10)

    started = time.monotonic()
    part = bg.run_part("slow", slow, ctx, record)
    assert part["status"] == "timed out" and part["rows"] == [{"kept": "rows before the limit"}]
    assert time.monotonic() - started < 2.0  # 1.5x the 0.2 s budget, not the 10 s sleep

    def broken(ctx, rec):
        raise RuntimeError("no kernel image\nsecond line")

    part = bg.run_part("broken", broken, ctx, record)
    assert part["status"] == "failed" and part["reason"] == "RuntimeError: no kernel image"

    def short(ctx, rec):
        assert ctx.left() <= 5.0
        rec["sanity"].append({"valid": True})
        rec["truncated"] = "B >= 8 not run (part budget)"

    part = bg.run_part("short", short, ctx, record)
    assert part["status"] == "partial" and part["valid"] is True
    assert signal.getsignal(signal.SIGALRM) is handler
    assert ctx.left() > 5.0  # the part deadline is the global one again


def test_update_bench_docs_fills_and_checks(smoke, tmp_path: Path) -> None:
    docs = scripts_module("update_bench_docs")
    record, stem, _ = smoke
    results, doc = tmp_path / "gpu", tmp_path / "performance.md"
    results.mkdir()
    shutil.copyfile(ROOT / "docs" / "performance.md", doc)
    original = doc.read_text()
    assert docs.BEGIN in original and docs.END in original
    assert docs.main(["--results", str(results), "--docs", str(doc), "--check"]) == 0
    shutil.copyfile(stem.with_suffix(".json"), results / "bench_gpu.json")
    (results / "other.json").write_text('{"not": "a bench_gpu record"}')
    assert docs.main(["--results", str(results), "--docs", str(doc), "--check"]) == 1
    assert doc.read_text() == original  # --check never writes
    assert docs.main(["--results", str(results), "--docs", str(doc)]) == 0
    filled = doc.read_text()
    block = filled[filled.index(docs.BEGIN) : filled.index(docs.END)]
    assert "Smoke run on CPU" in block and docs.NO_RUN not in block
    for name in PARTS:
        assert docs.PART_TITLES[name] in block
    assert "| method | B | ms median |" in block and "recomp[official,lof=torch]#repeat" in block
    assert "measured / analytic" in block and "sanity, K = 58 prefill timed twice" in block
    head, tail = original.split(docs.BEGIN)[0], original.split(docs.END)[1]
    assert filled.startswith(head) and filled.endswith(tail)  # nothing else in the file moves
    assert docs.main(["--results", str(results), "--docs", str(doc), "--check"]) == 0
    record["parts"]["prefill"]["rows"][0]["speedup"] = 123.0  # a new run: the block is stale
    (results / "bench_gpu.json").write_text(json.dumps(record))
    assert docs.main(["--results", str(results), "--docs", str(doc), "--check"]) == 1
    doc.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench-gpu -->"):
        docs.main(["--results", str(results), "--docs", str(doc)])


def test_committed_docs_block_matches_the_committed_records() -> None:
    """docs/performance.md's block is what update_bench_docs.py makes of results/bench/gpu/."""
    assert scripts_module("update_bench_docs").main(["--check"]) == 0


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_headline_table_puts_each_cpu_figure_beside_the_gpu_ones(tmp_path: Path) -> None:
    heads = scripts_module("bench_headlines")
    machine = {"machine": {"commit": "abcdef0123"}}
    _write(tmp_path / "compression.json", {"env": machine, "rows": [
        {"method": "recomp[official,lof=torch]", "batch": 1, "x_faster_than_oracle": 3.0},
        {"method": "recomp[official,lof=torch]", "batch": 8, "x_faster_than_oracle": 4.5}]})  # fmt: skip
    _write(tmp_path / "vision_path.json", {"meta": {"commit": "1234567"}, "rows": [
        {"batch": 1, "case": "none", "ms": 100.0},
        {"batch": 1, "case": "rc_paper", "ms": 90.0, "speedup_vs_release": 1.9}]})  # fmt: skip
    _write(tmp_path / "peer" / "peer.json", {"results": [
        {"harness": "lmms-eval llava_hf", "batch": 1, "speedup": 1.0},
        {"harness": "recomp_llava (ours)", "batch": 16, "speedup": 0.85}]})  # fmt: skip
    gpu = {"schema": "bench_gpu/1", "smoke": False, "parts": {
        "compression": {"rows": [{"method": "recomp[official,lof=torch]", "batch": 8,
                                  "x_vs_release_device": 31.0}]},
        "e2e": {"rows": [{"harness": "recomp_llava (ours)", "method": "none", "batch": 16,
                          "speedup_vs_llava_hf": 5.5}]}}}  # fmt: skip
    smoke = {**gpu, "smoke": True}
    lines = heads.side_by_side(tmp_path, [("a.json", gpu), ("b_smoke.json", smoke)])
    assert lines[0].endswith("| GPU `a.json` |")  # the smoke record is no GPU column
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    rc = rows["RC `official` (torch LOF) vs the release loop, B = 8"]
    assert rc[2:] == ["4.50", "`results/bench/compression.json` @ abcdef0", "31.00 |"]
    assert rows["vision path, RC `paper` / our `none`, B = 1"][2] == "0.90"  # 90 / 100
    e2e = rows["end to end, ours `none` at batch 16 vs `llava_hf` at batch 1"]
    assert e2e[2] == "0.85" and e2e[4] == "5.50 |"
    prefill = rows["prefill, 58 vs 576 visual tokens, measured / analytic, B = 1"]
    assert prefill[2:] == ["not measured", "`results/bench/prefill_cpu.json`", "not measured |"]
    assert heads.side_by_side(tmp_path, [])[2].endswith("| not run |")


def test_headlines_find_their_fields_in_a_bench_gpu_record(smoke) -> None:
    """The GPU lookups name fields bench_gpu.py writes: a renamed field fails here."""
    heads = scripts_module("bench_headlines")
    record, _, _ = smoke
    batch1 = [h for h in heads.HEADLINES if "B = 1" in h.figure]
    assert len(batch1) == 3 and all(h.gpu(record) is not None for h in batch1)
    assert heads._find(heads._rows(record, "compression"), "x_vs_release_device",
                       method=heads.RC_TORCH, batch=2) is not None  # smoke runs B = 1, 2  # fmt: skip
    if HAS_LMMS:
        e2e = [h for h in heads.HEADLINES if h.figure.startswith("end to end")]
        assert all(h.gpu(record) is not None for h in e2e)
