"""The in-LLM pruning interface: test-only methods plug into llm_pruning without touching it.

``FirstHalf`` keeps the first half of the current image rows at each of its prune layers (one or
two stages, either position policy); ``LastQueryHalf`` is a PyramidDrop-like stub scoring from the
previous layer's attention; ``Recorder`` keeps everything and records what a stage sees. The
reference is an independent computation: the stock decoder layers called one by one on explicitly
shortened sequences with hand-built masks and positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from tiny_llm import (
    ATOL,
    IMAGE_ID,
    N_IMAGE,
    TEXT_LAYERS,
    VOCAB,
    build_llava,
    make_batch,
)

from recomp_eval.efficiency.flops import DecoderShape, flops_summary, prefill_flops
from recomp_eval.inject.llm_attention import check_depth, llm_pruning
from recomp_eval.llm_methods.base import LLMPruner, PruneView, Stage, layer_counts, topk_keep
from recomp_eval.methods.fastv import FastVConfig, last_query_scores
from recomp_eval.models.base import ModelShapes

NEW_TOKENS = 4


@dataclass(frozen=True)
class FirstHalf:
    """Keep the first half (by position) of the current image rows at each layer of ``layers``."""

    name: ClassVar[str] = "firsthalf"
    layers: tuple[int, ...] = (1,)
    variant: str = "prune"
    positions: str = "original"

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(Stage(prune_layer=layer) for layer in self.layers)

    def check_depth(self, num_layers: int) -> None:
        if max(self.layers) >= num_layers:
            raise ValueError(f"firsthalf layers {self.layers} exceed {num_layers} layers")

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        return -view.rows.float()  # [B,L] earlier rows first

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        n = int(view.image_mask[0].sum())
        return topk_keep(scores, view.image_mask, n // 2)  # [B,L]

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        steps, n = {}, num_image
        for layer in self.layers:
            n //= 2
            steps[layer] = n
        return layer_counts(num_image, num_layers, steps)


@dataclass(frozen=True)
class LastQueryHalf(FirstHalf):
    """PyramidDrop-like: at each stage, half of the image rows by the last query's attention."""

    name: ClassVar[str] = "lastqueryhalf"

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(Stage(prune_layer=layer, attention_layer=layer - 1) for layer in self.layers)

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        att = view.attention
        return last_query_scores(att.query, att.key, att.mask, att.scaling)  # [B,L]


@dataclass(frozen=True)
class Recorder(FirstHalf):
    """Keeps every row (vanilla outputs) and records the views it is shown (DART-like inputs)."""

    name: ClassVar[str] = "recorder"
    layers: tuple[int, ...] = (2,)
    views: list[PruneView] = field(default_factory=list)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(prune_layer=self.layers[0], attention_layer=self.layers[0] - 1),)

    def scores(self, stage: int, view: PruneView) -> torch.Tensor:
        self.views.append(view)
        return view.attention.key.abs().sum(dim=(1, 3))  # [B,L] DART's key L1 norm

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        return torch.ones_like(view.image_mask)

    def visual_counts(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        return (num_image,) * num_layers


@dataclass(frozen=True)
class Broken(FirstHalf):
    """Selections the mechanics must refuse."""

    name: ClassVar[str] = "broken"
    mode: str = "text"

    def select(self, stage: int, scores: torch.Tensor, view: PruneView) -> torch.Tensor:
        keep = super().select(stage, scores, view)
        if self.mode == "text":
            keep[:, -1] = False  # drops the last (text) row
        else:
            keep[0] = ~view.image_mask[0] | view.image_mask[0]  # sample 0 keeps everything
        return keep


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=0)


@pytest.fixture(scope="module")
def batch():
    return make_batch(seed=3)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """[B,S] bool -> [B,S] int64 position ids as generate makes them (pads at 0)."""
    return (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 0)


