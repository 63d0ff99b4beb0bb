"""Vision and text signals on the tiny model, against eager attention and direct HF calls."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval.inject.context import compress
from recomp_eval.methods import BuiltMethod, SignalSpec, TextSpec
from recomp_eval.methods.identity import compress as identity
from recomp_eval.models.llava.adapter import run_tower
from recomp_eval.models.llava.conversation import render_prompt
from recomp_eval.models.llava.loader import load_clip_text
from recomp_eval.models.llava.tiny import load_tiny
from recomp_eval.pipeline import generate, prepare_batch
from recomp_eval.signals.text import encode_texts, first_line
from recomp_eval.signals.vision import joint_space_similarity, resolve_layer, sample_seeds


@pytest.fixture(scope="module")
def bundle():
    return load_tiny()


@pytest.fixture(scope="module")
def pixels(bundle):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (90, 112, 3), dtype=np.uint8)) for _ in range(2)]
    return prepare_batch(bundle, images, ["q", "q"], "llava15").pixel_values


def _eager_tower(bundle, heads: int | None = None):
    """A copy of the LLaVA tower with eager attention (optionally re-split into ``heads``)."""
    from transformers import CLIPVisionModel

    tower = bundle.model.model.vision_tower
    cfg = copy.deepcopy(tower.config)
    if heads is not None:
        cfg.num_attention_heads = heads
    cfg._attn_implementation = "eager"
    eager = CLIPVisionModel(cfg).eval()
    eager.load_state_dict(tower.state_dict())
    return eager


def _run(bundle, pixels, spec):
    method = BuiltMethod(name="probe", spec=spec, fn=identity)
    with compress(bundle.model, method) as probe:
        out = run_tower(bundle.model, pixels, spec, probe)
    return out, probe


@pytest.mark.parametrize("layer", [-1, -2])
def test_mean_heads_cls_attention_matches_eager(bundle, pixels, layer):
    out, _ = _run(bundle, pixels, SignalSpec(cls_attn="mean_heads", cls_attn_layer=layer))
    eager = _eager_tower(bundle)
    with torch.no_grad():
        attn = eager(pixels, output_attentions=True).attentions  # L x [B,H,N+1,N+1]
    idx = resolve_layer(layer, eager.config.num_hidden_layers)
    ref = attn[idx][:, :, 0, 1:].mean(dim=1)  # [B,N]
    torch.testing.assert_close(out.signals.cls_attn, ref, atol=1e-6, rtol=1e-5)


def test_concat_heads_cls_attention_matches_single_head_eager(bundle, pixels):
    out, _ = _run(bundle, pixels, SignalSpec(cls_attn="concat_heads", cls_attn_layer=-1))
    tower = bundle.model.model.vision_tower
    eager = _eager_tower(bundle, heads=1)  # one C-wide head: scale C**-0.5
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True).hidden_states
        layer = eager.encoder.layers[-1]  # last layer alone, fed the real layer input
        _, attn = layer.self_attn(layer.layer_norm1(hs[-2]), output_attentions=True)
    ref = attn[:, 0, 0, 1:]  # [B,N], CLS->CLS dropped
    torch.testing.assert_close(out.signals.cls_attn, ref, atol=1e-6, rtol=1e-5)
    assert (out.signals.cls_attn.sum(-1) < 1).all()


@pytest.mark.parametrize("form", ["full", "mean_heads"])
def test_keys_equal_k_proj_of_layer_input(bundle, pixels, form):
    out, _ = _run(bundle, pixels, SignalSpec(keys=form, keys_layer=-2))
    tower = bundle.model.model.vision_tower
    n_layers, heads = tower.config.num_hidden_layers, tower.config.num_attention_heads
    idx = resolve_layer(-2, n_layers)
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[idx]
        k = layer.self_attn.k_proj(layer.layer_norm1(hs[idx]))[:, 1:]  # [B,N,C]
    if form == "mean_heads":
        b, n, c = k.shape
        k = k.view(b, n, heads, c // heads).mean(2)
    torch.testing.assert_close(out.signals.keys, k)


def test_features_and_cls_feature(bundle, pixels):
    out, _ = _run(bundle, pixels, SignalSpec(cls_feature=True))
    with torch.no_grad():
        ref = bundle.model.model.get_image_features(pixel_values=pixels)
        feats = bundle.model.model.multi_modal_projector(out.signals.features)
    torch.testing.assert_close(feats, torch.stack(ref.pooler_output))
    assert out.signals.cls_feature.shape == (2, bundle.model.config.vision_config.hidden_size)


def test_second_vit_pass_same_values(bundle, pixels):
    one, p1 = _run(bundle, pixels, SignalSpec(keys="full", vit_passes=1))
    two, p2 = _run(bundle, pixels, SignalSpec(keys="full", vit_passes=2))
    assert set(p1.vision.calls.values()) == {1} and set(p2.vision.calls.values()) == {2}
    torch.testing.assert_close(one.last_hidden, two.last_hidden)


def test_missing_layer_raises(bundle):
    with pytest.raises(ValueError, match="does not exist"):
        _run(bundle, None, SignalSpec(cls_attn="mean_heads", cls_attn_layer=-99))


def test_text_pooling_matches_hf(bundle):
    clip = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    assert load_clip_text(bundle.clip_text_id, "float32", "cpu") is clip  # once per process
    texts = ["What is in the image?", "How many people are there in the street today?"]
    eot = encode_texts(clip, texts, TextSpec(source="question", max_len=77, pool="eot"))
    full = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = clip.model(**full).text_embeds
    torch.testing.assert_close(eot, ref, atol=1e-5, rtol=1e-5)
    last = encode_texts(clip, texts, TextSpec(source="first_line", max_len=5, pool="last"))
    short = clip.tokenizer(
        texts, padding="max_length", truncation=True, max_length=5, return_tensors="pt"
    )
    with torch.no_grad():
        h = clip.model(**short).last_hidden_state[:, 4]
        torch.testing.assert_close(last, clip.model.text_projection(h))


def test_joint_space_similarity_matches_clip(bundle, pixels):
    from transformers import CLIPModel

    clip_text = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    e_t = torch.randn(2, clip_text.visual_projection.out_features)
    out, _ = _run(bundle, pixels, SignalSpec())
    s = joint_space_similarity(e_t, out.last_hidden, clip_text.visual_projection)
    clip = CLIPModel.from_pretrained(bundle.clip_text_id).eval()
    with torch.no_grad():
        z = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # pre post_layernorm
        p = clip.visual_projection(z)
    d = p.shape[-1]
    ref = torch.nn.functional.cosine_similarity(e_t[:, None], p, dim=-1) / d**0.5
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["llava15", "lmms_eval"])
def test_first_line_is_first_prompt_line(bundle, protocol):
    prompt = render_prompt(protocol, "What colour is the bus?", bundle.tokenizer, bundle.processor)
    ids = bundle.tokenizer(prompt)["input_ids"]
    line = first_line(ids, bundle.tokenizer, bundle.image_token_id)
    expect = bundle.tokenizer.bos_token + prompt.split("\n")[0].replace(bundle.image_token, "")
    assert line == expect
    assert "bus" not in line


def test_official_text_path_is_constant_question_path_is_not(bundle):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    questions = ["What colour is the bus?", "How many people are there?"]
    sims = {}
    for source, max_len, pool in (("first_line", 20, "last"), ("question", 77, "eot")):
        seen = []

        def fn(signals, seen=seen):
            seen.append(signals.text_sim.clone())
            return identity(signals)

        spec = SignalSpec(text=TextSpec(source=source, max_len=max_len, pool=pool))
        generate(
            bundle,
            BuiltMethod("cap", spec, fn),
            [image, image],
            questions,
            questions,
            "llava15",
            ["a", "b"],
            1,
        )
        sims[source] = seen[0]
    torch.testing.assert_close(sims["first_line"][0], sims["first_line"][1])
    assert not torch.allclose(sims["question"][0], sims["question"][1])


def test_seeds_stable_and_distinct():
    a = sample_seeds(["x", "y", "x"])
    assert a.dtype == torch.int64 and a[0] == a[2] and a[0] != a[1] and (a >= 0).all()
    assert torch.equal(a, sample_seeds(["x", "y", "x"]))


def test_text_segments_match_the_released_layout(bundle):
    """CDPruner's long texts: the ids right-padded with id 0 / mask 0 to a multiple of 77,
    each 77-id segment embedded on its own (the release does it per sample, batch 1)."""
    from recomp_eval.signals.text import encode_text_embeddings

    clip = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    long = " ".join(["a red square next to a blue circle"] * 12)  # > 77 CLIP tokens
    texts = ["What is in the image?", long]
    spec = TextSpec(max_len=77, output="embeddings", segments=True)
    embeds, mask = encode_text_embeddings(clip, texts, spec)
    assert mask[0].tolist() == [True] + [False] * (mask.shape[1] - 1) and mask[1].all()
    assert mask.shape[1] > 1 and not embeds[0, 1:].any()
    for i, text in enumerate(texts):
        ids = clip.tokenizer(text=[text], return_tensors="pt")
        segments = (ids.input_ids.shape[1] - 1) // 77 + 1
        pad = 77 * segments - ids.input_ids.shape[1]
        inputs = {k: torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, 77) for k, v in ids.items()}
        with torch.no_grad():
            ref = clip.model(**inputs).text_embeds  # [M,D]
        torch.testing.assert_close(embeds[i, : len(ref)], ref, atol=1e-5, rtol=1e-5)
    one, one_mask = encode_text_embeddings(clip, texts, TextSpec(output="embeddings"))
    assert one.shape[1] == 1 and one_mask.all()
    torch.testing.assert_close(one[:, 0], encode_texts(clip, texts, TextSpec()), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["ln_in_tower_dtype", "fp32"])
def test_patch_embeds_are_the_projected_post_ln_feature_layer(bundle, pixels, mode):
    clip = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    spec = SignalSpec(patch_embeds=mode)
    with compress(bundle.model, BuiltMethod(name="probe", spec=spec, fn=identity)) as probe:
        done = bundle.adapter.tower_pass(bundle, pixels, probe)
        out = bundle.adapter.signals(bundle, done, spec)
    tower = bundle.model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        layer = hidden[bundle.model.config.vision_feature_layer][:, 1:]  # [B,N,C]
        ref = clip.visual_projection(tower.post_layernorm(layer))  # [B,N,D]
    assert out.signals.patch_embeds.dtype == torch.float32
    torch.testing.assert_close(out.signals.patch_embeds, ref, atol=1e-5, rtol=1e-5)


def test_user_text_source_is_the_user_turn_and_needs_one_per_sample():
    from recomp_eval.signals.text import select_texts

    spec = TextSpec(source="user_text")
    turns = ["What is red?\nAnswer the question using a single word or phrase."]
    assert select_texts(spec, ["What is red?"], [[1, 2]], None, 0, turns) == turns
    with pytest.raises(ValueError, match="one user turn per sample"):
        select_texts(spec, ["What is red?"], [[1, 2]], None, 0, ())
