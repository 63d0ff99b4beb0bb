"""PyramidDrop inside the LLM: a loop port of the released ``pdrop_rank_drop`` as the oracle.

The oracle (:func:`release_rank_drop`, :func:`release_forward`) follows the release per sample on
plain unpadded tensors: the stage layer's norm/q/k on the previous layer's output, RoPE at the
current positions, the last instruction token as the only query, eager causal softmax in fp32 cast
to the model dtype, head mean, top ``int(N * ratio)`` of the ORIGINAL ``N``, sorted, rebuilt as
prefix + kept + suffix with positions 0..L'-1. Its one change: ``repeat_kv`` for GQA (the tiny
Llama has 2 key/value heads for 4 query heads; LLaVA-1.5 has none, where the release has none).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_llm import (
    IMAGE_ID,
    N_IMAGE,
    TEXT_LAYERS,
    build_llava,
    make_batch,
    text_config,
)

from recomp_eval.inject.llm_attention import llm_pruning
from recomp_eval.llm_methods.base import AttentionInputs, LLMPruner, PruneView, layer_counts
from recomp_eval.methods import budget_from_ratio, build_method
from recomp_eval.methods.pdrop import PDropConfig, ratios_for_retention, stage_counts

NEW_TOKENS = 4
LAYERS = (1, 2, 3)  # fits the tiny model's 4 decoder layers
RATIOS = (0.5, 0.25, 0.125)  # released: 16 -> 8 / 4 / 2
TOL = 1e-5


# -- the oracle ----------------------------------------------------------------------------------


def release_rank_drop(layer, rotary, features, image_index, cur_images, keep, prompt_len):
    """One sample, one stage, as the release: -> (kept image rows sorted [K], scores [cur_images]).

    ``features`` [L,E] hidden states after the previous layer (no padding), ``layer`` the stage
    layer (``self.layers[rank_layer]``), ``prompt_len`` the prompt's text-token count.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    n_heads, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    head_dim = attn.head_dim
    q_len = features.shape[0]
    hidden = layer.input_layernorm(features[None])  # [1,L,E]
    query = attn.q_proj(hidden).view(1, q_len, n_heads, head_dim).transpose(1, 2)
    key = attn.k_proj(hidden).view(1, q_len, n_kv, head_dim).transpose(1, 2)
    position_ids = torch.arange(q_len)[None]  # renumbered after every stage
    cos, sin = rotary(hidden, position_ids)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key = repeat_kv(key, n_heads // n_kv)  # GQA (the release's LLaVA-1.5 has n_kv == n_heads)
    dtype = query.dtype
    causal = torch.full((q_len, q_len), torch.finfo(dtype).min, dtype=dtype).triu(1)  # [L,L]
    q_index = prompt_len + cur_images - 1  # the last instruction token
    text_query = query[0][:, q_index, :].unsqueeze(1)  # [H,1,d]
    weights = torch.matmul(text_query, key[0].transpose(1, 2)) / math.sqrt(head_dim)  # [H,1,L]
    weights = weights + causal[q_index][None, None]
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(dtype)
    avg_head = torch.mean(weights, dim=0)[:, image_index : image_index + cur_images]  # [1,n]
    avg_text = torch.mean(avg_head, dim=0)  # [n]
    top = avg_text.topk(keep).indices + image_index
    return top.sort().values, avg_text


def release_forward(llava, embeds, image_index, n_image, prompt_len, layers, ratios):
    """One sample through the decoder layer by layer with the release's drops.

    Args:
        embeds: [S,E] input embeddings (no padding); the image span is ``image_index + [0, N)``.
        prompt_len: text tokens of the prompt (the query is its last one even if ``embeds``
            carries generated tokens after it: causality makes the selection the prefill's).
    Returns:
        logits [S',V] of the kept rows, kept rows [S'] (indices into ``embeds``), counts per layer.
    """
    text_model = llava.model.language_model
    hidden, rows, counts = embeds, torch.arange(embeds.shape[0]), []
    full = (1.0, *ratios)
    current = n_image
    with torch.no_grad():
        for i, layer in enumerate(text_model.layers):
            if i in layers:
                s = layers.index(i)
                current = int(n_image * full[s])
                keep = int(n_image * full[s + 1])
                kept, _ = release_rank_drop(
                    layer, text_model.rotary_emb, hidden, image_index, current, keep, prompt_len
                )
                end = image_index + current
                order = torch.cat([torch.arange(image_index), kept, torch.arange(end, len(rows))])
                hidden, rows, current = hidden[order], rows[order], keep
            counts.append(current)
            n = hidden.shape[0]
            pos = torch.arange(n)[None]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            hidden = layer(
                hidden[None],
                attention_mask=mask,
                position_embeddings=text_model.rotary_emb(hidden[None], pos),
                position_ids=pos,
            )[0]
        return llava.lm_head(text_model.norm(hidden)), rows, counts


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=0)


