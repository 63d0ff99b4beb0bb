"""Target recall end to end: SynthVQA target masks reach the rows, the record and the tables.

The masks are checked against :mod:`recomp_eval.synth.targets` on the tiny model's grid, the
diagnostics against hand-built keep maps through :func:`recomp_eval.records.target_entry`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import evaluate, load_model
from recomp_eval.keepmap import encode, keep_map
from recomp_eval.methods.base import Role, selection_output
from recomp_eval.records import target_entry


@pytest.fixture(scope="module")
def bundle():
    return load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="module")
def synth_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recomp_eval.synth.writers import write_benchmark

    return write_benchmark("gqa", tmp_path_factory.mktemp("synth"), n_images=6)


def _rows(record) -> list[dict]:
    folder = Path(record.run_dir)
    return [json.loads(line) for f in sorted(folder.glob("samples*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]  # fmt: skip


def test_masks_rows_record_and_tables(synth_gqa: Path, tmp_path: Path, bundle) -> None:
    from recomp_eval.aggregate import write_tables
    from recomp_eval.synth.targets import decode_mask, target_mask
    from recomp_eval.synth.writers import read_tags

    runs = ("runs=[{method: none}, {method: recomp, retention: 0.25, options: {variant: paper}},"
            " {method: random, retention: 0.25}, {method: fastv, retention: 0.25,"
            " options: {k_layer: 1}}]")  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "benchmark=gqa", f"benchmark.data_dir={synth_gqa}", f"paths.root={tmp_path}",
            "runner.max_new_tokens=2", runs])  # fmt: skip
    records = evaluate(cfg, bundle)
    tags = read_tags(synth_gqa)
    grid = bundle.adapter.shapes(bundle).grid
    by_name = {r.method["name"]: r for r in records}
    for record in records:
        rows = _rows(record)
        with_target = [r for r in rows if tags[r["sample_id"]]["target"]]
        assert with_target and all("target" in r for r in with_target)
        assert not any("target" in r for r in rows if not tags[r["sample_id"]]["target"])
        for row in with_target:
            tag = tags[row["sample_id"]]
            expected = target_mask(tag["scene_id"], tag["target"], grid)
            assert np.array_equal(decode_mask(row["target_mask"]), expected)
        m = record.metrics
        assert m["gqa/target/recall_kept_lo"] <= m["gqa/target/recall_kept"]
        assert m["gqa/target/recall_kept"] <= m["gqa/target/recall_kept_hi"]
        assert m["gqa/target/recall_kept_n"] == len(with_target)
        slices = [k for k in m if k.startswith("gqa/target_slice/") and k.endswith("recall_seen")]
        assert slices and all(m[f"{k}_lo"] <= m[k] <= m[f"{k}_hi"] for k in slices)
    assert by_name["none"].metrics["gqa/target/recall_kept"] == 1.0  # every patch is kept
    assert by_name["none"].metrics["gqa/target/precision"] < 1.0
    rc = by_name["recomp"].metrics
    assert 0.0 <= rc["gqa/target/text_auroc"] <= 1.0 and rc["gqa/target/recall_kept"] < 1.0
    assert "gqa/target/text_auroc" not in by_name["random"].metrics  # no text score there
    fastv = by_name["fastv"].metrics  # every patch reaches the LLM; a quarter survives layer 1
    assert fastv["gqa/target/recall_kept"] == 1.0 and 0.0 <= fastv["gqa/target/recall_llm"] < 1.0
    assert "gqa/target/recall_llm" not in rc
    result = write_tables(tmp_path / "raw", tmp_path / "tables")
    names = {t.name for t in result["targets"]}
    assert "targets_gqa" in names and "target_slices_gqa_size" in names
    size = (tmp_path / "tables" / "target_slices_gqa_size.md").read_text()
    assert "| 100.0 [100.0, 100.0] |" in size  # none sees every patch; cells carry their CI
    assert (tmp_path / "tables" / "plots" / "target_recall_gqa.png").is_file()
    from recomp_eval.report.targets import recall_points

    points = {p[0].run.method_name: p for p in recall_points(result["scored"], "gqa")}
    assert set(points) == {"none", "recomp", "random", "fastv"}
    for name, (s, x, low, high) in points.items():  # the plotted x is the record's recall in %
        assert x == pytest.approx(100 * by_name[name].metrics["gqa/target/recall_kept"])
        rec = by_name[name]
        assert low <= x <= high and s.value == pytest.approx(100 * rec.metrics[rec.primary_metric])


def test_real_benchmarks_have_no_targets(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from recomp_eval.benchmarks.fixtures import write_fixture
    from recomp_eval.evaluate import build_benchmark

    write_fixture("gqa", tmp_path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=["benchmark=gqa",
                                                     f"benchmark.data_dir={tmp_path / 'gqa'}"])  # fmt: skip
    bench = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True))
    assert bench.targets(bench.sample_ids(), (24, 24)) == {}


def _entry(keep: list[int], mask: np.ndarray, scores: dict | None = None) -> dict:
    features = torch.zeros(1, mask.size, 4)
    out = selection_output(features, torch.tensor([keep]), Role.KEPT)
    codes = encode(keep_map(out.role[0], out.source[0], out.members[0]))
    return target_entry(codes, mask, scores or {})


def test_recall_is_one_when_the_target_is_kept_and_counts_a_hand_built_map() -> None:
    mask = np.zeros(16, dtype=bool)
    mask[[5, 6, 9, 10]] = True  # a 2 x 2 target in a 4 x 4 grid
    forced = _entry([5, 6, 9, 10], mask)
    assert forced["recall_kept"] == 1.0 and forced["precision"] == 1.0
    half = _entry([0, 5, 9, 15], mask)
    assert half["recall_kept"] == 0.5 and half["precision"] == 0.5
    score = torch.zeros(1, 16)
    score[0, [5, 6, 9, 10]] = 1.0
    located = _entry([0], mask, {"text": score, "cls_attn": -score})
    assert located["text_auroc"] == 1.0 and located["text_first_rank"] == 1
    assert located["cls_attn_auroc"] == 0.0 and located["recall_kept"] == 0.0


def test_in_llm_survivors_are_the_kept_image_tokens(bundle) -> None:
    from PIL import Image

    from recomp_eval.methods import build_method
    from recomp_eval.methods.base import budget_from_ratio
    from recomp_eval.pipeline import generate

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    texts = ["What is red?", "What is blue?"]
    method = build_method("fastv", retention=0.25, k_layer=1)
    results = generate(bundle, method, images, texts, texts, "llava15", ["a", "b"], 2)
    n = bundle.adapter.shapes(bundle).patches
    for r in results:
        assert r.llm_kept.shape == (n,) and int(r.llm_kept.sum()) == budget_from_ratio(0.25, n)
    none = generate(bundle, build_method("none"), images, texts, texts, "llava15", ["a", "b"], 2)
    assert all(r.llm_kept is None for r in none)
