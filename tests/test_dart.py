"""DART: the batched selection against a loop port of the release, and DART inside the tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_llm import ATOL, IMAGE_ID, N_IMAGE, TEXT_LAYERS, build_llava, make_batch

from recomp_eval.inject.llm_attention import llm_pruning
from recomp_eval.llm_methods.base import AttentionInputs, PruneView
from recomp_eval.methods import budget_from_ratio, build_method
from recomp_eval.methods.dart import DARTConfig, kept_count, take_plan

NEW_TOKENS = 5
START, N_IMG = 35, 576  # LLaVA-1.5: system prompt, then 576 image tokens


# -- the oracle: the released get_retained_image_token, batch 1, plain lists and sets ------------


def release_retained(state, keys, start, length, max_num, p_img, p_txt):
    """Sorted retained image indices; ``state`` [S,E] final-norm hidden, ``keys`` [H,S,d]."""
    topk = math.ceil(max_num // (p_img + p_txt))
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)  # [S,H*d]
    image_norm = torch.norm(flat[start : start + length], p=1, dim=-1)
    query_norm = torch.norm(flat[start + length :], p=1, dim=-1)
    image_idx = (image_norm.topk(p_img).indices + start).tolist()
    query_idx = (query_norm.topk(p_txt).indices + start + length).tolist()
    chosen = set(image_idx + query_idx)
    free = set(range(start, start + length)) - set(image_idx)
    free_list = list(free)
    for item in list(chosen):
        sim = -F.cosine_similarity(state[item, :], state[free_list, :], dim=-1)
        picked = [free_list[i] for i in sim.topk(topk).indices]
        chosen.update(picked)
        free.difference_update(picked)
        free_list = list(free)
    chosen.difference_update(query_idx)
    return sorted(chosen)


# -- realistic synthetic layer-(K-1) states ------------------------------------------------------


def sample_states(seed, length, width=1024, heads=32, kv_heads=32, head_dim=128):
    """One sample: raw hidden [S,E] (clustered, with outlier channels) and keys [Hkv,S,d]."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(24, width, generator=gen) * 2
    hidden = centers[torch.randint(0, 24, (length,), generator=gen)]
    hidden = hidden + torch.randn(length, width, generator=gen)
    hidden[:, :3] *= 40  # massive-activation channels
    tok = torch.exp(0.3 * torch.randn(length, 1, 1, generator=gen))  # per-token key scale
    keys = torch.randn(kv_heads, length, head_dim, generator=gen) * tok.transpose(0, 1)
    return hidden, keys