@pytest.fixture(scope="module")
def batch():
    return make_batch(seed=5)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """[B,S] bool -> [B,S] position ids as generate makes them (pads at 1)."""
    return (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 1)


def _embeds(llava, batch) -> torch.Tensor:
    """[B,S,E] the LLM's input embeddings (image features scattered in)."""
    seen = {}

    def grab(module, args, kwargs) -> None:
        seen["e"] = kwargs["inputs_embeds"]

    handle = llava.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            llava(**batch)
    finally:
        handle.remove()
    return seen["e"]


def _oracle(llava, batch, new=None):
    """Per sample: (logits [S',V], kept rows [S'] into the padded prompt, counts) of the release."""
    embeds = _embeds(llava, batch)
    valid = batch["attention_mask"].bool()
    image = batch["input_ids"] == IMAGE_ID
    out = []
    for j in range(embeds.shape[0]):
        idx = valid[j].nonzero().squeeze(1)  # [n] valid prompt rows
        sample = embeds[j, idx]
        if new is not None:  # teacher-forced generated tokens after the prompt
            with torch.no_grad():
                sample = torch.cat([sample, llava.get_input_embeddings()(new[j])], dim=0)
        start = int(image[j, idx].nonzero()[0])
        logits, rows, counts = release_forward(
            llava, sample, start, N_IMAGE, len(idx) - N_IMAGE, LAYERS, RATIOS
        )
        full = torch.cat([idx, torch.arange(sample.shape[0] - len(idx)) + valid.shape[1]])
        out.append((logits, full[rows], counts))
    return out


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _names() -> set[str]:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | set(AttentionMaskInterface._global_mapping)


def _generate(llava, batch):
    with torch.no_grad():
        gen = llava.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return gen.sequences[:, batch["input_ids"].shape[1] :], torch.stack(gen.logits, dim=1)


# -- scoring against the release at LLaVA-1.5 sizes ----------------------------------------------

N_REAL, OFFSET, SUFFIXES = 576, 35, (40, 37)  # 651 and 648 rows; sample 1 left-padded by 3


