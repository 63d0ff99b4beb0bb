"""The real llava-hf v1.6 files (``tests/data/checkpoints/llava-v1.6-*-hf/``, see SOURCES.md) under
stock transformers, and the packing of ``recomp_eval.models.llava_next.packing`` on them.

For a few image sizes the crops and ``<image>`` tokens a stock ``LlavaNextProcessor`` (real
preprocessor settings, torchvision-free ``LlavaNextImageProcessorPil``) produces must equal what
``modeling_llava_next``'s helpers imply (``image_size_to_num_patches``,
``get_anyres_image_grid_shape``, ``unpad_image`` on the grid map), the rows stock
``get_image_features`` packs on a model built from the real config with tiny widths, and
``len(pack_layout(...).source)``. Not verifiable here: the v1.6 tokenizers and
``processor_config.json`` were not found; the processor gets llava-1.5's tokenizer (``<image>``
32000 as in both configs) and ``patch_size`` / strategy from ``config.json``, with
``num_additional_image_tokens`` counted from the tower (CLIP's CLS).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recomp_eval.models.llava_next.packing import crops_per_image, pack_layout

DATA = Path(__file__).parent / "data" / "checkpoints"
NEXT = {"vicuna": DATA / "llava-v1.6-vicuna-7b-hf", "mistral": DATA / "llava-v1.6-mistral-7b-hf"}
LLAVA15 = DATA / "llava-1.5-7b-hf"
BASES = tuple(NEXT)
TEXT_MODEL = {"vicuna": "llama", "mistral": "mistral"}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the hub files
# (height, width): 640x480, 480x640, 336x336 and 1000x300 images (width x height)
SIZES = [(480, 640), (640, 480), (336, 336), (300, 1000)]
# widths and depths written over the real config; image size, patch, pinpoints, layer stay
TINY = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "projection_dim": 16},
}  # fmt: skip


def _raw(base: str, name: str = "config.json") -> dict:
    return json.loads((NEXT[base] / name).read_text())


def _image(height: int, width: int):
    from PIL import Image

    rng = np.random.default_rng(height * 7919 + width)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models():
    """Per base a random ``LlavaNextForConditionalGeneration`` from the shrunk real config."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out = {}
    for base in BASES:
        raw = copy.deepcopy(_raw(base))
        raw["text_config"].update(TINY["text"])
        raw["vision_config"].update(TINY["vision"])
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(raw))
        out[base] = model.float().eval()  # the config's dtypes are float16 / bfloat16
    return out


@pytest.fixture(scope="module")
def processors(models):
    """Per base a stock processor: the real preprocessor settings and chat template."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = AutoTokenizer.from_pretrained(LLAVA15)
    image_processor = LlavaNextImageProcessorPil.from_pretrained(NEXT["mistral"])
    out = {}
    for base, model in models.items():
        cfg = model.config
        tower = model.model.vision_tower  # 5.x CLIPVisionModel: no vision_model level
        embeddings = getattr(tower, "vision_model", tower).embeddings
        out[base] = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=embeddings.num_positions - embeddings.num_patches,
            chat_template=_raw(base, "chat_template.json")["chat_template"],
        )
    return out


def _expected_tokens(config, size: tuple[int, int]) -> int:
    """Rows stock packing gives one image: the base crop's patches, then the unpadded grid map
    (``unpad_image`` of a ``(gh * side, gw * side)`` map) with one newline per row."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    crop = config.vision_config.image_size
    side = crop // config.vision_config.patch_size
    gh, gw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, crop)
    rows, cols = unpad_image(torch.zeros(1, gh * side, gw * side), size).shape[1:]
    return side * side + rows * (cols + 1)


@pytest.mark.parametrize("base", BASES)
def test_config_is_llava_next(base) -> None:
    from transformers import AutoConfig, LlavaNextConfig

    cfg = AutoConfig.from_pretrained(NEXT[base])
    assert isinstance(cfg, LlavaNextConfig)
    assert cfg.image_grid_pinpoints == PINPOINTS
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == 32000
    assert cfg.text_config.model_type == TEXT_MODEL[base]
    assert cfg.text_config.vocab_size == 32064
    vision = cfg.vision_config
    assert (vision.model_type, vision.image_size, vision.patch_size) == (
        "clip_vision_model",
        336,
        14,
    )
    assert (vision.hidden_size, vision.num_hidden_layers) == (1024, 24)
    assert cfg.image_seq_length == (vision.image_size // vision.patch_size) ** 2  # 576


@pytest.mark.parametrize("base", BASES)
def test_generation_config(base) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(NEXT[base])
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    # vicuna pads with <unk> (0); the mistral file names no pad token
    assert gen.pad_token_id == {"vicuna": 0, "mistral": None}[base]


def test_image_processor_is_pil_and_needs_no_torchvision(processors) -> None:
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    ip = LlavaNextImageProcessorPil.from_pretrained(NEXT["mistral"])
    cfg = LlavaNextConfig.from_pretrained(NEXT["mistral"])
    assert ip.image_grid_pinpoints == cfg.image_grid_pinpoints
    assert ip.size.shortest_edge == cfg.vision_config.image_size
    assert (ip.crop_size.height, ip.crop_size.width) == (336, 336)
    assert ip.do_pad and ip.resample == 3  # PIL bicubic
    assert list(ip.image_mean) == list(OPENAI_CLIP_MEAN)
    assert list(ip.image_std) == list(OPENAI_CLIP_STD)
    out = processors["mistral"](images=_image(480, 640), text="<image>", return_tensors="pt")
    assert tuple(out["pixel_values"].shape[-2:]) == (336, 336)
    assert "torchvision" not in sys.modules


def test_processor_counts_the_cls_token(models, processors) -> None:
    # the tower's one extra position (CLS) is what llava-hf's processor_config.json counts for the
    # same CLIP tower in llava-1.5 (v1.6's file was not found)
    llava15 = json.loads((LLAVA15 / "processor_config.json").read_text())
    for base in BASES:
        assert (
            processors[base].num_additional_image_tokens == llava15["num_additional_image_tokens"]
        )
        assert processors[base].patch_size == llava15["patch_size"]
        assert processors[base].image_token_id == models[base].config.image_token_id


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("base", BASES)
def test_crops_and_tokens_agree(base, size, models, processors) -> None:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = models[base], processors[base]
    cfg = model.config
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    out = processor(images=_image(*size), text=prompt, return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(size)]

    crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    assert out["pixel_values"].shape[1] == crops == crops_per_image(model, [size])[0]

    tokens = int((out["input_ids"] == cfg.image_token_id).sum())
    assert tokens == _expected_tokens(cfg, size)
    assert tokens == len(pack_layout(model, size).source)

    with torch.no_grad():  # stock packing gives as many rows; forward accepts the prompt
        features = model.model.get_image_features(
            pixel_values=out["pixel_values"], image_sizes=out["image_sizes"]
        ).pooler_output
        assert [f.shape[0] for f in features] == [tokens]
        logits = model(**out, logits_to_keep=1).logits  # stock checks placeholders == rows
    assert logits.shape[:2] == (1, 1)
