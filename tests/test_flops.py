"""Analytic FLOPs against the figures quoted in the papers (independent hand arithmetic)."""

from types import SimpleNamespace

import pytest

from recomp_eval.efficiency.flops import DecoderShape, layer_macs, prefill_flops, vit_flops

VICUNA_7B = SimpleNamespace(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)


def test_llava15_7b_figures() -> None:
    shape = DecoderShape.from_config(VICUNA_7B)
    # protocol.md: 104 GMAC per layer at n=640 (FastV formula), 3.33 TMAC; SwiGLU 4.25 TMAC
    assert layer_macs(640, shape, "fastv") / 1e9 == pytest.approx(104.0, abs=0.1)
    assert prefill_flops(640, shape, "fastv") / 2 / 1e12 == pytest.approx(3.33, abs=0.01)
    assert prefill_flops(640, shape, "swiglu") / 1e12 == pytest.approx(8.5, abs=0.01)
    # RC's cost table: 1.5 TFLOPs at about 115 tokens
    assert prefill_flops(115, shape, "swiglu") / 1e12 == pytest.approx(1.5, abs=0.02)


def test_hand_computed_small_case_and_per_layer_counts() -> None:
    shape = DecoderShape(hidden=2, intermediate=3, layers=2, kv_hidden=1)
    n = 5
    expect = 2 * n * 4 + 2 * n * 2 * 1 + 2 * n * n * 2 + 3 * n * 2 * 3
    assert layer_macs(n, shape, "swiglu") == expect
    assert prefill_flops([5, 3], shape) == 2 * (expect + layer_macs(3, shape))
    with pytest.raises(ValueError, match="per-layer"):
        prefill_flops([5], shape)
    with pytest.raises(ValueError, match="formula"):
        layer_macs(5, shape, "gelu")  # type: ignore[arg-type]


def test_vit_flops_clip_l336() -> None:
    cfg = SimpleNamespace(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
    )
    # protocol.md: one CLIP ViT-L/14-336 pass is about 191 GMAC
    assert vit_flops(cfg) / 2 / 1e9 == pytest.approx(191, abs=1.5)
    assert vit_flops(cfg, passes=2) == 2 * vit_flops(cfg)


def test_flops_summary_fastv_per_layer_counts() -> None:
    """FastV through its visual_counts: N image tokens before layer K, round(N (1 - R)) after."""
    from recomp_eval.efficiency.flops import flops_summary
    from recomp_eval.methods import build_method
    from recomp_eval.models.base import ModelShapes

    text = SimpleNamespace(
        hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2
    )
    vision = SimpleNamespace(
        image_size=56, patch_size=14, hidden_size=8, intermediate_size=16, num_hidden_layers=2
    )
    shape = DecoderShape.from_config(text)
    shapes = ModelShapes(patches=16, grid=(4, 4), decoder=shape, vision_flops=vit_flops(vision),
                         context_length=64)  # fmt: skip
    method = build_method("fastv", k_layer=3, ratio=0.75)
    rows = [{"text_tokens": 5, "kept_tokens": 1.0, "n_image_tokens": 20}, {"text_tokens": 3}]
    hand = [[5 + 20] * 3 + [5 + 5], [3 + 16] * 3 + [3 + 4]]  # 16 patches: shapes.patches
    got = flops_summary(shapes, method, rows)
    assert got["vision_tflops"] == vit_flops(vision) / 1e12
    expect = (prefill_flops(hand[0], shape) + prefill_flops(hand[1], shape)) / 2 / 1e12
    assert got["prefill_tflops"] == pytest.approx(expect, rel=1e-12)
    assert method.llm.visual_counts(20, 4) == (20, 20, 20, 5)
    assert method.llm.visual_counts(20, 2) == (20, 20)  # k_layer beyond the depth: nothing pruned
