"""scripts/bench_qwen.py: a smoke run of its three parts (score-block recompute against the
tower, prefill at 10 %, grouping by grid against one call per image) at the tiny checkpoint's
shapes, the record's fields and sanity results, and the pieces it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import scripts_module

ARGS = ("--smoke", "--device", "cpu", "--batch-sizes", "1", "8", "--warmup", "1", "--reps", "2",
        "--big-batch-reps", "1", "--method-warmup", "1",
        "--method-reps", "2")  # fmt: skip


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    bq = scripts_module("bench_qwen")
    threads = torch.get_num_threads()  # the script pins threads: restore the session's count
    stem = tmp_path_factory.mktemp("bench_qwen") / "qwen"
    try:
        bq.main([*ARGS, "--threads", str(threads), "--out-stem", str(stem)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(stem.with_suffix(".json").read_text()), stem


def _valid_sanity(sanity: dict) -> None:
    assert sanity, "no sanity check recorded"
    for check in sanity.values():
        assert check["verdict"] in ("valid", "not valid") and isinstance(check["valid"], bool)
        assert check["median_a_ms"] > 0 and check["median_b_ms"] > 0


def test_meta_records_machine_settings_and_validity(record) -> None:
    rec, stem = record
    meta = rec["meta"]
    for key in ("commit", "torch", "transformers", "threads", "cpu", "platform", "loadavg",
                "loadavg_end", "vision_depth", "full_vision_depth", "text_layers",
                "full_text_layers", "fullatt_cut", "warmup", "reps", "order", "wall_s"):  # fmt: skip
        assert key in meta, key
    assert meta["smoke"] is True and meta["shapes"] == "tiny_qwen"
    assert meta["vision_depth"] == 4 and meta["fullatt_cut"] == [1, 3]
    assert set(rec["sanity"]) == {f"{p}:{k}" for p in ("tower", "prefill", "grouping")
                                  for k in rec[p]["sanity"]}  # fmt: skip
    assert rec["measurement_valid"] == all(v["valid"] for v in rec["sanity"].values())
    assert isinstance(rec["measurement_valid_quiet_reps"], bool)
    md = stem.with_suffix(".md").read_text()
    for part in ("## 1.", "## 2.", "## 3.", "## Conclusions", "Sanity"):
        assert part in md, part


def test_tower_part(record) -> None:
    tower = record[0]["tower"]
    assert tower["score_block"] == 3  # the tiny tower's last full-attention block
    assert tower["checks"]["signals_finite"] and tower["checks"]["merged_finite"]
    assert tower["checks"]["received_sum_per_image"] == pytest.approx(1.0, abs=1e-4)
    assert [r["grid_thw"] for r in tower["rows"]] == [[1, 8, 8], [1, 8, 12]]
    for r in tower["rows"]:
        assert r["merged_tokens"] == r["patches"] // 4
        for key in ("plain_ms", "plain_repeat_ms", "signals_ms", "recompute_only_ms"):
            assert r[key]["n"] == 2 and r[key]["median"] > 0, key
        assert len(r["block_ms"]) == 4 and 1 <= r["block_reps_used"] <= 2  # hooks, per rep
        assert (
            set(r["quiet_median_ms"])
            == set(r["quiet_n"])
            == {"plain", "plain_repeat", "signals", "recompute_only"}
        )
        assert r["plain_ms_full_depth_derived"] > 0
        assert 0 < r["analytic"]["recompute_pct_full_depth"] <= r["analytic"]["recompute_pct_cut"]
    _valid_sanity(tower["sanity"])
    assert set(tower["quiet_sanity"]) == set(tower["sanity"])
    assert all(len(x) == 4 for x in tower["raw"]["extra"]["112x112/plain_repeat"])
    assert set(tower["raw"]["ms"]) == {f"{s}/{c}" for s in ("112x112", "168x112")
                                       for c in ("plain", "plain_repeat", "signals",
                                                 "recompute_only")}  # fmt: skip


def test_prefill_part(record) -> None:
    prefill = record[0]["prefill"]
    assert prefill["text_tokens"] == 40
    assert {(r["batch"], tuple(r["size_wh"])) for r in prefill["rows"]} == {
        (b, s) for b in (1, 8) for s in ((112, 112), (168, 112))
    }
    for r in prefill["rows"]:
        assert r["kept_tokens"] == max(1, round(0.1 * r["image_tokens"]))
        assert r["seq_len_full"] == 40 + r["image_tokens"]
        assert r["analytic_speedup"] > 1 and r["speedup"] > 0
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["analytic_speedup"])
    _valid_sanity(prefill["sanity"])
    assert len(prefill["sanity"]) == 4


def test_grouping_part(record) -> None:
    grouping = record[0]["grouping"]
    assert len(grouping["grids_thw"]) == 8 and 3 <= grouping["distinct_grids"] <= 4
    for r in grouping["rows"]:
        assert r["method"] in ("divprune", "prumerge")
        assert r["faster"] in ("grouped", "per_sample", "tie")
        assert r["calls_grouped"] == grouping["distinct_grids"] and r["calls_per_sample"] == 8
    for check in grouping["checks"].values():
        assert check["outputs_equal"]  # one call per image keeps what the grouped call keeps
    _valid_sanity(grouping["sanity"])


def test_cut_config_keeps_the_block_pattern() -> None:
    bq = scripts_module("bench_qwen")
    raw = bq.real_config_dict()
    cut = bq.cut_config(raw, 8, 2, 1024)
    assert cut["vision_config"]["depth"] == 8
    assert cut["vision_config"]["fullatt_block_indexes"] == [7]
    assert cut["num_hidden_layers"] == 2 and cut["vocab_size"] == 1024
    assert 1024 - 7 <= cut["image_token_id"] < 1024
    assert raw["vision_config"]["depth"] == 32  # the source dict is untouched
    with pytest.raises(ValueError, match="full-attention"):
        bq.cut_config(raw, 4, 2, None)


def test_real_grids_come_from_the_checkpoint_processor() -> None:
    bq = scripts_module("bench_qwen")
    proc = bq.image_processor(smoke=False)
    _, grids = bq.preprocess(proc, bq.images_of([(448, 448), (644, 476)]))
    assert grids == [(1, 32, 32), (1, 34, 46)]  # 256 and 391 merged tokens


def test_faster_calls_a_tie_within_the_noise() -> None:
    bq = scripts_module("bench_qwen")
    assert bq.faster_of(100.0, 120.0, 1.0) == "grouped"
    assert bq.faster_of(100.0, 80.0, 1.0) == "per_sample"
    assert bq.faster_of(100.0, 97.0, 1.0) == "tie"  # within 5 %
    assert bq.faster_of(100.0, 110.0, 1.06) == "tie"  # within twice the repeat's 6 %


def test_prefill_positions_are_the_unpruned_sequences() -> None:
    """The kept tokens sit at their source tokens' M-RoPE positions; the text keeps its own."""
    from recomp_eval.models.qwen2_5_vl.positions import full_positions

    bq = scripts_module("bench_qwen")
    model = bq.build_model(bq.smoke_config_dict(), torch.float32, "cpu")
    grid, n, kept = (1, 8, 12), 24, 3
    full = bq.prefill_inputs(model, grid, n, 2, "cpu", seed=0)
    cut = bq.prefill_inputs(model, grid, kept, 2, "cpu", seed=0)
    length = bq.TEXT_BEFORE + kept + bq.TEXT_AFTER
    assert cut["position_ids"].shape == (4, 2, length) and cut["input_ids"].shape == (2, length)
    assert torch.equal(cut["position_ids"][0, 0], torch.arange(length))  # the text-only row
    ids = bq.prompt_ids(int(model.config.text_config.vocab_size), model.config.image_token_id, 0)
    ref, at, _ = full_positions(model, ids, model.config.image_token_id, n, grid)
    assert torch.equal(full["position_ids"][1:, 0], ref)  # every token in place: stock positions
    pos = cut["position_ids"][1:, 0]
    assert torch.equal(pos[:, :at], ref[:, :at])
    assert torch.equal(pos[:, at + kept :], ref[:, at + n :])  # text after keeps its positions
    image = ref[:, at : at + n].T.tolist()
    assert all(p in image for p in pos[:, at : at + kept].T.tolist())
    assert sum(len(f) for f in cut["mm_encoder_outputs"]["image"].pooler_output) == 2 * kept
