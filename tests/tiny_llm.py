"""A tiny random LLaVA (4 decoder layers) and a left-padded batch, for in-LLM pruning tests.

Shared by ``test_fastv.py`` and ``test_llm_pruning.py``: the same model either way, built from
configs in code (no checkpoint folder), with its weights scaled so greedy tokens vary.
"""

from __future__ import annotations

import torch

VOCAB = 64
IMAGE_ID = VOCAB - 1
PAD, BOS, EOS = 0, 1, 2
TEXT_LAYERS = 4
IMAGE_SIZE, PATCH = 56, 14
N_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 16 placeholders per image
WEIGHT_SCALE = 3.0  # spread the logits of a random model so greedy tokens vary
ATOL = 1e-5


def scale(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(WEIGHT_SCALE)
    return model.eval()


def text_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def build_llava(seed: int = 0):
    """``LlavaForConditionalGeneration``: CLIP tower 2 x 32 at 56 px (16 patches), Llama 4 x 64."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text_config(),
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return scale(LlavaForConditionalGeneration(cfg))


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Batch 2, left padding (sample 0 has two pads), image span at different offsets."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_ID, (2, 6), generator=gen)
    row0 = [PAD, PAD, BOS, *text[0, :2].tolist(), *[IMAGE_ID] * N_IMAGE, *text[0, 2:4].tolist()]
    row1 = [BOS, *text[1, :4].tolist(), *[IMAGE_ID] * N_IMAGE, *text[1, 4:6].tolist()]
    ids = torch.tensor([row0, row1])
    return {
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
    }