def _embeds(llava, batch) -> torch.Tensor:
    """[B,S,E] the LLM's input embeddings (image features scattered in), captured by a hook."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = llava.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            llava(**batch)
    finally:
        handle.remove()
    return seen["embeds"]


def _reference(llava, embeds, valid, image, cuts, renumber):
    """Layers one by one; at each layer of ``cuts`` keep the first half of the image rows.

    Args:
        embeds: [B,S,E]; valid: [B,S] bool (False at padding); image: [B,S] bool.
    Returns:
        logits [B,S',V] and the kept rows [B,S'] (positions in the input).
    """
    text_model = llava.model.language_model
    b, s, _ = embeds.shape
    base = _positions(valid)  # [B,S]
    rows = torch.arange(s).expand(b, s)  # [B,S]
    hidden = embeds
    with torch.no_grad():
        for i, layer in enumerate(text_model.layers):
            if i in cuts:
                keep = []
                for j in range(b):
                    img = image[j, rows[j]].nonzero().squeeze(1).tolist()
                    dropped = set(img[len(img) // 2 :])
                    keep.append([p for p in range(rows.shape[1]) if p not in dropped])
                idx = torch.tensor(keep)  # [B,S']
                hidden = torch.stack([hidden[j, idx[j]] for j in range(b)])  # [B,S',E]
                rows = torch.stack([rows[j, idx[j]] for j in range(b)])  # [B,S']
            v = valid.gather(1, rows)  # [B,n]
            pos = _positions(v) if renumber else base.gather(1, rows)  # [B,n]
            n = rows.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()  # [n,n]
            mask = (causal[None] & v[:, None, :]) | torch.eye(n, dtype=torch.bool)[None]
            cos_sin = text_model.rotary_emb(hidden, pos)
            hidden = layer(
                hidden, attention_mask=mask[:, None], position_embeddings=cos_sin, position_ids=pos
            )
        return llava.lm_head(text_model.norm(hidden)), rows


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _names() -> set[str]:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | set(AttentionMaskInterface._global_mapping)


@pytest.mark.parametrize("positions", ["original", "renumber"])
@pytest.mark.parametrize("layers", [(1,), (1, 3)], ids=["one-stage", "two-stage"])
def test_first_half_matches_the_layerwise_reference(llava, batch, layers, positions):
    valid, image = batch["attention_mask"].bool(), batch["input_ids"] == IMAGE_ID
    ref, rows = _reference(
        llava, _embeds(llava, batch), valid, image, set(layers), positions == "renumber"
    )
    kept_valid = valid.gather(1, rows)  # [B,S'] compare real rows (pads carry no output)
    inputs = {**batch, "position_ids": _positions(valid)}
    logits = {}
    for variant in ("prune", "mask"):
        pruner = FirstHalf(layers=layers, variant=variant, positions=positions)
        assert isinstance(pruner, LLMPruner)
        with llm_pruning(llava, pruner, IMAGE_ID) as probe, torch.no_grad():
            logits[variant] = llava(**inputs).logits
        expected_rows = torch.zeros_like(valid).scatter(1, rows, True)
        assert torch.equal(probe.keep_masks[0], expected_rows)
        counts = pruner.visual_counts(N_IMAGE, TEXT_LAYERS)
        assert probe.per_layer_counts.tolist() == [[c, c] for c in counts]
        assert probe.mean_visual_tokens.tolist() == [sum(counts) / TEXT_LAYERS] * 2
    assert logits["prune"].shape[1] == rows.shape[1]
    masked = logits["mask"].gather(1, rows[..., None].expand(-1, -1, VOCAB))  # [B,S',V]
    for out in (logits["prune"], masked):
        torch.testing.assert_close(out[kept_valid], ref[kept_valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_two_stage_generation_matches_the_reference(llava, batch, positions):
    """KV-cache decode (pruned caches, shifted positions) against a cache-free recomputation."""
    layers = (1, 3)
    embeds = _embeds(llava, batch)
    prompt_len = batch["input_ids"].shape[1]
    out = {}
    for variant in ("prune", "mask"):
        pruner = FirstHalf(layers=layers, variant=variant, positions=positions)
        with llm_pruning(llava, pruner, IMAGE_ID), torch.no_grad():
            gen = llava.generate(
                **batch,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        out[variant] = (gen.sequences[:, prompt_len:], torch.stack(gen.logits, dim=1))
    new, logits = out["prune"]  # [B,T], [B,T,V]
    assert torch.equal(out["mask"][0], new)
    with torch.no_grad():
        new_embeds = llava.get_input_embeddings()(new[:, :-1])  # [B,T-1,E]
    b = new.shape[0]
    ref, _ = _reference(
        llava,
        torch.cat([embeds, new_embeds], dim=1),
        torch.cat([batch["attention_mask"].bool(), torch.ones(b, NEW_TOKENS - 1).bool()], 1),
        torch.cat([batch["input_ids"] == IMAGE_ID, torch.zeros(b, NEW_TOKENS - 1).bool()], 1),
        set(layers),
        positions == "renumber",
    )
    for got in (logits, out["mask"][1]):
        torch.testing.assert_close(got, ref[:, -NEW_TOKENS:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_attention_scored_stages_mask_and_prune_agree(llava, batch, positions):
    """Stage 2 scores from attention over the rows stage 1 kept, in both variants."""
    base = llava(**batch).logits
    results = {}
    for variant in ("mask", "prune"):
        pruner = LastQueryHalf(layers=(1, 3), variant=variant, positions=positions)
        with llm_pruning(llava, pruner, IMAGE_ID) as probe, torch.no_grad():
            logits = llava(**batch).logits
            gen = llava.generate(
                **batch,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        results[variant] = (logits, gen.sequences, torch.stack(gen.logits), probe)
    m_logits, m_seq, m_scores, m_probe = results["mask"]
    p_logits, p_seq, p_scores, p_probe = results["prune"]
    keep = m_probe.keep_masks[0]  # [B,L]
    assert all(torch.equal(k, keep) for k in m_probe.keep_masks + p_probe.keep_masks)
    image = batch["input_ids"] == IMAGE_ID
    assert (keep & image).sum(dim=1).tolist() == [N_IMAGE // 4] * 2
    index = torch.arange(keep.shape[1]).expand_as(keep)[keep].view(2, -1)  # [B,L']
    kept = m_logits.gather(1, index[..., None].expand(-1, -1, VOCAB))
    valid = batch["attention_mask"].bool().gather(1, index)
    torch.testing.assert_close(kept[valid], p_logits[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(m_scores, p_scores, atol=ATOL, rtol=0)
    assert torch.equal(m_seq, p_seq)
    assert (m_logits[:, -1] - base[:, -1]).abs().max() > 1e-3


def test_a_stage_sees_the_layer_inputs(llava, batch):
    """The view: hidden states entering the layer, its attention inputs, norm, module, rows."""
    text_model = llava.model.language_model
    outputs = {}
    hooks, names = _hooks(llava), _names()
    handle = text_model.layers[1].register_forward_hook(
        lambda module, args, out: outputs.setdefault("layer1", out)
    )
    try:
        with torch.no_grad():
            vanilla = llava(**batch).logits
            outputs.clear()
            recorder = Recorder()
            with llm_pruning(llava, recorder, IMAGE_ID) as probe:
                logits = llava(**batch).logits
    finally:
        handle.remove()
    assert torch.equal(logits, vanilla)  # a stage that keeps everything changes nothing
    assert _hooks(llava) == hooks and _names() == names
    (view,) = recorder.views
    b, seq = batch["input_ids"].shape
    cfg = llava.config.text_config
    head = cfg.hidden_size // cfg.num_attention_heads
    assert view.stage == 0 and view.layer == 2 and view.module is text_model.layers[2]
    assert view.norm is text_model.norm
    assert torch.equal(view.hidden, outputs["layer1"])
    assert torch.equal(view.image_mask, batch["input_ids"] == IMAGE_ID)
    assert torch.equal(view.rows, torch.arange(seq).expand(b, seq))
    assert view.prompt_images.tolist() == [N_IMAGE] * b
    assert view.attention.query.shape == (b, cfg.num_attention_heads, seq, head)
    assert view.attention.key.shape == view.attention.value.shape
    assert view.attention.key.shape == (b, cfg.num_key_value_heads, seq, head)
    assert view.attention.scaling == pytest.approx(head**-0.5)
    assert view.position_embeddings[0].shape[-2:] == (seq, head)
    assert probe.keep_masks[0].all() and probe.per_layer_counts.tolist() == [[N_IMAGE] * 2] * 4


@pytest.mark.parametrize(
    ("pruner", "error", "match"),
    [
        (Broken(mode="text"), ValueError, "dropped non-image rows"),
        (Broken(mode="unequal"), ValueError, r"kept \[\d+, \d+\] rows per sample"),
        (FirstHalf(layers=(0,)), ValueError, "layer 0 sees the full prompt"),
        (FirstHalf(layers=(2, 1)), ValueError, "increasing prune layers"),
        (FirstHalf(layers=(2, 2)), ValueError, "increasing prune layers"),
        (FirstHalf(layers=(TEXT_LAYERS,)), ValueError, "exceed"),
        (FirstHalf(variant="drop"), ValueError, "variant must be one of"),
        (FirstHalf(positions="shift"), ValueError, "positions must be one of"),
        (SimpleNamespace(name="x"), TypeError, "needs an LLMPruner"),
    ],
    ids=[
        "drops-text",
        "unequal-counts",
        "layer-0",
        "decreasing",
        "repeated",
        "too-deep",
        "bad-variant",
        "bad-positions",
        "not-a-pruner",
    ],
)
def test_bad_methods_fail_in_one_line_and_restore(llava, batch, pruner, error, match):
    hooks, names = _hooks(llava), _names()
    with (
        pytest.raises(error, match=match) as err,
        llm_pruning(llava, pruner, IMAGE_ID),
        torch.no_grad(),
    ):
        llava(**batch)
    assert "\n" not in str(err.value)
    assert _hooks(llava) == hooks and _names() == names
    assert llava.config.text_config._attn_implementation == "sdpa"


def test_stage_order_against_attention_layers():
    @dataclass(frozen=True)
    class Late(FirstHalf):
        @property
        def stages(self) -> tuple[Stage, ...]:
            return (Stage(prune_layer=1), Stage(prune_layer=3, attention_layer=0))

    with pytest.raises(ValueError, match=r"reads attention layer 0; .*\(in \[1, 2\]\)"):
        check_depth(Late(), TEXT_LAYERS)
    check_depth(FastVConfig(k_layer=3), TEXT_LAYERS)
    with pytest.raises(ValueError, match="FastV k_layer=4 is at or beyond"):
        check_depth(FastVConfig(k_layer=4), TEXT_LAYERS)


def test_flops_summary_reads_the_methods_per_layer_counts(llava):
    """Any in-LLM method: FLOPs from its visual_counts (checked against the probe above)."""
    pruner = FirstHalf(layers=(1, 3))
    method = SimpleNamespace(llm=pruner, spec=SimpleNamespace(vit_passes=1))
    rows: list[dict[str, Any]] = [
        {"text_tokens": 10, "kept_tokens": 7.0, "n_image_tokens": N_IMAGE},
        {"text_tokens": 6, "kept_tokens": 7.0},  # n_image_tokens: shapes.patches
    ]
    shape = DecoderShape.from_config(llava.config.text_config)
    expected = [
        prefill_flops([t + c for c in (16, 8, 8, 4)], shape, formula) / 1e12
        for t in (10, 6)
        for formula in ("swiglu", "fastv")
    ]
    shapes = ModelShapes(patches=N_IMAGE, grid=(1, N_IMAGE), decoder=shape, vision_flops=0,
                         context_length=512)  # fmt: skip
    got = flops_summary(shapes, method, rows)
    assert got["prefill_tflops"] == pytest.approx((expected[0] + expected[2]) / 2, rel=1e-12)
    assert got["prefill_tflops_fastv_formula"] == pytest.approx(
        (expected[1] + expected[3]) / 2, rel=1e-12
    )
