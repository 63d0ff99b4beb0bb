"""FastV inside the LLM: mask and prune variants agree, vanilla limits, eager oracle, restoration."""

from __future__ import annotations

import pytest
import torch
from tiny_llm import (
    ATOL,
    IMAGE_ID,
    N_IMAGE,
    TEXT_LAYERS,
    build_llava,
    make_batch,
    scale,
    text_config,
)

from recomp_eval.inject.llm_attention import llm_pruning
from recomp_eval.methods import budget_from_ratio, build_method
from recomp_eval.methods.fastv import FastVConfig, kept_count

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def llava():
    model = build_llava(seed=0)
    assert model.config.text_config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def batch():
    return make_batch(seed=1)


def _run(model, batch):
    """Prefill logits [B,L,V] and greedy generation (sequences, per-step scores)."""
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return logits, gen.sequences, torch.stack(gen.scores)


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _registered_names() -> set[str]:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return set(AttentionInterface._global_mapping) | set(AttentionMaskInterface._global_mapping)


def test_mask_and_prune_agree_with_cache(llava, batch):
    base_logits, _, _ = _run(llava, batch)
    results = {}
    for variant in ("mask", "prune"):
        cfg = FastVConfig(k_layer=2, ratio=0.5, variant=variant)
        with llm_pruning(llava, cfg, IMAGE_ID) as probe:
            results[variant] = (*_run(llava, batch), probe)
    m_logits, m_seq, m_scores, m_probe = results["mask"]
    p_logits, p_seq, p_scores, p_probe = results["prune"]
    keep = m_probe.keep_masks[0]  # [B,L] from the plain forward
    for probe in (m_probe, p_probe):  # forward + generate prefill, same selection each time
        assert len(probe.keep_masks) == 2
        assert all(torch.equal(k, keep) for k in probe.keep_masks + p_probe.keep_masks)
    image = batch["input_ids"] == IMAGE_ID
    assert torch.equal((keep & image).sum(1), torch.full((2,), N_IMAGE // 2))
    assert keep[~image].all()
    # prune returns the kept rows only; the mask variant's kept rows must match them
    index = torch.arange(keep.shape[1]).expand_as(keep)[keep].view(2, -1)  # [B,L']
    assert p_logits.shape[1] == index.shape[1]
    kept_mask_logits = m_logits.gather(1, index[..., None].expand(-1, -1, m_logits.shape[-1]))
    torch.testing.assert_close(kept_mask_logits, p_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(m_scores, p_scores, atol=ATOL, rtol=0)
    assert torch.equal(m_seq, p_seq)
    # pruning changed the model (otherwise agreement above would be vacuous)
    assert (m_logits[:, -1] - base_logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("k_layer", [TEXT_LAYERS, TEXT_LAYERS + 3])
def test_k_layer_at_or_beyond_the_depth_is_an_error(llava, k_layer):
    """It would prune nothing; silently returning the vanilla run would mislabel a table row."""
    cfg = FastVConfig(k_layer=k_layer, ratio=0.5)
    with (
        pytest.raises(ValueError, match=f"k_layer={k_layer} is at or beyond") as err,
        llm_pruning(llava, cfg, IMAGE_ID),
    ):
        pass
    assert "\n" not in str(err.value) and f"between 1 and {TEXT_LAYERS - 1}" in str(err.value)


@pytest.mark.parametrize(
    "cfg",
    [
        FastVConfig(k_layer=2, ratio=0.0, variant="prune"),
        FastVConfig(k_layer=1, ratio=0.0, variant="mask"),
    ],
    ids=["R=0-prune", "R=0-mask"],
)
def test_vanilla_limits_exact(llava, batch, cfg):
    base = _run(llava, batch)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe:
        out = _run(llava, batch)
    for a, b in zip(base, out):
        assert torch.equal(a, b)
    assert torch.equal(
        probe.mean_visual_tokens, torch.full((4,), float(N_IMAGE), dtype=torch.float64)
    )


def _eager_keep(model, batch, k_layer: int, score: str, keep_n: int) -> torch.Tensor:
    """Oracle: eager attention maps of layer K-1 -> [B,L] keep mask (top keep_n image positions)."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attn = model(**batch, output_attentions=True).attentions[k_layer - 1]  # [B,H,L,L]
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    if score == "last_query":
        scores = attn[:, :, -1].mean(dim=1)  # [B,L]
    else:
        valid = batch["attention_mask"].bool()  # padded query rows are excluded
        per_query = attn.mean(dim=1) * valid[:, :, None]  # [B,L,L]
        scores = per_query.sum(dim=1) / valid.sum(dim=1, keepdim=True)  # [B,L]
    image = batch["input_ids"] == IMAGE_ID
    keep = ~image
    for b in range(scores.shape[0]):
        pos = image[b].nonzero().squeeze(1)
        order = sorted(pos.tolist(), key=lambda p: -float(scores[b, p]))
        keep[b, order[:keep_n]] = True
    return keep


@pytest.mark.parametrize(("k_layer", "score"), [(2, "last_query"), (3, "mean_queries")])
def test_selection_matches_eager_reference(llava, batch, k_layer, score):
    cfg = FastVConfig(k_layer=k_layer, ratio=0.75, variant="prune", score=score)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava(**batch)
    expected = _eager_keep(llava, batch, k_layer, score, kept_count(N_IMAGE, cfg))
    assert torch.equal(probe.keep_masks[0], expected)


@pytest.mark.parametrize("variant", ["mask", "prune"])
def test_per_layer_counts(llava, batch, variant):
    cfg = FastVConfig(k_layer=1, retention=0.25, variant=variant)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava(**batch)
    k = budget_from_ratio(0.25, N_IMAGE)
    expected = [N_IMAGE] * cfg.k_layer + [k] * (TEXT_LAYERS - cfg.k_layer)
    assert probe.per_layer_counts.tolist() == [[c, c] for c in expected]
    mean = (cfg.k_layer * N_IMAGE + (TEXT_LAYERS - cfg.k_layer) * k) / TEXT_LAYERS
    assert probe.mean_visual_tokens.tolist() == [mean, mean]


def test_restored_after_block_and_on_error(llava, batch):
    before = _run(llava, batch)
    hooks, names = _hook_count(llava), _registered_names()
    with (
        pytest.raises(RuntimeError, match="boom"),
        llm_pruning(llava, FastVConfig(variant="prune"), IMAGE_ID),
    ):
        assert llava.config.text_config._attn_implementation.startswith("recomp_fastv_")
        assert llava.config.vision_config._attn_implementation == "sdpa"
        assert _hook_count(llava) > hooks
        raise RuntimeError("boom")
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert _hook_count(llava) == hooks and _registered_names() == names
    for a, b in zip(before, _run(llava, batch)):
        assert torch.equal(a, b)


def test_plain_llama_gqa_no_padding():
    """A causal LM with a fake image span; no padding, so sdpa passes mask=None (explicit causal)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = scale(LlamaForCausalLM(text_config()))
    text = torch.randint(3, IMAGE_ID, (2, 8))
    ids = torch.cat([text[:, :3], torch.full((2, N_IMAGE), IMAGE_ID), text[:, 3:]], dim=1)
    out = {}
    for variant in ("mask", "prune"):
        cfg = FastVConfig(k_layer=2, ratio=0.5, variant=variant, score="mean_queries")
        with llm_pruning(model, cfg, IMAGE_ID), torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        out[variant] = (gen.sequences, torch.stack(gen.scores))
    torch.testing.assert_close(out["mask"][1], out["prune"][1], atol=ATOL, rtol=0)
    assert torch.equal(out["mask"][0], out["prune"][0])
    assert model.config._attn_implementation == "sdpa"


def test_unequal_image_counts_raise(llava, batch):
    """Fixed-ratio FastV needs equal image counts per batch (called on the text model directly)."""
    ids = batch["input_ids"].clone()
    ids[0, -1] = IMAGE_ID
    text_model = llava.model.language_model
    with (
        llm_pruning(llava, FastVConfig(), IMAGE_ID),
        torch.no_grad(),
        pytest.raises(ValueError, match="same number of image tokens"),
    ):
        text_model(input_ids=ids, attention_mask=batch["attention_mask"])


def test_build_and_config_validation():
    method = build_method("fastv", k_layer=3, ratio=0.75, variant="mask")
    assert method.llm == FastVConfig(k_layer=3, ratio=0.75, variant="mask")
    assert method.spec.cls_attn is None and method.llm.retention is None
    assert build_method("fastv", retention=0.25).llm.retention == 0.25
    with pytest.raises(ValueError, match="unknown options"):
        build_method("fastv", layer=2)
    for bad in ({"k_layer": 0}, {"ratio": 1.0}, {"variant": "drop"}, {"score": "cls"}):
        with pytest.raises(ValueError):
            FastVConfig(**bad)
    n = 576
    assert kept_count(n, FastVConfig(ratio=0.5)) == round(n * 0.5)
    assert kept_count(n, FastVConfig(retention=1 / 3)) == budget_from_ratio(1 / 3, n)
    assert kept_count(n, FastVConfig(ratio=0.0)) == n
