"""Qwen2.5-VL family, first step: the offline tiny checkpoint
(``recomp_eval.models.qwen2_5_vl.tiny``) under stock transformers, and the real configuration
files of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (``tests/data/checkpoints/qwen2.5-vl-*``,
see their SOURCES.md) it mirrors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from recomp_eval.models.qwen2_5_vl.tiny import (
    CHAT_TEMPLATE,
    PLAIN_TOKENS,
    SPEC_FILE,
    SPECIAL_TOKENS,
    TinyQwenSpec,
    build_tiny_qwen,
    load_tiny_qwen,
    tiny_token_id,
)

DATA = Path(__file__).parent / "data" / "checkpoints"
REAL = {"3b": DATA / "qwen2.5-vl-3b-instruct", "7b": DATA / "qwen2.5-vl-7b-instruct"}
# (height, width) -> (t, h, w) patch grid: 64 x 64 is scaled up to min_pixels (112 x 112),
# 150 x 200 is rounded to 140 x 196, 400 x 400 scaled down to max_pixels (224 x 224)
GRIDS = {(64, 64): (1, 8, 8), (150, 200): (1, 10, 14), (400, 400): (1, 16, 16)}
# windows of 2 x 2 merged tokens over the 4 x 4, 5 x 7 and 8 x 8 merged grids
WINDOWS = {(64, 64): 4, (150, 200): 12, (400, 400): 16}
FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)


def _gradient(height: int, width: int, channel: int):
    """A smooth two-channel ramp: random noise images look alike to a random tower."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[..., channel] = (255 * x / width).astype(np.uint8)
    a[..., (channel + 1) % 3] = (255 * y / height).astype(np.uint8)
    return Image.fromarray(a)


def _raw(folder: Path, name: str = "config.json") -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_qwen()


@pytest.fixture(scope="module")
def folder():
    return build_tiny_qwen()


@pytest.fixture(scope="module")
def prompt(tiny):
    _, processor = tiny
    message = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}],
        }
    ]
    return processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def inputs(tiny, prompt):
    _, processor = tiny
    images = [_gradient(h, w, c) for c, (h, w) in enumerate(GRIDS)]
    return processor(text=[prompt] * 3, images=images, padding=True, return_tensors="pt")


def test_tiny_qwen_builds_once_and_loads(tiny, folder, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    model, processor = tiny
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    for name in (*FILES, SPEC_FILE):
        assert (folder / name).is_file(), name
    # every tensor of the saved file is used and none is missing
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # cached: a second build returns the same folder; other settings another folder
    assert build_tiny_qwen() == folder
    other = build_tiny_qwen(TinyQwenSpec(seed=1), cache_dir=tmp_path)
    assert other.parent == tmp_path and other.name != folder.name
    assert build_tiny_qwen(TinyQwenSpec(seed=1), cache_dir=tmp_path) == other
    with pytest.raises(ValueError, match="mrope_section"):
        build_tiny_qwen(TinyQwenSpec(mrope_section=(2, 2, 2)), cache_dir=tmp_path)


def test_tiny_config_keeps_the_real_structure(tiny):
    model, _ = tiny
    vision, text = model.config.vision_config, model.config.text_config
    spec = TinyQwenSpec()
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.depth == 4 and list(vision.fullatt_block_indexes) == [1, 3]
    assert vision.window_size == 56 and vision.out_hidden_size == text.hidden_size == 64
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    assert 2 * sum(text.rope_parameters["mrope_section"]) == head_dim
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert model.config.tie_word_embeddings is False and spec.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert text.vocab_size == 448 > len(SPECIAL_TOKENS) + len(PLAIN_TOKENS) + 400


@pytest.mark.parametrize("base", sorted(REAL))
def test_tiny_files_have_the_real_keys(folder, base):
    real, tiny = _raw(REAL[base]), _raw(folder)
    assert list(tiny) == list(real)  # same keys, same order (flat layout of the Hub files)
    assert list(tiny["vision_config"]) == list(real["vision_config"])
    assert set(tiny["rope_scaling"]) == set(real["rope_scaling"]) == {"type", "mrope_section"}
    for key in ("patch_size", "spatial_patch_size", "temporal_patch_size", "spatial_merge_size",
                "in_chans", "hidden_act", "tokens_per_second"):  # fmt: skip
        assert tiny["vision_config"][key] == real["vision_config"][key], key
    assert tiny["vision_config"]["out_hidden_size"] == tiny["hidden_size"]
    assert real["vision_config"]["out_hidden_size"] == real["hidden_size"]
    # the same split of the rotary dims (16:24:24 = 2:3:3), smaller windows
    mrope, real_mrope = tiny["rope_scaling"]["mrope_section"], real["rope_scaling"]["mrope_section"]
    assert len(mrope) == len(real_mrope) == 3
    assert all(r * mrope[0] == m * real_mrope[0] for m, r in zip(mrope, real_mrope, strict=True))
    assert tiny["vision_config"]["window_size"] < real["vision_config"]["window_size"]
    if base == "7b":  # only the 7B folder has these files (see SOURCES.md)
        for name in ("preprocessor_config.json", "generation_config.json", "tokenizer_config.json"):
            assert list(_raw(folder, name)) == list(_raw(REAL[base], name)), name


def test_tiny_weights_have_the_real_tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tiny = set(f.keys())
    real = set(_raw(REAL["7b"], "model.safetensors.index.json")["weight_map"])
    assert len(real) == 729 and "visual.merger.mlp.0.weight" in real and "lm_head.weight" in real

    def pattern(keys):  # layer and block numbers dropped
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    assert pattern(tiny) == pattern(real)  # visual.*, model.layers.*, lm_head as on the Hub


def test_token_ids_match_the_tokenizer_and_the_real_roles(tiny, folder):
    model, processor = tiny
    tok, config = processor.tokenizer, model.config
    real_decoder = _raw(REAL["7b"], "tokenizer_config.json")["added_tokens_decoder"]
    real_ids = {entry["content"]: int(i) for i, entry in real_decoder.items()}
    assert list(real_ids) == [*SPECIAL_TOKENS, *PLAIN_TOKENS]  # same tokens, same order
    for token, real_id in real_ids.items():
        assert tok.convert_tokens_to_ids(token) == tiny_token_id(real_id), token
    real_config = _raw(REAL["7b"])
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "eos_token_id"):  # fmt: skip
        assert tiny_token_id(real_config[key]) == _raw(folder)[key], key
    ids = tok.convert_tokens_to_ids
    assert config.image_token_id == ids("<|image_pad|>") == processor.image_token_id == 412
    assert config.video_token_id == ids("<|video_pad|>") == processor.video_token_id == 413
    assert config.vision_start_token_id == ids("<|vision_start|>") == 409
    assert config.vision_end_token_id == ids("<|vision_end|>") == 410
    assert (
        tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    )
    assert tok("What is in the image?").input_ids[0] < 400  # no BOS added
    gen, real_gen = (
        _raw(folder, "generation_config.json"),
        _raw(REAL["7b"], "generation_config.json"),
    )
    assert gen["eos_token_id"] == [tiny_token_id(i) for i in real_gen["eos_token_id"]]
    assert gen["pad_token_id"] == tiny_token_id(real_gen["pad_token_id"])