class Norm(torch.nn.Module):
    """An RMSNorm with a random weight (stands in for the decoder's final norm)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight.to(x.dtype) * (x.float() * torch.rsqrt(var + 1e-5)).to(x.dtype)


def make_view(samples, dtype, heads, norm):
    """Left-padded PruneView from per-sample (hidden, keys); returns (view, pads)."""
    length = max(h.shape[0] for h, _ in samples)
    b, width = len(samples), samples[0][0].shape[1]
    hkv, _, d = samples[0][1].shape
    gen = torch.Generator().manual_seed(99)
    hidden = torch.randn(b, length, width, generator=gen) * 5  # padding rows: junk
    keys = torch.randn(b, hkv, length, d, generator=gen) * 5
    image = torch.zeros(b, length, dtype=torch.bool)
    valid = torch.zeros(b, length, dtype=torch.bool)
    pads = []
    for i, (h, k) in enumerate(samples):
        pad = length - h.shape[0]
        pads.append(pad)
        hidden[i, pad:], keys[i, :, pad:] = h, k
        image[i, pad + START : pad + START + N_IMG] = True
        valid[i, pad:] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = None if not any(pads) else (causal & valid[:, None, :])[:, None]  # [B,1,L,L]
    query = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(b, heads, length, d)
    att = AttentionInputs(query, keys.to(dtype), keys.to(dtype), mask, d**-0.5)
    rows = torch.arange(length).expand(b, length)
    view = PruneView(0, 2, image, rows, image.sum(1), hidden.to(dtype), att, None, norm, None)
    return view, pads


def method_retained(cfg, view, pads):
    """Per sample, sorted retained image indices in unpadded coordinates."""
    keep = cfg.select(0, cfg.scores(0, view), view)
    out = []
    for i, pad in enumerate(pads):
        rows = (keep[i] & view.image_mask[i]).nonzero().squeeze(1) - pad
        out.append(rows.tolist())
    return out


def oracle_retained(sample, dtype, heads, norm, max_num, p_img=4, p_txt=4):
    hidden, keys = sample
    with torch.no_grad():
        state = norm(hidden.to(dtype)[None])[0]
    rep = keys.to(dtype).repeat_interleave(heads // keys.shape[0], dim=0)  # repeat_kv [H,S,d]
    return release_retained(state, rep, START, N_IMG, max_num, p_img, p_txt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_batched_selection_matches_the_release(dtype, budget):
    heads, width = 32, 1024
    samples = [sample_states(7 + budget, 650, width), sample_states(8 + budget, 637, width)]
    norm = Norm(width).to(dtype)
    cfg = DARTConfig(retention=budget / N_IMG)
    with torch.no_grad():
        expected = [oracle_retained(s, dtype, heads, norm, budget) for s in samples]
        batched = method_retained(cfg, *make_view(samples, dtype, heads, norm))
        alone = [method_retained(cfg, *make_view([s], dtype, heads, norm))[0] for s in samples]
    assert [len(e) for e in expected] == [4 + 8 * (budget // 8)] * 2
    assert alone == expected
    assert batched == expected


def test_full_width_gqa_and_exact_count():
    """Hidden 4096, GQA keys (8 kv heads repeated to 32), and the exact count rule."""
    heads, width = 32, 4096
    samples = [sample_states(3, 650, width, kv_heads=8), sample_states(4, 661, width, kv_heads=8)]
    norm = Norm(width)
    with torch.no_grad():
        expected = [oracle_retained(s, torch.float32, heads, norm, 64) for s in samples]
        view, pads = make_view(samples, torch.float32, heads, norm)
        assert method_retained(DARTConfig(retention=64 / N_IMG), view, pads) == expected
        # exact with M = 68: 4 pivots + 64 = 8 per pivot, the official rule at M = 64
        assert method_retained(DARTConfig(retention=68 / N_IMG, count="exact"), view, pads) == (
            expected
        )
        exact = method_retained(DARTConfig(retention=64 / N_IMG, count="exact"), view, pads)
    assert [len(e) for e in exact] == [64, 64]


def test_count_rules():
    for budget, kept in ((64, 68), (128, 132), (192, 196)):
        r = budget / N_IMG
        assert kept_count(N_IMG, DARTConfig(retention=r)) == kept
        assert kept_count(N_IMG, DARTConfig(retention=r, count="exact")) == budget
        counts = DARTConfig(retention=r).visual_counts(N_IMG, 32)
        assert counts == (N_IMG, N_IMG) + (kept,) * 30
    assert kept_count(N_IMG, DARTConfig()) == 132  # retention None: M = max_num_trunction = 128
    assert take_plan(N_IMG, DARTConfig(retention=0.1, count="exact")) == (4, (7,) * 6 + (6,) * 2)
    assert kept_count(16, DARTConfig(retention=1.0, pivot_image=2, pivot_text=2)) == 16
    assert take_plan(16, DARTConfig(retention=1.0, pivot_image=2, pivot_text=2)) == (
        2,
        (4, 4, 4, 2),
    )  # the pool runs out: the last pivot takes what is left
    assert kept_count(16, DARTConfig(retention=0.125, pivot_image=4, count="exact")) == 2
    for n in (1, 16, 576, 2880):
        for r in (0.05, 0.3, 1.0):
            assert kept_count(n, DARTConfig(retention=r, count="exact")) == budget_from_ratio(r, n)


# -- inside the tiny LLaVA (16 image tokens, 2 text tokens after the image) ----------------------

TINY = {"pivot_image": 2, "pivot_text": 2}


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=0)


@pytest.fixture(scope="module")
def batch():
    return make_batch(seed=1)


def _run(model, batch):
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


@pytest.mark.parametrize("count", ["official", "exact"])
def test_mask_and_prune_agree_with_cache(llava, batch, count):
    base_logits, _, _ = _run(llava, batch)
    out = {}
    for variant in ("mask", "prune"):
        cfg = DARTConfig(retention=0.5, count=count, variant=variant, **TINY)
        with llm_pruning(llava, cfg, IMAGE_ID) as probe:
            out[variant] = (*_run(llava, batch), probe)
    m_logits, m_seq, m_scores, m_probe = out["mask"]
    p_logits, p_seq, p_scores, p_probe = out["prune"]
    # forward, then generate's prefill: the same selection in both variants. Sample 0 is left
    # padded and generate shifts its positions (post-RoPE key norms are not shift-invariant)
    assert len(m_probe.keep_masks) == len(p_probe.keep_masks) == 2
    for m_keep, p_keep in zip(m_probe.keep_masks, p_probe.keep_masks):
        assert torch.equal(m_keep, p_keep)
    assert torch.equal(m_probe.keep_masks[0][1], m_probe.keep_masks[1][1])
    keep = m_probe.keep_masks[0]
    image = batch["input_ids"] == IMAGE_ID
    kept = kept_count(N_IMAGE, cfg)
    assert kept == (10 if count == "official" else 8)
    assert (keep & image).sum(1).tolist() == [kept, kept] and keep[~image].all()
    index = torch.arange(keep.shape[1]).expand_as(keep)[keep].view(2, -1)  # [B,L']
    kept_logits = m_logits.gather(1, index[..., None].expand(-1, -1, m_logits.shape[-1]))
    torch.testing.assert_close(kept_logits, p_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(m_scores, p_scores, atol=ATOL, rtol=0)
    assert torch.equal(m_seq, p_seq)
    assert (m_logits[:, -1] - base_logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("count", ["official", "exact"])
@pytest.mark.parametrize("variant", ["prune", "mask"])
def test_keeping_every_image_token_is_vanilla(llava, batch, count, variant):
    base = _run(llava, batch)
    cfg = DARTConfig(retention=1.0, count=count, variant=variant, k_layer=1, **TINY)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe:
        pruned = _run(llava, batch)
    for a, b in zip(base, pruned):
        assert torch.equal(a, b)
    assert probe.per_layer_counts.tolist() == [[N_IMAGE] * 4] * TEXT_LAYERS  # 2 prefills x B


@pytest.mark.parametrize("variant", ["mask", "prune"])
def test_per_layer_counts(llava, batch, variant):
    cfg = DARTConfig(k_layer=3, retention=0.25, variant=variant, **TINY)  # M=4: 2 + 4*1
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava(**batch)
    expected = [N_IMAGE] * 3 + [6]
    assert probe.per_layer_counts.tolist() == [[c, c] for c in expected]
    assert list(cfg.visual_counts(N_IMAGE, TEXT_LAYERS)) == expected


def test_batched_generate_keeps_what_each_sample_keeps_alone(llava, batch):
    """generate gives padded samples their unpadded positions: the batch selects as B = 1."""
    cfg = DARTConfig(retention=0.5, **TINY)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava.generate(**batch, max_new_tokens=1, do_sample=False)
        for i in range(2):
            valid = batch["attention_mask"][i].bool()
            alone = {k: v[i : i + 1] for k, v in batch.items() if k != "attention_mask"}
            alone["input_ids"] = alone["input_ids"][:, valid]
            llava.generate(**alone, max_new_tokens=1, do_sample=False)
    batched, *alone = probe.keep_masks
    for i, single in enumerate(alone):
        assert torch.equal(batched[i][batch["attention_mask"][i].bool()], single[0])


def test_selection_matches_the_release_inside_the_model(llava, batch):
    """Sample 1 alone (no padding): layer K-1's keys and output, recomputed, through the oracle."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    k_layer, cfg = 2, DARTConfig(retention=0.5, **TINY)
    sample = {k: v[1:] for k, v in batch.items()}
    text = llava.model.language_model
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava(**sample)
    with torch.no_grad():
        states = llava(**sample, output_hidden_states=True).hidden_states  # embeddings + layers
        layer = text.layers[k_layer - 1]
        x = layer.input_layernorm(states[k_layer - 1])  # [1,S,E]
        attn = layer.self_attn
        key = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = text.rotary_emb(x, torch.arange(x.shape[1])[None])
        _, key = apply_rotary_pos_emb(key, key, cos, sin)  # [1,Hkv,S,d]
        heads = llava.config.text_config.num_attention_heads
        rep = key[0].repeat_interleave(heads // key.shape[1], dim=0)  # [H,S,d]
        start = int((sample["input_ids"][0] == IMAGE_ID).nonzero()[0])
        expected = release_retained(text.norm(states[k_layer])[0], rep, start, N_IMAGE, 8, 2, 2)
    kept = (probe.keep_masks[0][0] & (sample["input_ids"][0] == IMAGE_ID)).nonzero()
    assert kept.squeeze(1).tolist() == expected


def test_restored_after_block(llava, batch):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in llava.modules())
    before = _run(llava, batch)
    with llm_pruning(llava, DARTConfig(retention=0.5, **TINY), IMAGE_ID):
        assert llava.config.text_config._attn_implementation.startswith("recomp_dart_")
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in llava.modules()) == hooks
    for a, b in zip(before, _run(llava, batch)):
        assert torch.equal(a, b)


