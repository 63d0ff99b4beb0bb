"""The Qwen2.5-VL family on the tiny random checkpoint: stock parity, M-RoPE positions of kept
tokens, the received-attention signal against a loop port, batching, refusals, hooks, records.

The tiny model's pixel bounds give each image its own grid of merged tokens (e.g. 4 x 5, 4 x 4).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval import models
from recomp_eval.methods import METHODS, build_method
from recomp_eval.methods.base import budget_from_ratio
from recomp_eval.models.base import check_signals
from recomp_eval.pipeline import generate, prepare_batch

QUESTIONS = ["What is in the image?", "How many people are there?", "Is there a dog?"]
SIZES = [(56, 84), (112, 112), (60, 90)]  # (H, W): two share a grid, one has its own
MAX_NEW = 4


def _bundle(**options):
    return models.load_model({"family": "qwen2_5_vl", "id": "tiny_qwen", "dtype": "float32",
                              "options": options})  # fmt: skip


@pytest.fixture(scope="module")
def bundle():
    return _bundle(cls_attn="received")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in SIZES]


def _gen(bundle, method, images, questions=None, ids=None):
    n = len(images)
    questions = questions or QUESTIONS[:n]
    return generate(bundle, method, images, questions, questions, "llava15",
                    ids or [f"s{i}" for i in range(n)], MAX_NEW, output_logits=True,
                    return_dict_in_generate=True)  # fmt: skip


def test_grids_follow_the_processor(bundle, images):
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    stock = bundle.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert [list(g) for g in batch.layout.data] == stock.tolist()
    assert len({tuple(g) for g in batch.layout.data}) == 2


def test_none_equals_stock_processor_and_generate(bundle, images):
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


def _prefill_positions(bundle, run):
    seen = []

    def grab(_m, _a, kw):
        if kw.get("position_ids") is not None and kw.get("mm_encoder_outputs") is not None:
            seen.append((kw["input_ids"].clone(), kw["position_ids"].clone()))

    hook = bundle.model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    return out, seen[0]


def test_kept_tokens_keep_their_positions_in_the_unpruned_sequence(bundle, images):
    """The LLM sees each kept token at the M-RoPE position stock gives its source token in the
    full sequence; the text after the image continues as in the full sequence."""
    method = build_method("random", retention=0.3)
    res, (ids, pos) = _prefill_positions(bundle, lambda: _gen(bundle, method, images))
    full_res, (full_ids, full_pos) = _prefill_positions(
        bundle, lambda: _gen(bundle, build_method("none"), images))  # fmt: skip
    img = bundle.image_token_id
    for i, r in enumerate(res):
        sources = r.compressed.source[0].tolist()
        assert r.kept_tokens == budget_from_ratio(0.3, r.image["image_tokens"])
        kept = pos[1:, i][:, ids[i] == img]  # [3,T]
        full = full_pos[1:, i][:, full_ids[i] == img]  # [3,N]
        assert torch.equal(kept, full[:, sources])
        # the last prompt token: same position as in the full sequence
        assert torch.equal(pos[1:, i, -1], full_pos[1:, i, -1])
        assert full_res[i].kept_tokens == r.image["image_tokens"]
    # and the stock positions of the full prompt are what stock get_rope_index gives
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    proc = bundle.processor(text=batch.prompts, images=images, return_tensors="pt", padding=True)
    stock, _ = bundle.model.model.get_rope_index(
        proc["input_ids"], mm_token_type_ids=proc["mm_token_type_ids"],
        image_grid_thw=proc["image_grid_thw"], attention_mask=proc["attention_mask"])  # fmt: skip
    valid = proc["attention_mask"].bool()
    for i in range(len(images)):
        assert torch.equal(full_pos[1:, i][:, full_ids[i] != bundle.tokenizer.pad_token_id],
                           stock[:, i][:, valid[i]])  # fmt: skip


def test_received_attention_equals_a_loop_port(bundle, images):
    """The score block's received attention: our chunked, window-ordered computation against
    a float64 loop over heads and images in the original patch order; and our q/k give the
    stock block's own attention output."""
    from transformers.vision_utils import get_vision_window_index

    from recomp_eval.models.qwen2_5_vl.vision import resolve_block, tower_pass

    model = bundle.model
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    block = resolve_block(model, None)
    attn = model.model.visual.blocks[block].attn
    captured = {}

    def grab(_m, args, kw):
        captured["x"] = args[0].clone()
        captured["rope"] = kw["position_embeddings"]
        captured["cu"] = kw["cu_seqlens"].clone()

    def out_hook(_m, _a, output):
        captured["out"] = output.clone()

    handles = [attn.register_forward_pre_hook(grab, with_kwargs=True),
               attn.register_forward_hook(out_hook)]  # fmt: skip
    try:
        done = tower_pass(model, batch.pixel_values, batch.layout.data, block)
    finally:
        for h in handles:
            h.remove()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    x = captured["x"].double()
    p, heads = x.shape[0], attn.num_heads
    qkv = torch.nn.functional.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k, v = qkv.reshape(p, 3, heads, -1).unbind(1)
    cos, sin = (t.double() for t in captured["rope"])
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.double(), k.double()
    grid = torch.tensor([list(g) for g in batch.layout.data])
    window_index, _ = get_vision_window_index(grid, 2, model.config.vision_config.window_size, 14)
    order = torch.argsort(window_index)  # permuted group -> original
    received = torch.zeros(p, dtype=torch.float64)
    outputs = torch.zeros(p, heads, v.shape[-1], dtype=torch.float64)
    cu = captured["cu"].tolist()
    for start, end in itertools.pairwise(cu):  # full-attention block: one segment per image
        for h in range(heads):
            scores = (q[start:end, h] @ k[start:end, h].T) * attn.scaling
            probs = torch.softmax(scores, dim=-1)
            received[start:end] += probs.mean(dim=0) / heads
            outputs[start:end, h] = probs @ v[start:end, h]
    stock = captured["out"].double()
    mine = torch.nn.functional.linear(outputs.reshape(p, -1), attn.proj.weight.double(),
                                      attn.proj.bias.double())  # fmt: skip
    torch.testing.assert_close(mine, stock, atol=1e-4, rtol=1e-4)
    per_group = received.reshape(-1, 4).sum(dim=1)[order]  # original group order
    torch.testing.assert_close(done.received.double(), per_group, atol=1e-5, rtol=1e-4)
    counts = [t * h * w // 4 for t, h, w in batch.layout.data]
    sums = torch.split(done.received, counts)
    assert all(abs(float(s.sum()) - 1.0) < 1e-4 for s in sums)  # a distribution per image


RUNS = ["divprune", "dart", "fastervlm", "fastv", "none", "pool", "prumerge", "prumerge_plus",
        "random", "vispruner"]  # fmt: skip


def _method(name):
    try:
        return build_method(name, retention=0.3)
    except (TypeError, ValueError):
        return build_method(name)


def test_every_method_runs_or_refuses_in_one_line():
    plain = _bundle()
    substitute = models.get_adapter("qwen2_5_vl", {"cls_attn": "received"})
    for name in sorted(METHODS):
        method = build_method(name)
        for adapter in (plain.adapter, substitute):
            try:
                check_signals(method, adapter)
                adapter.check_method(method)
            except ValueError as err:
                text = str(err)
                assert "\n" not in text and "qwen2_5_vl" in text, text
                assert name not in RUNS or adapter is plain.adapter, (name, text)
            else:
                assert name in RUNS, name
    with pytest.raises(ValueError, match="needs cls_attn, which the qwen2_5_vl family cannot"):
        check_signals(build_method("fastervlm"), plain.adapter)


@pytest.mark.parametrize("name", RUNS)
def test_batch_equals_one_by_one(bundle, images, name):
    method = _method(name)
    batched = _gen(bundle, method, images)
    for i in range(len(images)):
        (single,) = _gen(bundle, method, images[i : i + 1], QUESTIONS[i : i + 1], [f"s{i}"])
        assert single.kept_tokens == pytest.approx(batched[i].kept_tokens)
        assert torch.equal(single.compressed.source, batched[i].compressed.source)
        steps = min(len(single.logits), len(batched[i].logits))
        torch.testing.assert_close(batched[i].logits[:steps], single.logits[:steps],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


def test_fastv_prune_equals_mask_with_mrope(bundle, images):
    out = {}
    for variant in ("mask", "prune"):
        out[variant] = _gen(bundle, build_method("fastv", k_layer=1, ratio=0.5, variant=variant),
                            images)  # fmt: skip
    for m, p in zip(out["mask"], out["prune"]):
        assert m.new_token_ids == p.new_token_ids
        torch.testing.assert_close(m.logits, p.logits, atol=1e-4, rtol=1e-4)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed(bundle, images):
    before = _hook_count(bundle.model)
    for name in ("prumerge", "fastv", "dart"):
        _gen(bundle, _method(name), images[:2])
        assert _hook_count(bundle.model) == before, name


def test_keep_map_covers_the_patch_grid(bundle, images):
    from recomp_eval import keepmap
    from recomp_eval.records import sample_row

    (res,) = _gen(bundle, build_method("random", retention=0.3), images[:1])
    sample = type("S", (), {"sample_id": "s", "question": "q", "answers": ["a"], "meta": {}})()
    row = sample_row(sample, res, warm=True, first=True)
    codes = keepmap.decode(row["keep_map"])
    assert codes.size == row["image"]["image_tokens"]
    (panel,) = bundle.adapter.keep_map_panels(bundle, codes, row)
    _, grid = panel
    h, w = row["image"]["grid_thw"][1:]
    assert grid.shape == (h, w) and int((grid > 0).sum()) == 4 * int(res.kept_tokens)


def test_an_evaluation_runs_from_the_model_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from recomp_eval.benchmarks.fixtures import write_fixture
    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate
    from recomp_eval.runner import load_run_rows

    data = write_fixture("pope", tmp_path / "data")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny_qwen", "benchmark=pope", f"benchmark.data_dir={data}",
            f"paths.root={tmp_path / 'out'}", "runner.max_new_tokens=2", "method=prumerge",
            "model.options.cls_attn=received",
        ])  # fmt: skip
        refused = compose(config_name="eval", overrides=[
            "model=tiny_qwen", "benchmark=pope", f"benchmark.data_dir={data}",
            f"paths.root={tmp_path / 'out'}", "method=recomp",
        ])  # fmt: skip
    (record,) = evaluate(cfg)
    assert record.protocol_details["family"] == "qwen2_5_vl"
    assert record.config["model"]["options"]["cls_attn"] == "received"
    rows = list(load_run_rows(Path(record.run_dir)).values())
    assert rows and all(r["n_image_tokens"] == r["image"]["image_tokens"] for r in rows)
    assert record.flops["vision_tflops"] > 0
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        evaluate(refused)
