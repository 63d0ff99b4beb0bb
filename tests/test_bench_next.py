"""The LLaVA-NeXT modes of scripts/bench_vision_path.py and scripts/bench_prefill.py (``--next``):
smoke runs at tiny shapes, the record's fields, the measurement's sanity check and the packing
of per-crop outputs in NeXT order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import scripts_module


def run_main(module, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    threads = str(torch.get_num_threads())  # the scripts pin threads: keep the session's count
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv, "--threads", threads])
    module.main()


def test_agreement_flags_series_that_disagree() -> None:
    agreement = scripts_module("bench_prefill").agreement
    bad = agreement([2152.0, 2160.0, 2149.0], [1607.0, 1611.0, 1600.0], tolerance=0.10)
    assert bad["valid"] is False and bad["verdict"] == "not valid"
    assert bad["ratio"] == pytest.approx(2152.0 / 1607.0)
    assert "not valid" in bad["message"]
    good = agreement([1610.0, 1650.0, 1590.0], [1607.0, 1611.0, 1600.0], tolerance=0.10)
    assert good["valid"] is True and good["verdict"] == "valid"
    assert agreement([105.0], [100.0], tolerance=0.05)["valid"] is True  # the edge is inside
    assert agreement([106.0], [100.0], tolerance=0.05)["valid"] is False
    with pytest.raises(ValueError):
        agreement([1.0], [1.0], tolerance=-0.1)


def test_summarize_and_shuffled_rounds() -> None:
    bp = scripts_module("bench_prefill")
    st = bp.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st["min"], st["median"], st["n"]) == (1.0, 3.0, 5)
    assert 4.0 < st["p90"] <= 5.0
    assert bp.summarize([7.0])["p90"] == 7.0
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    timed = bp.time_interleaved(cases, warmup=1, reps=3, seed=1)
    assert calls.count("a") == 4 and len(calls) == 16  # every case in the warm-up round too
    assert all(len(v) == 3 for v in timed["ms"].values())
    assert all(len(v) == 1 for v in timed["warmup_ms"].values())
    assert all(sorted(o) == list("abcd") for o in timed["orders"])
    assert len({tuple(o) for o in timed["orders"]}) > 1  # reshuffled per round


def test_vision_path_next_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vp = scripts_module("bench_vision_path")
    out = tmp_path / "vision_next"
    run_main(vp, monkeypatch, "--next", "--smoke", "--device", "cpu", "--batch-sizes", "1",
             "--reps", "1", "--warmup", "1", "--out", str(out))  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    meta, rows, raw = record["meta"], record["rows"], record["raw"]
    for key in ("commit", "torch", "transformers", "threads", "cpu", "platform", "reps",
                "warmup", "order", "layout", "target_met"):  # fmt: skip
        assert key in meta, key
    sanity = meta["sanity"]["1"]
    assert sanity["verdict"] in ("valid", "not valid") and isinstance(sanity["valid"], bool)
    assert meta["measurement_valid"] == sanity["valid"]
    assert meta["layout"]["crops"] == 5
    assert {r["case"] for r in rows} == {"vanilla_tower", "none", "rc_paper"}
    for r in rows:
        assert r["crops"] == 5
        for key in ("ms_min", "ms_median", "ms_p90", "x_vanilla", "x_none"):
            assert r[key] > 0, key
    assert all(len(v) == 1 for v in raw[0]["ms"].values())
    assert all(len(v) == 1 for v in raw[0]["warmup_ms"].values())
    check = meta["checks"]["1"]
    assert check["none_vs_stock_max_abs_diff"] < 1e-4  # our none path packs as stock does
    assert (
        check["none_packed_rows"] == check["stock_packed_rows"] == [meta["layout"]["packed_rows"]]
    )
    per_crop = 7  # budget_from_ratio(64 / 576, 64)
    rc_rows = check["rc_packed_rows"][0]
    assert 5 * per_crop <= rc_rows <= 5 * per_crop + meta["layout"]["newlines"]
    assert "Sanity" in out.with_suffix(".md").read_text()


def test_prefill_next_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bp = scripts_module("bench_prefill")
    stem = tmp_path / "prefill_next"
    run_main(bp, monkeypatch, "--next", "--smoke", "--device", "cpu", "--batch-sizes", "1",
             "--reps", "1", "--warmup", "0", "--out-stem", str(stem))  # fmt: skip
    record = json.loads(stem.with_suffix(".json").read_text())
    meta, rows = record["meta"], record["rows"]
    # the real packed count of a 672 x 672 image on the llava-v1.6 pinpoints
    assert (meta["packed_full"], meta["newlines_full"], meta["crops"]) == (2928, 48, 5)
    assert meta["visual_tokens"]["rc_per_crop"] == 5 * 64 + 48
    assert meta["visual_tokens"]["rc_per_crop_no_newlines"] == 320
    assert meta["sanity"]["1"]["verdict"] in ("valid", "not valid")
    assert isinstance(meta["measurement_valid"], bool)
    for key in ("commit", "torch", "transformers", "threads", "target_met"):
        assert key in meta, key
    full = next(r for r in rows if r["case"] == "full")
    assert full["speedup"] == 1.0 and full["analytic_speedup"] == 1.0
    for r in rows:
        assert {"ms_min", "ms_median", "ms_p90", "efficiency"} <= r.keys()
    assert "Sanity" in stem.with_suffix(".md").read_text()


def test_pack_compressed_places_rows_where_pack_puts_patches() -> None:
    """Every patch kept (in a shuffled output order) -> exactly stock packing; a summary row
    without a source goes after the packed rows."""
    from recomp_eval.methods.base import Compressed
    from recomp_eval.models.llava_next.packing import crops_per_image, pack

    vp = scripts_module("bench_vision_path")
    torch.manual_seed(0)
    model, _, _ = vp.build_next(vp.SMOKE_NEXT, torch.float32, "cpu")
    size = list(vp.SMOKE_NEXT.image)
    k = crops_per_image(model, [size])
    n, e = 64, vp.SMOKE_NEXT.llm_width
    feats = torch.randn(k[0], n, e)
    perm = torch.stack([torch.randperm(n) for _ in range(k[0])])  # [K,N] output order
    rows = [torch.cat([feats[c, perm[c]], torch.full((1, e), 7.0)]) for c in range(k[0])]
    source = torch.cat([perm, torch.full((k[0], 1), -1)], dim=1)  # the last row: no source
    compressed = Compressed(features=torch.zeros(k[0], n + 1, 1),
                            lengths=torch.full((k[0],), n + 1), source=source,
                            role=torch.zeros(k[0], n + 1, dtype=torch.int8),
                            members=torch.zeros(k[0], n + 1, n, dtype=torch.bool))  # fmt: skip
    out = vp.pack_compressed(model, compressed, rows, [size], k)
    expect = pack(model, [feats], [size])[0]
    assert out[0].shape[0] == expect.shape[0] + k[0]
    torch.testing.assert_close(out[0][: expect.shape[0]], expect)
    assert bool((out[0][expect.shape[0] :] == 7.0).all())
