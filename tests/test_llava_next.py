"""LLaVA-NeXT (anyres) family, first step: the offline tiny checkpoint and the pure steps of
``recomp_eval.models.llava_next.packing`` checked against stock transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recomp_eval.models.llava_next.packing import (
    crop_features,
    crops_per_image,
    expand_image_tokens,
    forward_with_features,
    generate_with_features,
    pack,
    pack_kept,
    pack_layout,
    packed_keep,
    project_crops,
)
from recomp_eval.models.llava_next.tiny import (
    SPEC_FILE,
    TinyNextSpec,
    build_tiny_next,
    load_tiny_next,
)

# (height, width): 56 x 112 fits the (56, 112) pinpoint exactly (no unpadding);
# 70 x 100 goes to (112, 112) and loses 2 of its 8 patch rows to unpadding
WIDE_EXACT = (56, 112)
PADDED = (70, 100)
MORE_SIZES = [(100, 70), (90, 40), (40, 90), (50, 170), (60, 60), (112, 112), (30, 200)]


def _image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_next()


@pytest.fixture(scope="module")
def prompt(tiny):
    _, processor = tiny
    message = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}],
        }
    ]
    return processor.apply_chat_template(message, add_generation_prompt=True)


@pytest.fixture(scope="module")
def inputs(tiny, prompt):
    _, processor = tiny
    images = [_image(*WIDE_EXACT, seed=1), _image(*PADDED, seed=2)]
    return processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True)


def test_tiny_next_builds_once_and_loads(tiny, tmp_path):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model, processor = tiny
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert isinstance(processor, LlavaNextProcessor)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert model.config.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112]]
    assert model.config.vision_config.image_size == 56
    assert processor.patch_size == 14 and processor.num_additional_image_tokens == 1
    assert processor.vision_feature_select_strategy == "default"
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    # cached: a second build returns the same folder; other settings another folder
    folder = build_tiny_next()
    assert build_tiny_next() == folder and (folder / SPEC_FILE).exists()
    assert (folder / "clip" / "config.json").exists()
    other = build_tiny_next(TinyNextSpec(seed=1), cache_dir=tmp_path)
    assert other.parent == tmp_path and other.name != folder.name


def test_stock_forward_two_aspect_ratios(tiny, inputs):
    model, _ = tiny
    assert tuple(inputs["pixel_values"].shape) == (2, 5, 3, 56, 56)  # padded to the max crops
    assert crops_per_image(model, inputs["image_sizes"]) == [3, 5]
    with torch.no_grad():
        out = model(**inputs)
    lengths = [f.shape[0] for f in out.image_outputs.pooler_output]
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert lengths == placeholders
    # 56 x 112: base 16 + 4 x 8 grid + 4 newlines; 70 x 100: base 16 + 6 x 8 (unpadded) + 6
    assert lengths == [16 + 32 + 4, 16 + 48 + 6]
    assert torch.isfinite(out.logits).all()


def test_crop_features_equal_what_stock_projects(tiny, inputs):
    model, _ = tiny
    seen = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    finally:
        handle.remove()
    feats = crop_features(model, inputs["pixel_values"], inputs["image_sizes"])
    assert [tuple(f.shape) for f in feats] == [(3, 16, 32), (5, 16, 32)]
    torch.testing.assert_close(torch.cat(feats), seen[0], atol=0, rtol=0)


def test_pack_equals_stock_pack_image_features(tiny, inputs):
    model, _ = tiny
    sizes = inputs["image_sizes"]
    projected = project_crops(model, crop_features(model, inputs["pixel_values"], sizes))
    ours = pack(model, projected, sizes)
    with torch.no_grad():
        stock_same_input, _ = model.model.pack_image_features(
            projected, sizes, "default", image_newline=model.model.image_newline
        )
        stock_full = model.model.get_image_features(inputs["pixel_values"], sizes).pooler_output
    for a, b, c in zip(ours, stock_same_input, stock_full, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def _stock_ids(model, size):
    """Stock packing of features tagged with their flat index (newline tagged -1)."""
    layout_crops = crops_per_image(model, [size])[0]
    n = 16
    ids = torch.arange(layout_crops * n, dtype=torch.float32).view(layout_crops, n, 1)
    packed, _ = model.model.pack_image_features(
        [ids], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0])
    )
    return packed[0][:, 0].long()


@pytest.mark.parametrize("size", [WIDE_EXACT, PADDED, *MORE_SIZES])
def test_pack_layout_matches_stock_tagging(tiny, size):
    model, _ = tiny
    layout = pack_layout(model, size)
    assert torch.equal(layout.source, _stock_ids(model, size))
    rows, cols = layout.grid
    assert layout.newlines == rows and layout.length == 16 + rows * (cols + 1)


def test_none_parity_logits_and_generate(tiny, inputs, prompt):
    model, processor = tiny
    sizes = inputs["image_sizes"]
    packed = pack(
        model, project_crops(model, crop_features(model, inputs["pixel_values"], sizes)), sizes
    )
    with torch.no_grad():
        stock = model(**inputs).logits
    ours = forward_with_features(
        model, inputs["input_ids"], inputs["attention_mask"], packed
    ).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    # the prompt rebuilt from one placeholder (as the LLaVA-1.5 adapter does) gives the same ids
    one = processor.tokenizer(prompt)["input_ids"]
    pad = processor.tokenizer.pad_token_id
    ids, mask = expand_image_tokens(
        [one, one], [p.shape[0] for p in packed], model.config.image_token_id, pad
    )
    assert torch.equal(ids, inputs["input_ids"]) and torch.equal(mask, inputs["attention_mask"])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        stock_gen = model.generate(**inputs, **kwargs)
    ours_gen = generate_with_features(model, ids, mask, packed, **kwargs)
    assert torch.equal(ours_gen, stock_gen)


def test_placeholder_count_mismatch_is_refused(tiny, inputs):
    model, _ = tiny
    sizes = inputs["image_sizes"]
    packed = pack(
        model, project_crops(model, crop_features(model, inputs["pixel_values"], sizes)), sizes
    )
    short = [packed[0][:-1], packed[1]]
    with pytest.raises(Exception, match="Image features and image tokens do not match"):
        forward_with_features(model, inputs["input_ids"], inputs["attention_mask"], short)


def _oracle_keep(model, size, keep):
    """Surviving packed positions, read off the stock tagged packing (no layout code)."""
    ids = _stock_ids(model, size).tolist()
    flat = keep.reshape(-1).tolist()
    n = keep.shape[1]
    out, row = [], []
    for t, i in enumerate(ids):
        if t < n:  # the base crop
            if flat[i]:
                out.append(t)
        elif i >= 0:
            row.append((t, flat[i]))
        else:  # a newline closes the row
            kept = [p for p, k in row if k]
            out += kept + ([t] if kept else [])
            row = []
    return out


@pytest.mark.parametrize("size", [WIDE_EXACT, PADDED, (100, 70), (30, 200)])
def test_keep_mask_through_packing(tiny, size):
    model, _ = tiny
    layout = pack_layout(model, size)
    gen = torch.Generator().manual_seed(sum(size))
    keep = torch.rand(layout.crops, layout.patches, generator=gen) < 0.4
    keep[:, :8] = False  # first two patch rows of every crop dropped: some grid rows go empty
    mask = packed_keep(layout, keep)
    assert torch.nonzero(mask).flatten().tolist() == _oracle_keep(model, size, keep)
    assert not mask.all() and mask.any()
    assert 0 < int((mask & (layout.source < 0)).sum()) < layout.newlines  # empty rows: no newline
    # values: the kept rows of the full packing, in packed order
    feats = torch.randn(layout.crops, layout.patches, 64)
    full = pack(model, [feats], [size])[0]
    kept, masks = pack_kept(model, [feats], [size], [keep])
    torch.testing.assert_close(kept[0], full[masks[0]], atol=0, rtol=0)
    # everything kept -> the full packing; newline policies
    assert packed_keep(layout, torch.ones_like(keep)).all()
    every = packed_keep(layout, keep, newlines="all")
    none = packed_keep(layout, keep, newlines="none")
    assert int(every.sum()) - int(none.sum()) == layout.newlines
    assert (every & (layout.source < 0)).sum() == layout.newlines
    assert not (none & (layout.source < 0)).any()


def test_compressed_forward_with_rebuilt_prompt(tiny, inputs, prompt):
    """Kept rows per image differ; the rebuilt prompt holds their counts and the LLM runs."""
    model, processor = tiny
    sizes = inputs["image_sizes"]
    projected = project_crops(model, crop_features(model, inputs["pixel_values"], sizes))
    keeps = [torch.arange(16).repeat(f.shape[0], 1) % 3 == 0 for f in projected]
    kept, _ = pack_kept(model, projected, sizes, keeps)
    lengths = [k.shape[0] for k in kept]
    assert lengths[0] != lengths[1] and all(t < 40 for t in lengths)
    one = processor.tokenizer(prompt)["input_ids"]
    ids, mask = expand_image_tokens(
        [one, one], lengths, model.config.image_token_id, processor.tokenizer.pad_token_id
    )
    out = forward_with_features(model, ids, mask, kept)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