def test_chat_template_is_the_real_one(tiny, folder, prompt):
    _, processor = tiny
    real_file = (REAL["7b"] / "chat_template.json").read_bytes()
    assert (folder / "chat_template.json").read_bytes() == real_file
    assert json.loads(real_file)["chat_template"] == CHAT_TEMPLATE
    assert processor.chat_template == CHAT_TEMPLATE == processor.tokenizer.chat_template
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_stock_processor_grids_and_placeholders(tiny, inputs):
    from transformers.vision_utils import get_vision_window_index

    model, processor = tiny
    grids = inputs["image_grid_thw"].tolist()
    assert grids == [list(g) for g in GRIDS.values()]
    merge = processor.image_processor.merge_size
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [t * h * w // merge**2 for t, h, w in grids] == [16, 35, 64]
    assert inputs["pixel_values"].shape == (sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14)
    starts = (inputs["input_ids"] == model.config.vision_start_token_id).sum(1)
    assert starts.tolist() == [1, 1, 1]
    assert inputs["attention_mask"][:, 0].tolist() == [0, 0, 1]  # left padding
    vision = model.config.vision_config
    for grid, windows in zip(grids, WINDOWS.values(), strict=True):
        _, cu = get_vision_window_index(
            torch.tensor([grid]), vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        assert len(cu) - 1 == windows
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    assert [f.shape for f in features] == [(n, 64) for n in placeholders]


def test_stock_generate_in_a_batch_depends_on_the_image(tiny, inputs):
    model, processor = tiny
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    assert len({tuple(row) for row in new}) == 3, new  # each image its own greedy answer
    assert len({tuple(row[:1]) for row in new}) > 1  # already the first token
    # the batch (left padded) answers as each sample alone
    first = {k: v[:1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    rows = int(inputs["image_grid_thw"][0].prod())
    first["pixel_values"] = inputs["pixel_values"][:rows]
    first["image_grid_thw"] = inputs["image_grid_thw"][:1]
    pad = int((first["attention_mask"][0] == 0).sum())
    first = {k: v[:, pad:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
             for k, v in first.items()}  # fmt: skip
    with torch.no_grad():
        alone = model.generate(**first, max_new_tokens=6, do_sample=False)
    assert alone[0, first["input_ids"].shape[1] :].tolist() == new[0]
    assert processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])  # decodes


@pytest.mark.parametrize("base", sorted(REAL))
def test_real_configs_load(base):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig.from_pretrained(REAL[base])
    vision, text = config.vision_config, config.text_config
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31] and vision.depth == 32
    assert vision.window_size == 112 and vision.spatial_merge_size == 2
    assert (vision.patch_size, vision.temporal_patch_size) == (14, 2)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert 2 * sum(text.rope_parameters["mrope_section"]) == text.hidden_size // (
        text.num_attention_heads
    )
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    width, vocab, tied = {"3b": (2048, 151936, True), "7b": (3584, 152064, False)}[base]
    assert vision.out_hidden_size == text.hidden_size == width
    assert text.vocab_size == vocab and config.tie_word_embeddings is tied
    assert text.num_key_value_heads < text.num_attention_heads


def test_real_preprocessor_resizes_like_the_hub_processor():
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(REAL["7b"], backend="pil")
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 12845056)
    out = processor(images=[Image.new("RGB", (640, 480))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 34, 46]]  # 476 x 644 px: 17 x 23 merged tokens
