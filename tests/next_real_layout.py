"""Checkpoint folders in the llava-hf v1.6 (LLaVA-NeXT) layout: hub files, random weights.

``build_next_real_layout(dest, variant, size)`` writes a folder that loads through the project's
``llava_next`` family (:func:`recomp_eval.models.load_model`) and through stock
``LlavaNextForConditionalGeneration.from_pretrained`` like a download of
``llava-hf/llava-v1.6-vicuna-7b-hf`` (``variant="vicuna"``) or ``llava-hf/llava-v1.6-mistral-7b-hf``
(``"mistral"``). The real files are in ``tests/data/checkpoints/llava-v1.6-*-hf/`` (their
SOURCES.md says where each came from and what was not found); the helpers of
``tests/real_layout.py`` (sizes, seed, weight scale, sharding, ``clip/`` sub-folder, hub names) are
reused. What goes in, per file:

- ``config.json``: the variant's hub file with only the widths and depths of
  ``real_layout.SIZES[size]`` written over ``text_config`` / ``vision_config`` (for mistral at
  ``small`` also ``num_key_value_heads`` 2, so the text model keeps grouped-query attention as the
  hub's 32 over 8 heads). ``image_size`` 336, ``patch_size`` 14, ``image_grid_pinpoints``,
  ``vision_feature_layer`` -2, strategy ``default``, ``image_token_index`` 32000, vocab 32064, the
  text ``model_type`` (``llama`` / ``mistral``), ``text_config.pad_token_id`` 0 (vicuna) stay as
  the hub has them.
- ``generation_config.json``, ``chat_template.json``: the variant's hub files, byte for byte.
- ``preprocessor_config.json``: mistral's hub file, byte for byte, for both variants. For
  vicuna this is an **inference, not a hub file**: its SOURCES.md says the vicuna file was not
  found, that the Hub lists it at 772 B, the size of mistral's file, and that the tests use
  mistral's settings; it does not say the settings are the same (both configs have the same
  pinpoints, image size and CLIP tower).
- ``processor_config.json``: **a stand-in** (the v1.6 file was not found; vicuna's was deleted on
  the Hub): llava-1.5's hub file with ``processor_class`` ``LlavaNextProcessor``, i.e.
  ``patch_size`` 14 and strategy ``default`` as ``config.json``, ``num_additional_image_tokens`` 1
  (CLIP's CLS), ``image_token`` ``<image>``.
- tokenizer (no v1.6 tokenizer file was found; see the SOURCES.md files):

  * vicuna: llava-1.5's LLaMA tokenizer (the same Vicuna SentencePiece model, per SOURCES.md)
    with exactly the documented v1.6-vicuna differences: only ``<image>`` 32000 is added (the
    ``<pad>`` 32001 entry is removed from ``tokenizer.json``'s ``added_tokens``, from
    ``tokenizer_config.json``'s ``added_tokens_decoder`` and from ``added_tokens.json``, which
    becomes ``{"<image>": 32000}``, 23 B as the Hub lists it), and the pad token is ``<unk>`` (id
    0, as ``generation_config.json`` and ``text_config.pad_token_id``) in
    ``tokenizer_config.json`` and ``special_tokens_map.json``. ``tokenizer.model`` is llava-1.5's,
    byte for byte.
  * mistral: **a stand-in**: llava-1.5's LLaMA tokenizer, whose added tokens (``<image>`` 32000,
    ``<pad>`` 32001) and pad token are those of the mistral checkpoint (its real
    ``added_tokens.json`` is copied); the vocabulary is LLaMA's, not Mistral's, so token ids of
    text are not the hub checkpoint's.

  Both: ``tokenizer_config.json``'s ``processor_class`` says ``LlavaNextProcessor`` (llava-1.5's
  says ``LlavaProcessor``); the JSON files that are rewritten are written as ``save_pretrained``
  does (indent 2, LF).
- weights: a seeded random ``LlavaNextForConditionalGeneration`` in float16 under the hub's 4.x
  tensor names (``language_model.model.*``, ``language_model.lm_head.weight``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``), in
  ``real_layout.NUM_SHARDS`` shards with ``model.safetensors.index.json`` (the v1.6 index was not
  found, so the hub's shard count is not known here).
- ``clip/``: as ``real_layout``: the CLIP tokenizer files and a ``CLIPModel`` whose vision half
  holds the LLaVA tower's weights.

``next_real_layout.json`` records the build and, per file, where it came from.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from real_layout import (
    DATA,
    LLAVA_HUB,
    NUM_SHARDS,
    SEED,
    SIZES,
    WEIGHT_SCALE,
    _save_shards,
    _write_clip,
    _write_json,
    hub_name,
)

NEXT_HUB = {
    "vicuna": DATA / "llava-v1.6-vicuna-7b-hf",
    "mistral": DATA / "llava-v1.6-mistral-7b-hf",
}
VARIANTS = tuple(NEXT_HUB)
PROCESSOR_FROM = NEXT_HUB["mistral"]  # preprocessor_config.json of both variants (see above)
IMAGE_ID = 32000
PAD_TOKEN = {"vicuna": "<unk>", "mistral": "<pad>"}
# written over the variant's text config on top of SIZES[size]["text"]
TEXT_EXTRA: dict[tuple[str, str], dict[str, Any]] = {
    ("mistral", "small"): {"num_key_value_heads": 2}
}
RECORD = "next_real_layout.json"

HUB_FILE = "hub file of {variant}, byte copy"
SOURCES = {
    "config.json": "hub file of {variant}, widths/depths of real_layout.SIZES['{size}'] written over",
    "generation_config.json": HUB_FILE,
    "chat_template.json": HUB_FILE,
    "preprocessor_config.json": (
        "hub file of mistral, byte copy (for vicuna: not found; inferred from the equal 772 B size"
        " its SOURCES.md reports)"
    ),
    "processor_config.json": (
        "stand-in: llava-1.5's hub file with processor_class LlavaNextProcessor (v1.6 file not "
        "found)"
    ),
    "tokenizer.model": "llava-1.5's hub file, byte copy",
}
TOKENIZER_SOURCES = {
    "vicuna": {
        "tokenizer.json": "llava-1.5's hub file less the added <pad> 32001",
        "tokenizer_config.json": (
            "llava-1.5's hub file less <pad> 32001, pad <unk>, processor_class LlavaNextProcessor"
        ),
        "special_tokens_map.json": "llava-1.5's hub file with pad <unk>",
        "added_tokens.json": "<image> 32000 only (23 B, the size the Hub lists)",
    },
    "mistral": {
        "tokenizer.json": "stand-in: llava-1.5's hub file (LLaMA vocabulary, not Mistral's)",
        "tokenizer_config.json": "stand-in: llava-1.5's hub file, processor_class LlavaNextProcessor",
        "special_tokens_map.json": "stand-in: llava-1.5's hub file",
        "added_tokens.json": HUB_FILE,
    },
}


def next_hub_name(name: str) -> str:
    """The v1.6 hub's tensor name for a 5.x ``LlavaNextForConditionalGeneration`` state-dict key
    (LLaVA-1.5's names plus the top-level ``image_newline``)."""
    if name == "model.image_newline":
        return "image_newline"
    return hub_name(name)


def hub_config(variant: str) -> dict[str, Any]:
    """The variant's hub ``config.json`` as stored in ``tests/data/checkpoints``."""
    return json.loads((NEXT_HUB[_check(variant)] / "config.json").read_text())


def next_config(variant: str, size: str) -> dict[str, Any]:
    """The hub ``config.json`` with ``SIZES[size]`` (and :data:`TEXT_EXTRA`) written over it."""
    cfg = hub_config(variant)
    cfg["text_config"].update(SIZES[size]["text"])
    cfg["text_config"].update(TEXT_EXTRA.get((variant, size), {}))
    cfg["vision_config"].update(SIZES[size]["vision"])
    return cfg


def _check(variant: str) -> str:
    if variant not in NEXT_HUB:
        raise ValueError(f"unknown variant '{variant}'; use one of {VARIANTS}")
    return variant


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_tokenizer(variant: str, dest: Path) -> None:
    """The tokenizer files of :data:`TOKENIZER_SOURCES` (module docstring)."""
    shutil.copyfile(LLAVA_HUB / "tokenizer.model", dest / "tokenizer.model")
    fast = _read_json(LLAVA_HUB / "tokenizer.json")
    config = _read_json(LLAVA_HUB / "tokenizer_config.json")
    special = _read_json(LLAVA_HUB / "special_tokens_map.json")
    config["processor_class"] = "LlavaNextProcessor"
    if variant == "vicuna":  # v1.6-vicuna adds only <image> and pads with <unk>
        fast["added_tokens"] = [t for t in fast["added_tokens"] if t["content"] != "<pad>"]
        config["added_tokens_decoder"].pop("32001")
        config["pad_token"] = "<unk>"
        special["pad_token"] = dict(special["pad_token"], content="<unk>")
        _write_json(dest / "added_tokens.json", {"<image>": IMAGE_ID})
    else:
        shutil.copyfile(NEXT_HUB["mistral"] / "added_tokens.json", dest / "added_tokens.json")
    (dest / "tokenizer.json").write_text(
        json.dumps(fast, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json", special)


def _write_next_weights(cfg: dict[str, Any], dest: Path) -> torch.nn.Module:
    """A seeded random ``LlavaNextForConditionalGeneration`` for ``cfg``, saved in float16 under
    the hub's names (LLM weights scaled as ``real_layout``'s, to spread the logits)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(copy.deepcopy(cfg)))
    model = model.eval()
    with torch.no_grad():
        for p in (*model.model.language_model.parameters(), model.lm_head.weight):
            if p.dim() > 1:
                p.mul_(WEIGHT_SCALE)
    model = model.half()
    state = {next_hub_name(k): v for k, v in model.state_dict().items()}
    _save_shards(state, dest, NUM_SHARDS)
    return model


def build_next_real_layout(dest: Path, variant: str = "vicuna", size: str = "small") -> Path:
    """Write a v1.6-layout checkpoint folder at ``dest`` (created; must not exist), return it.

    Args:
        dest: the checkpoint folder to create.
        variant: ``vicuna`` (``llava-v1.6-vicuna-7b-hf``) or ``mistral``
            (``llava-v1.6-mistral-7b-hf``; its tokenizer is a LLaMA stand-in).
        size: ``small`` (all widths shrunk) or ``real`` (the hub's widths, depths cut), as
            ``real_layout.SIZES``.
    """
    _check(variant)
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; use one of {sorted(SIZES)}")
    hub = NEXT_HUB[variant]
    dest = Path(dest)
    dest.mkdir(parents=True)
    cfg = next_config(variant, size)
    model = _write_next_weights(cfg, dest)
    _write_json(dest / "config.json", cfg)
    for name in ("generation_config.json", "chat_template.json"):
        shutil.copyfile(hub / name, dest / name)
    shutil.copyfile(PROCESSOR_FROM / "preprocessor_config.json", dest / "preprocessor_config.json")
    processor = _read_json(LLAVA_HUB / "processor_config.json")
    _write_json(
        dest / "processor_config.json", dict(processor, processor_class="LlavaNextProcessor")
    )
    _write_tokenizer(variant, dest)
    _write_clip(cfg, size, model.model.vision_tower, dest / "clip")
    sources = {**SOURCES, **TOKENIZER_SOURCES[variant]}
    record = {
        "variant": variant,
        "size": size,
        "seed": SEED,
        "hub": hub.name,
        "text_layers": cfg["text_config"]["num_hidden_layers"],
        "vision_layers": cfg["vision_config"]["num_hidden_layers"],
        "sources": {k: v.format(variant=variant, size=size) for k, v in sorted(sources.items())},
    }
    _write_json(dest / RECORD, record)
    return dest


class NextRealLayouts:
    """Builds each (variant, size) once under ``root`` (one per test session)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._built: dict[tuple[str, str], Path] = {}

    def __call__(self, variant: str = "vicuna", size: str = "small") -> Path:
        key = (variant, size)
        if key not in self._built:
            self._built[key] = build_next_real_layout(
                self.root / f"{size}-{variant}", variant, size
            )
        return self._built[key]