def test_in_model_errors_are_one_line(llava, batch):
    cases = [
        (DARTConfig(k_layer=TEXT_LAYERS), "k_layer=4 is at or beyond", batch),
        (DARTConfig(retention=0.5), "at least pivot_text=4 tokens after the image", batch),
    ]
    ids = batch["input_ids"].clone()
    ids[0, -1] = IMAGE_ID
    unequal = {**batch, "input_ids": ids}
    cases.append((DARTConfig(**TINY), "same number of image tokens", unequal))
    text = llava.model.language_model
    for cfg, match, inputs in cases:
        with (
            pytest.raises(ValueError, match=match) as err,
            llm_pruning(llava, cfg, IMAGE_ID),
            torch.no_grad(),
        ):
            text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        assert "\n" not in str(err.value)


def test_build_and_config_validation():
    method = build_method("dart", retention=0.25, k_layer=3, count="exact", variant="mask")
    assert method.llm == DARTConfig(retention=0.25, k_layer=3, count="exact", variant="mask")
    assert method.spec.cls_attn is None and method.config["pivot_image"] == 4
    assert build_method("dart").llm == DARTConfig()
    with pytest.raises(ValueError, match="unknown options") as err:
        build_method("dart", pivots=4)
    assert "\n" not in str(err.value)
    bad = [
        {"k_layer": 0},
        {"k_layer": True},
        {"pivot_image": -1},
        {"pivot_text": 1.5},
        {"pivot_image": 0, "pivot_text": 0},
        {"count": "fixed"},
        {"variant": "drop"},
        {"retention": 1.5},
        {"max_num_trunction": 0},
    ]
    for options in bad:
        with pytest.raises(ValueError) as err:
            build_method("dart", **options)
        assert "\n" not in str(err.value), options
