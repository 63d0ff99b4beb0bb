"""Loader, tiny fixture, prompt rendering and image preprocessing (offline)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval.models.conversation import VICUNA_V1_SYSTEM, render_prompt
from recomp_eval.models.images import expand_to_square, mean_colour, preprocess_images
from recomp_eval.models.loader import ModelUnavailableError, load_clip_text, load_llava
from recomp_eval.models.tiny import TinySpec, build_tiny


@pytest.fixture(scope="module")
def folder():
    return build_tiny()


@pytest.fixture(scope="module")
def bundle(folder):
    return load_llava(str(folder), dtype="float32")


def test_tiny_cached_build_is_fast_and_loads_like_a_checkpoint(folder, bundle):
    start = time.perf_counter()
    assert build_tiny() == folder
    assert time.perf_counter() - start < 1.0
    cfg = bundle.model.config
    assert type(bundle.model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.text_config._attn_implementation == "sdpa"
    assert bundle.tokenizer.padding_side == "left"
    assert bundle.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    side = TinySpec().image_size // TinySpec().patch_size
    assert cfg.image_seq_length == side * side
    assert bundle.clip_text_id == str(folder / "clip")


def test_dtype_and_attn_options(folder):
    b = load_llava(str(folder), dtype="bfloat16", attn_implementation="eager")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert b.model.config.text_config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        load_llava(str(folder), dtype="float8")


def test_missing_hub_id_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        load_llava("recomp-eval-test/does-not-exist-7b-hf")
    msg = str(info.value)
    assert "\n" not in msg
    assert "recomp-eval-test/does-not-exist-7b-hf" in msg and "local folder" in msg
    assert info.value.__cause__ is None


def test_missing_local_folder_and_clip(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_llava(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError, match="clip-missing"):
        load_clip_text("recomp-eval-test/clip-missing", "float32", "cpu")


def test_clip_text_loaded_once(bundle):
    a = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    assert load_clip_text(bundle.clip_text_id, torch.float32, torch.device("cpu")) is a
    assert a.visual_projection.bias is None
    assert a.visual_projection.in_features == bundle.model.config.vision_config.hidden_size


def test_prompts(bundle):
    p = render_prompt("llava15", "What is it?", bundle.tokenizer, bundle.processor)
    assert p == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    q = render_prompt("lmms_eval", "What is it?", bundle.tokenizer, bundle.processor)
    assert q == "USER: <image>\nWhat is it? ASSISTANT:"
    ids = bundle.tokenizer(q)["input_ids"]
    assert ids[0] == bundle.tokenizer.bos_token_id and ids.count(bundle.image_token_id) == 1
    with pytest.raises(ValueError, match="unknown protocol"):
        render_prompt("nope", "x", bundle.tokenizer)


def _reference_pad_resize(image: Image.Image, proc) -> torch.Tensor:
    """LLaVA-1.5 reference: square canvas in the mean colour, bicubic resize, normalise."""
    w, h = image.size
    side = max(w, h)
    fill = tuple(int(m * 255) for m in proc.image_mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    size = proc.crop_size["height"]
    arr = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(proc.image_mean, np.float32)) / np.array(proc.image_std, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def test_pad_to_square_matches_reference(bundle):
    rng = np.random.default_rng(4)
    proc = bundle.image_processor
    images = [
        Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8))
        for s in [(60, 150, 3), (200, 90, 3), (112, 112, 3)]
    ]
    got = preprocess_images(images, proc, "llava15")
    ref = torch.stack([_reference_pad_resize(im, proc) for im in images])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    crop = preprocess_images(images, proc, "lmms_eval")
    direct = proc(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(crop, direct)
    assert not torch.allclose(crop[0], got[0])  # non-square: crop and pad differ
    assert torch.allclose(crop[2], got[2])  # square: identical


def test_expand_to_square_centres():
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = expand_to_square(im, (1, 2, 3))
    assert sq.size == (4, 4)
    arr = np.asarray(sq)
    assert (arr[0, 0] == (1, 2, 3)).all() and (arr[1, 0] == (255, 0, 0)).all()
    assert (arr[3, 3] == (1, 2, 3)).all()


def test_mean_colour_truncates():
    class P:
        image_mean = (0.48145466, 0.4578275, 0.40821073)

    assert mean_colour(P()) == (122, 116, 104)
