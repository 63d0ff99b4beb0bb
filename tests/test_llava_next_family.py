"""The LLaVA-NeXT family end to end on the tiny anyres model: stock parity, per-crop and global
compression, batching, the packed order, in-LLM methods, hooks, records.

The tiny model has 56 px crops of 4 x 4 patches and pinpoints (56,112), (112,56), (112,112):
a square image gives 5 crops and no unpadding; a wide one a 2 x 2 grid whose map loses rows to
unpadding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval import models
from recomp_eval.methods import METHODS, build_method
from recomp_eval.methods.base import Compressed, Role, budget_from_ratio, selection_output
from recomp_eval.models.llava_next.packing import crops_per_image, pack_layout
from recomp_eval.models.llava_next.tokens import (
    ImageTokens,
    group_signals,
    packed_order,
)
from recomp_eval.pipeline import generate, prepare_batch

QUESTIONS = ["What is in the image?", "How many people are there?", "Is there a dog?"]
SIZES = [(112, 112), (60, 100), (60, 120)]  # (H, W): 5 crops; 5 crops, unpadded; 3 crops
MAX_NEW = 4
N = 16  # patches per tiny crop


def _bundle(scope: str = "per_crop", newlines: str = "row"):
    cfg = {"family": "llava_next", "id": "tiny_next", "dtype": "float32",
           "options": {"scope": scope, "newlines": newlines}}  # fmt: skip
    return models.load_model(cfg)


@pytest.fixture(scope="module")
def bundle():
    return _bundle()


@pytest.fixture(scope="module")
def global_bundle():
    return _bundle("global")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in SIZES]


def _gen(bundle, method, images, ids=None, questions=None, **kw):
    n = len(images)
    questions = questions or QUESTIONS[:n]
    return generate(bundle, method, images, questions, questions, "llava15",
                    ids or [f"s{i}" for i in range(n)], MAX_NEW, output_logits=True,
                    return_dict_in_generate=True, **kw)  # fmt: skip


def test_the_registry_loads_the_family(bundle):
    assert type(bundle.adapter).__name__ == "LlavaNextAdapter"
    assert (bundle.adapter.scope, bundle.adapter.newlines, bundle.adapter.base) == (
        "per_crop", "row", "vicuna")  # fmt: skip
    assert models.adapter_for_model(bundle.model).family == "llava_next"
    with pytest.raises(ValueError, match=r"model.options.scope='crop'; expected one of"):
        _bundle("crop")


def test_none_equals_stock_processor_and_generate(bundle, images):
    """`none` = the stock processor (string-level <image> expansion, anyres pixels) + stock
    generate, for a batch mixing 5-crop images with and without unpadding."""
    res = _gen(bundle, build_method("none"), images)
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    proc = bundle.processor(text=batch.prompts, images=images, return_tensors="pt", padding=True)
    ref = bundle.model.generate(**proc, do_sample=False, max_new_tokens=MAX_NEW,
                                output_logits=True, return_dict_in_generate=True)  # fmt: skip
    counts = (proc["input_ids"] == bundle.image_token_id).sum(dim=1).tolist()
    new = ref.sequences[:, proc["input_ids"].shape[1] :]
    for i, r in enumerate(res):
        assert r.kept_tokens == counts[i] == r.image["image_tokens"]
        assert r.new_token_ids == new[i].tolist()
        torch.testing.assert_close(r.logits, torch.stack([x[i] for x in ref.logits]),
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert res[0].image["margin_dropped"] == 0 and res[1].image["margin_dropped"] > 0


def test_per_crop_budget_gives_the_stated_counts(images):
    """A square image (5 crops, no unpadding): round(r N) per crop, plus the newline rule."""
    r = 0.25
    per_crop = budget_from_ratio(r, N)
    for rule in ("row", "all", "none"):
        b = _bundle(newlines=rule)
        (res,) = _gen(b, build_method("random", retention=r), images[:1])
        info = res.image
        assert info["crops"] == 5 and info["kept_per_crop"] == [per_crop] * 5
        rows = info["grid"][0]
        if rule == "all":
            assert info["newlines"] == rows
        elif rule == "none":
            assert info["newlines"] == 0
        else:
            assert 0 < info["newlines"] <= rows
        assert res.kept_tokens == 5 * per_crop + info["newlines"]


def test_global_budget_is_one_budget_over_the_crops(global_bundle, images):
    r = 0.25
    res = _gen(global_bundle, build_method("random", retention=r), images)
    for out in res:
        crops = out.image["crops"]
        assert sum(out.image["kept_per_crop"]) + out.image["margin_dropped"] == budget_from_ratio(
            r, crops * N
        )
    # one budget: crops of one image need not get equal shares
    shares = [tuple(out.image["kept_per_crop"]) for out in res]
    assert any(len(set(s)) > 1 for s in shares)


CASES = sorted(METHODS)
FITTED = {"pdrop": {"layer_list": [1, 2], "ratios": [0.5, 0.25]}, "visionzip": {"dominant": 3,
          "contextual": 1}}  # fmt: skip


def _method(name):
    kw = FITTED.get(name, {})
    try:
        return build_method(name, **kw)
    except (TypeError, ValueError):
        return build_method(name, retention=0.25, **kw)


@pytest.mark.parametrize("scope", ["per_crop", "global"])
@pytest.mark.parametrize("name", CASES)
def test_batch_equals_one_by_one(bundle, global_bundle, images, scope, name):
    """Every method, per crop and global: a batch with different crop counts and kept counts
    gives each sample what it gets alone."""
    b = bundle if scope == "per_crop" else global_bundle
    method = _method(name)
    batched = _gen(b, method, images)
    assert len({crops_per_image(b.model, [s])[0] for s in SIZES}) > 1
    for i in range(len(images)):
        (single,) = _gen(
            b, method, images[i : i + 1], ids=[f"s{i}"], questions=QUESTIONS[i : i + 1]
        )
        assert single.kept_tokens == pytest.approx(batched[i].kept_tokens)
        assert single.image == batched[i].image
        assert torch.equal(single.compressed.source, batched[i].compressed.source)
        steps = min(len(single.logits), len(batched[i].logits))
        torch.testing.assert_close(batched[i].logits[:steps], single.logits[:steps],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


def test_the_llm_receives_the_packed_rows_in_stock_order(bundle, images):
    """Kept patch tokens reach the LLM in stock packed order: the projected rows equal the
    stock packing's rows at the kept positions, newlines where the rule puts them."""
    from recomp_eval.inject.context import compress
    from recomp_eval.models.llava_next.packing import crop_features, pack, project_crops
    from recomp_eval.pipeline import vision_side
    from recomp_eval.timing import StageTimer

    method = build_method("random", retention=0.5)
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    seeds = torch.arange(3)
    with compress(bundle.model, method, bundle.image_token_id, bundle.adapter) as probe:
        compressed, feats = vision_side(bundle, method, probe, batch.pixel_values, StageTimer("cpu"),
                               QUESTIONS, batch.prompt_ids, seeds=seeds,
                               layout=batch.layout)  # fmt: skip
    sizes = batch.layout.data
    full = pack(bundle.model, project_crops(bundle.model, crop_features(
        bundle.model, batch.pixel_values, sizes)), sizes)  # fmt: skip
    prov = bundle.adapter.provenance(bundle, compressed, batch.layout)
    for i, size in enumerate(sizes):
        layout = pack_layout(bundle.model, size)
        position = {int(p): t for t, p in enumerate(layout.source.tolist()) if p >= 0}
        rows = []
        for src in prov[i][0].source[0].tolist():
            rows.append(position[src] if src >= 0 else None)
        newline = bundle.model.model.image_newline
        for t, at in enumerate(rows):
            expected = newline if at is None else full[i][at]
            torch.testing.assert_close(feats[i][t], expected.to(feats[i].dtype), atol=1e-5, rtol=0)
        patch_rows = [a for a in rows if a is not None]
        assert patch_rows == sorted(patch_rows)  # raster order of the packing


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_every_method(bundle, images):
    before = _hook_count(bundle.model)
    impl = bundle.model.config.text_config._attn_implementation
    for name in ("recomp", "visionzip", "fastv", "dart", "pdrop"):
        _gen(bundle, _method(name), images[:2])
        assert _hook_count(bundle.model) == before, name
    assert bundle.model.config.text_config._attn_implementation == impl