@pytest.fixture(scope="module")
def real_layout():
    """A tiny Llama layer with peaked attention and a 2-sample, 576-image-row batch."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = text_config()
    layer = LlamaDecoderLayer(cfg, layer_idx=1).eval()
    with torch.no_grad():  # logits of std ~2.6 so that the top-k has margins
        layer.self_attn.q_proj.weight.mul_(3.0)
        layer.self_attn.k_proj.weight.mul_(3.0)
    lengths = [OFFSET + N_REAL + s for s in SUFFIXES]
    seq = max(lengths)
    hidden = torch.randn(2, seq, cfg.hidden_size)
    valid = torch.zeros(2, seq, dtype=torch.bool)
    image = torch.zeros(2, seq, dtype=torch.bool)
    for j, n in enumerate(lengths):
        valid[j, seq - n :] = True
        image[j, seq - n + OFFSET : seq - n + OFFSET + N_REAL] = True
    return layer, LlamaRotaryEmbedding(cfg), hidden, valid, image


def _view(layer, rotary, hidden, valid, image) -> PruneView:
    b, seq, _ = hidden.shape
    pos = _positions(valid)  # [B,L]
    cos_sin = rotary(hidden, pos)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = None if bool(valid.all()) else (causal[None] & valid[:, None])[:, None]
    none = torch.empty(0)
    return PruneView(
        stage=0,
        layer=1,
        image_mask=image,
        rows=torch.arange(seq).expand(b, seq),
        prompt_images=image.sum(dim=1),
        hidden=hidden,
        attention=AttentionInputs(none, none, none, mask, 0.25),
        position_embeddings=cos_sin,
        norm=None,
        module=layer,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scores_and_selection_match_the_release(real_layout, dtype):
    """Batched (left-padded) scores/selection = the release per sample = each sample alone."""
    layer, rotary, hidden, valid, image = real_layout
    layer, hidden = copy.deepcopy(layer).to(dtype), hidden.to(dtype)
    cfg = PDropConfig(layer_list=(1,), ratios=(0.5,))
    k = int(N_REAL * 0.5)
    rtol = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        view = _view(layer, rotary, hidden, valid, image)
        scores = cfg.scores(0, view)  # [B,L]
        keep = cfg.select(0, scores, view)  # [B,L]
    assert keep.dtype == torch.bool and (keep & image).sum(1).tolist() == [k, k]
    assert keep[~image].all()
    for j in range(2):
        v = valid[j]
        with torch.no_grad():
            kept, ref = release_rank_drop(
                layer, rotary, hidden[j, v], OFFSET, N_REAL, k, int(v.sum()) - N_REAL
            )
            alone = _view(layer, rotary, hidden[j, v][None], v[v][None], image[j, v][None])
            alone_scores = cfg.scores(0, alone)[0]  # [n]
            alone_keep = cfg.select(0, cfg.scores(0, alone), alone)[0]  # [n]
        ref = ref.float()  # [N] scores of the image rows
        top = ref.sort(descending=True).values
        cut, margin = float(top[k - 1]), float(top[k - 1] - top[k])
        near = (ref - cut).abs() <= 2 * rtol * cut  # [N] rows scored like the k-th one
        for got_scores, got_keep in ((scores[j, v], keep[j, v]), (alone_scores, alone_keep)):
            torch.testing.assert_close(got_scores[image[j, v]], ref, rtol=rtol, atol=0)
            got_kept = (got_keep & image[j, v]).nonzero().squeeze(1)  # [K] rows of the sample
            if dtype == torch.float32:
                assert margin > 10 * rtol * cut  # no near-tie at the cut: identical sets
                assert torch.equal(got_kept, kept)
            else:  # fp16 rounds scores into ties: sets may differ only among near-cut rows
                differ = set(got_kept.tolist()) ^ set(kept.tolist())
                assert all(bool(near[i - OFFSET]) for i in differ)


# -- the tiny LLaVA end to end -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["prune", "mask"])
def test_prefill_matches_the_release_forward(llava, batch, variant):
    cfg = PDropConfig(layer_list=LAYERS, ratios=RATIOS, variant=variant)
    assert isinstance(cfg, LLMPruner)
    valid = batch["attention_mask"].bool()
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        logits = llava(**batch, position_ids=_positions(valid)).logits
    keep = probe.keep_masks[0]  # [B,L]
    counts = cfg.visual_counts(N_IMAGE, TEXT_LAYERS)
    assert counts == (16, 8, 4, 2) and stage_counts(N_IMAGE, RATIOS) == (8, 4, 2)
    assert probe.per_layer_counts.tolist() == [[c, c] for c in counts]
    for j, (ref_logits, ref_rows, ref_counts) in enumerate(_oracle(llava, batch)):
        assert ref_counts == list(counts)
        kept_rows = keep[j].nonzero().squeeze(1)  # [S'] kept prompt rows, pads included
        real = valid[j, kept_rows]  # [S']
        assert torch.equal(kept_rows[real], ref_rows)
        got = logits[j, kept_rows] if variant == "mask" else logits[j]  # [S',V]
        torch.testing.assert_close(got[real], ref_logits, atol=TOL, rtol=TOL)


def test_generation_prune_mask_and_release_agree(llava, batch):
    """KV-cache decode (pruned caches, shifted positions) in both variants and the oracle."""
    base = _generate(llava, batch)
    out = {}
    for variant in ("prune", "mask"):
        cfg = PDropConfig(layer_list=LAYERS, ratios=RATIOS, variant=variant)
        with llm_pruning(llava, cfg, IMAGE_ID) as probe:
            out[variant] = _generate(llava, batch)
        assert probe.per_layer_counts.tolist() == [[c, c] for c in (16, 8, 4, 2)]
    new, logits = out["prune"]  # [B,T], [B,T,V]
    assert torch.equal(out["mask"][0], new)
    torch.testing.assert_close(out["mask"][1], logits, atol=TOL, rtol=0)
    assert (logits - base[1]).abs().max() > 1e-3  # pruning changed the model
    for j, (ref_logits, _, _) in enumerate(_oracle(llava, batch, new=new[:, :-1])):
        torch.testing.assert_close(logits[j], ref_logits[-NEW_TOKENS:], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("variant", ["prune", "mask"])
def test_ratios_one_is_exactly_vanilla(llava, batch, variant):
    with torch.no_grad():
        base = (llava(**batch).logits, *_generate(llava, batch))
    cfg = PDropConfig(layer_list=LAYERS, ratios=(1.0, 1.0, 1.0), variant=variant)
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        out = (llava(**batch).logits, *_generate(llava, batch))
    for a, b in zip(base, out):
        assert torch.equal(a, b)
    assert probe.mean_visual_tokens.tolist() == [float(N_IMAGE)] * 4  # 2 prefills x 2 samples


def test_restored_after_block_and_on_error(llava, batch):
    with torch.no_grad():
        before = llava(**batch).logits
    hooks, names = _hooks(llava), _names()
    with (
        pytest.raises(RuntimeError, match="boom"),
        llm_pruning(llava, PDropConfig(layer_list=LAYERS), IMAGE_ID),
    ):
        assert llava.config.text_config._attn_implementation.startswith("recomp_pdrop_")
        assert _hooks(llava) > hooks
        raise RuntimeError("boom")
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert _hooks(llava) == hooks and _names() == names
    with torch.no_grad():
        assert torch.equal(before, llava(**batch).logits)


def test_unequal_image_counts_raise(llava, batch):
    ids = batch["input_ids"].clone()
    ids[0, -1] = IMAGE_ID
    with (
        llm_pruning(llava, PDropConfig(layer_list=LAYERS), IMAGE_ID),
        torch.no_grad(),
        pytest.raises(ValueError, match="same number of image tokens") as err,
    ):
        llava.model.language_model(input_ids=ids, attention_mask=batch["attention_mask"])
    assert "\n" not in str(err.value)


def test_released_layers_on_a_shallow_model_are_one_line_errors(llava):
    with (
        pytest.raises(ValueError, match=r"method\.layer_list=\[1,2,3\]") as err,
        llm_pruning(llava, PDropConfig(), IMAGE_ID),
    ):
        pass
    assert "\n" not in str(err.value) and "4 decoder layers" in str(err.value)
    cfg = PDropConfig(layer_list=LAYERS, retention=0.5)  # num_layers defaults to 32
    with pytest.raises(ValueError, match=r"set method\.num_layers=4") as err:
        cfg.check_depth(TEXT_LAYERS)
    assert "\n" not in str(err.value)


# -- budgets -------------------------------------------------------------------------------------


def test_released_counts_and_mean():
    cfg = PDropConfig()
    assert cfg.stage_counts(576) == (288, 144, 72)
    counts = cfg.visual_counts(576, 32)
    assert counts == (576,) * 8 + (288,) * 8 + (144,) * 8 + (72,) * 8
    assert sum(counts) / 32 == 270.0
    assert stage_counts(577, (0.5, 0.3)) == (288, 173)  # floors of the original count


@pytest.mark.parametrize("retention", [1 / 3, 0.3, 0.5, 0.8, 1.0])
def test_retention_mapping_is_the_closest_geometric_pyramid(retention):
    layers, depth, n = (8, 16, 24), 32, 576
    ratios = ratios_for_retention(retention, layers, depth, n)
    lam = ratios[0]
    assert ratios == pytest.approx((lam, lam**2, lam**3), rel=1e-12)
    cfg = PDropConfig(retention=retention)
    assert cfg.stage_ratios(n) == ratios
    target = budget_from_ratio(retention, n)
    achieved = sum(cfg.visual_counts(n, depth)) / depth

    def mean(x: float) -> float:
        steps = dict(zip(layers, stage_counts(n, (x, x**2, x**3))))
        return sum(layer_counts(n, depth, steps)) / depth

    best = min(abs(mean(x) - target) for x in torch.linspace(0, 1, 20001).tolist())  # brute force
    assert abs(achieved - target) <= best + 1e-12
    assert abs(achieved - target) <= 8 * 3 / depth  # within the floors' reach
    if retention == 1.0:
        assert ratios == (1.0, 1.0, 1.0)


def test_retention_on_the_tiny_model(llava, batch):
    cfg = PDropConfig(layer_list=LAYERS, retention=0.5, num_layers=TEXT_LAYERS)
    counts = cfg.visual_counts(N_IMAGE, TEXT_LAYERS)
    assert sum(counts) / TEXT_LAYERS == budget_from_ratio(0.5, N_IMAGE)  # 8 exactly
    with llm_pruning(llava, cfg, IMAGE_ID) as probe, torch.no_grad():
        llava(**batch)
    assert probe.per_layer_counts.tolist() == [[c, c] for c in counts]


# -- config --------------------------------------------------------------------------------------


def test_build_and_config_validation():
    method = build_method("pdrop", layer_list=[2, 6, 12], ratios=[0.5, 0.25, 0.125], variant="mask")
    assert method.llm == PDropConfig(layer_list=(2, 6, 12), variant="mask")
    assert method.llm.positions == "renumber" and method.spec.cls_attn is None
    assert method.config["layer_list"] == [2, 6, 12]
    assert build_method("pdrop").llm == PDropConfig()
    assert build_method("pdrop", retention=0.5).llm.stage_counts(576)[0] > 288
    with pytest.raises(ValueError, match="unknown options"):
        build_method("pdrop", layers=[1, 2])
    bad = [
        {"layer_list": [8, 8, 24]},
        {"layer_list": [0, 8, 16]},
        {"layer_list": 8},
        {"layer_list": [8.0, 16, 24]},
        {"layer_list": []},
        {"ratios": [0.5, 0.25]},
        {"ratios": [0.25, 0.5, 0.125]},
        {"ratios": [1.5, 0.5, 0.25]},
        {"ratios": [True, 0.5, 0.25]},
        {"variant": "official"},
        {"retention": 1.5},
        {"retention": 0.1},  # the first 8 of 32 layers already average 0.25 N
        {"num_layers": 16, "retention": 0.5},  # below the last stage layer
        {"num_layers": 1.5},
    ]
    for options in bad:
        with pytest.raises(ValueError) as err:
            build_method("pdrop", **options)
        assert "\n" not in str(err.value), options
    with pytest.raises(ValueError, match=r"first layer <= retention \* num_layers = 3\.2,"):
        PDropConfig(retention=0.1)
