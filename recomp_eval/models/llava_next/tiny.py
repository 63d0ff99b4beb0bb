"""Offline tiny LLaVA-NeXT fixture: random weights, the tiny LLaVA tokenizer, saved to a folder.

Same approach as the LLaVA family's tiny fixture, whose folder (``model.id: tiny`` of the
``llava`` family, reached through the registry: family packages do not import each other) lends
its tokenizer, chat template and CLIP text tower. The model is a
``LlavaNextForConditionalGeneration`` and the processor a ``LlavaNextProcessor`` whose image
processor splits an image into a base crop plus a grid from small ``image_grid_pinpoints``: at
56 px crops and patch 14 every crop has 4 x 4 = 16 patches, and the pinpoints (56,112),
(112,56), (112,112) give 1 x 2, 2 x 1 or 2 x 2 grid crops (3 or 5 crops with the base one).
The layout matches ``llava-hf/llava-v1.6-*-hf``: ``config.json`` with ``image_grid_pinpoints``,
``processor_config.json`` with ``patch_size`` 14, ``vision_feature_select_strategy`` ``default``
and ``num_additional_image_tokens`` 1, plus a ``clip/`` sub-folder (a tiny ``CLIPModel``: the
LLaVA fixture's text tower, a vision half copying this tower) as in the LLaVA fixture.

The image processor is ``LlavaNextImageProcessorPil`` (torchvision-free; the torchvision class
cannot load next to the CPU torch). A built folder is reused, keyed by a hash of the options and
of the LLaVA fixture folder it borrows from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recomp_eval.models.tiny_configs import (
    publish_once,
    scale_weights_,
    text_config,
    vision_config,
)

SPEC_FILE = "tiny_next_spec.json"


@dataclass(frozen=True)
class TinyNextSpec:
    """Sizes of the tiny NeXT model; every field enters the cache key."""

    image_size: int = 56  # one crop: 4 x 4 = 16 patches at patch 14
    patch_size: int = 14
    # (height, width) resolutions of the crop grid, multiples of image_size
    grid_pinpoints: tuple[tuple[int, int], ...] = ((56, 112), (112, 56), (112, 112))
    vision_width: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    clip_proj_dim: int = 16
    weight_scale: float = 3.0  # as the LLaVA fixture: spreads a random LLM's logits
    seed: int = 0


def source_folder() -> Path:
    """The LLaVA family's tiny folder (built if absent), through the registry."""
    from recomp_eval.models import get_adapter

    return Path(get_adapter("llava").resolve("tiny"))


def build_next_processor(tokenizer, spec: TinyNextSpec, chat_template: str | None):
    """A ``LlavaNextProcessor`` as llava-hf ships it (CLS counted, CLIP normalisation)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints],
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def _build(spec: TinyNextSpec, folder: Path, source: Path) -> None:
    from transformers import (
        AutoProcessor,
        AutoTokenizer,
        CLIPConfig,
        CLIPModel,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    for h, w in spec.grid_pinpoints:
        if h % spec.image_size or w % spec.image_size:
            raise ValueError(
                f"grid pinpoint ({h}, {w}) is not a multiple of image_size={spec.image_size}"
            )
    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(source)  # BPE with <image> as one special token
    chat_template = AutoProcessor.from_pretrained(source).chat_template
    tok.chat_template = chat_template
    tok.padding_side = "left"
    vision = vision_config(spec)
    text = text_config(spec, tok)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints],
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    scale_weights_(model.model.language_model, spec.weight_scale)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)

    build_next_processor(tok, spec, chat_template).save_pretrained(folder)

    # CLIP pair: the LLaVA fixture's text tower and text projection, a vision half copying this
    # model's tower (as OpenAI's CLIP pairs with LLaVA's), a fresh visual projection.
    donor = CLIPModel.from_pretrained(source / "clip").eval()
    clip_cfg = CLIPConfig(
        text_config=donor.config.text_config.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=donor.config.projection_dim,
    )
    clip = CLIPModel(clip_cfg).eval()
    clip.text_model.load_state_dict(donor.text_model.state_dict())
    clip.text_projection.load_state_dict(donor.text_projection.state_dict())
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(folder / "clip")
    AutoTokenizer.from_pretrained(source / "clip").save_pretrained(folder / "clip")
    record = {**asdict(spec), "tokenizer_from": str(source)}
    (folder / SPEC_FILE).write_text(json.dumps(record, indent=1))


def default_next_cache_dir() -> Path:
    """``$RECOMP_EVAL_CACHE/tiny_next`` (default ``<tmp>/recomp_eval/tiny_next``)."""
    root = os.environ.get("RECOMP_EVAL_CACHE") or os.path.join(tempfile.gettempdir(), "recomp_eval")
    return Path(root) / "tiny_next"


def build_tiny_next(spec: TinyNextSpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiny NeXT checkpoint folder and return its path.

    The key hashes ``spec`` and the name of the LLaVA fixture folder (itself a hash of its
    settings), so a changed tokenizer there gives a new folder here.
    """
    spec = spec or TinyNextSpec()
    source = source_folder()
    settings = {**asdict(spec), "tokenizer_from": source.name}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir or default_next_cache_dir()) / key
    return publish_once(folder, SPEC_FILE, lambda tmp: _build(spec, tmp, source))


def load_tiny_next(
    spec: TinyNextSpec | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Build (or reuse) the tiny folder; return ``(model, processor)`` loaded from it.

    Plain ``from_pretrained`` (no family loader exists yet): the model in eval mode on
    ``device``, the processor with a left-padding tokenizer.
    """
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = str(build_tiny_next(spec))
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = LlavaNextForConditionalGeneration.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")  # torchvision-free pixels
    processor.tokenizer.padding_side = "left"
    return model, processor