def test_fastv_prune_equals_mask_on_the_packed_sequence(bundle, images):
    out = {}
    for variant in ("mask", "prune"):
        method = build_method("fastv", k_layer=1, ratio=0.5, variant=variant)
        out[variant] = _gen(bundle, method, images)
    for m, p in zip(out["mask"], out["prune"]):
        assert m.new_token_ids == p.new_token_ids
        torch.testing.assert_close(m.logits, p.logits, atol=1e-4, rtol=1e-4)
        assert m.llm_kept is not None and torch.equal(m.llm_kept, p.llm_kept)
        assert m.llm_kept.numel() == m.image["crops"] * N


def _tokens(source, role, crops=5):
    t = len(source)
    members = torch.zeros((t, crops * N), dtype=torch.bool)
    for j, s in enumerate(source):
        if s >= 0:
            members[j, s] = True
    src = torch.tensor(source)
    return ImageTokens(features=torch.zeros(t, 2), source=src,
                       role=torch.tensor(role, dtype=torch.int8), members=members,
                       crop=torch.where(src >= 0, src // N, torch.zeros_like(src)))  # fmt: skip


def test_packed_order_rules(bundle):
    layout = pack_layout(bundle.model, (112, 112))  # 5 crops, 8 x 8 map, no unpadding
    everything = _tokens(list(range(5 * N)), [int(Role.KEPT)] * (5 * N))
    order = packed_order(layout, everything, "row").order
    assert torch.equal(torch.where(order < 0, -1, everything.source[order.clamp(min=0)]),
                       layout.source)  # nothing compressed: exactly stock  # fmt: skip
    # crop 1 patch 0 is map (0, 0); crop 4 patch 15 is map (7, 7); a summary token of crop 2
    tokens = _tokens([4 * N + 15, N, 3, -1], [int(Role.KEPT), int(Role.MERGED),
                     int(Role.ATTENTION), int(Role.SUMMARY)])  # fmt: skip
    tokens.crop[3] = 2
    row = packed_order(layout, tokens, "row").order.tolist()
    assert row == [2, 1, -1, 0, -1, 3]  # base patch, map row 0 + newline, row 7 + newline, summary
    assert packed_order(layout, tokens, "none").order.tolist() == [2, 1, 0, 3]
    assert (packed_order(layout, tokens, "all").order < 0).sum() == 8


def test_margin_tokens_are_dropped_as_stock_drops_their_patches(bundle):
    layout = pack_layout(bundle.model, (60, 100))
    on_map = set(layout.source[layout.source >= 0].tolist())
    margin = next(p for p in range(N, layout.crops * N) if p not in on_map)
    tokens = _tokens([0, margin], [int(Role.KEPT)] * 2, crops=layout.crops)
    packed = packed_order(layout, tokens, "row")
    assert packed.order.tolist() == [0] and packed.margin_dropped == 1


def test_group_signals_concatenates_an_images_crops(bundle):
    from recomp_eval.methods.base import VisionSignals

    feats = torch.arange(8 * N * 2, dtype=torch.float32).reshape(8, N, 2)
    sig = VisionSignals(features=feats, cls_attn=feats[..., 0], cls_feature=feats[:, 0],
                        grid=(4, 4), seeds=torch.arange(8))  # fmt: skip
    grouped = group_signals(sig, [range(0, 3), range(5, 8)])
    assert grouped.features.shape == (2, 3 * N, 2) and grouped.grid == (12, 4)
    assert torch.equal(grouped.features[1], feats[5:8].reshape(3 * N, 2))
    assert torch.equal(grouped.cls_feature, feats[[0, 5], 0]) and grouped.seeds.tolist() == [0, 5]


def test_keep_map_panels_cover_the_whole_image(bundle, images):
    from recomp_eval import keepmap
    from recomp_eval.records import sample_row

    res = _gen(bundle, build_method("random", retention=0.25), images[1:2])
    sample = type("S", (), {"sample_id": "s", "question": "q", "answers": ["a"], "meta": {}})()
    row = sample_row(sample, res[0], warm=True, first=True)
    assert row["image"]["crops"] == 5 and row["n_image_tokens"] == res[0].image["image_tokens"]
    codes = keepmap.decode(row["keep_map"])
    assert codes.size == 5 * N
    panels = bundle.adapter.keep_map_panels(bundle, codes, row)
    assert [p.shape for _, p in panels] == [(4, 4), tuple(row["image"]["grid"])]
    kept_on_map = sum(int((grid > 0).sum()) for _, grid in panels)
    assert kept_on_map == sum(row["image"]["kept_per_crop"])
    keepmap.render_panels(panels, images[1], "s")


def test_a_user_selection_keeps_its_own_sources(bundle, images):
    """A hand-built selection: the kept patches are exactly the LLM's patch rows."""
    from recomp_eval.methods import BuiltMethod, SignalSpec

    picks = torch.tensor([[0, 5, 15]])

    def pick(signals):
        index = picks.expand(signals.features.shape[0], -1)
        return selection_output(signals.features, index, Role.KEPT)

    method = BuiltMethod(name="pick", spec=SignalSpec(), fn=pick)
    (res,) = _gen(bundle, method, images[:1])
    sources = [s for s in res.compressed.source[0].tolist() if s >= 0]
    assert sorted(sources) == sorted(k * N + p for k in range(5) for p in (0, 5, 15))
    assert isinstance(res.compressed, Compressed)


def test_an_evaluation_runs_from_the_model_config(tmp_path):
    """`model=tiny_next` through the Hydra config, the runner and the record."""
    from hydra import compose, initialize_config_dir

    from recomp_eval.benchmarks.fixtures import write_fixture
    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate
    from recomp_eval.runner import load_run_rows

    data = write_fixture("gqa", tmp_path / "data")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny_next", "benchmark=gqa", f"benchmark.data_dir={data}",
            f"paths.root={tmp_path / 'out'}", "runner.max_new_tokens=2", "method=recomp",
            "retention=0.25", "model.options.scope=global",
        ])  # fmt: skip
    (record,) = evaluate(cfg)
    assert record.protocol_details["family"] == "llava_next"
    assert record.config["model"]["options"] == {"scope": "global", "newlines": "row"}
    rows = list(load_run_rows(Path(record.run_dir)).values())
    assert rows and all(r["image"]["scope"] == "global" for r in rows)
    crops = [r["image"]["crops"] for r in rows]
    asked = np.mean([budget_from_ratio(0.25, c * N) for c in crops])
    assert record.tokens["requested"] == pytest.approx(asked)
    assert record.tokens["mean"] == pytest.approx(np.mean([r["kept_tokens"] for r in rows]))
    one_crop = record.flops["vision_tflops"] / np.mean(crops)
    assert one_crop == pytest.approx(bundle_vision_tflops())


def bundle_vision_tflops() -> float:
    from transformers import AutoConfig

    from recomp_eval.efficiency.flops import vit_flops
    from recomp_eval.models.llava_next.tiny import build_tiny_next

    return vit_flops(AutoConfig.from_pretrained(build_tiny_next()).vision_config) / 1e12
