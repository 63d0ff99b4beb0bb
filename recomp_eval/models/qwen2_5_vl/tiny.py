"""Offline tiny Qwen2.5-VL fixture: random weights in the ``Qwen/Qwen2.5-VL-*-Instruct`` layout.

The folder holds what the real checkpoints hold, with tiny values: ``config.json`` in the flat
layout of the Hub files (text keys at the top, ``vision_config`` nested, ``rope_scaling`` with
``"type": "mrope"`` and ``mrope_section``, ``in_chans`` / ``spatial_patch_size`` /
``vision_token_id`` kept), ``generation_config.json``, ``preprocessor_config.json`` (``min_pixels``
/ ``max_pixels``, ``Qwen2VLImageProcessor``, ``Qwen2_5_VLProcessor``), ``chat_template.json``
(the real template, verbatim), ``tokenizer.json`` and ``tokenizer_config.json``
(``Qwen2Tokenizer``), ``model.safetensors``. The vision tower keeps the real structure: patch 14,
temporal patch 2, 2 x 2 merge, window attention with ``fullatt_block_indexes``, ``out_hidden_size``
= the LLM width; the decoder is a GQA Qwen2 with multimodal RoPE.

Sizes (defaults of :class:`TinyQwenSpec`): an image is resized to a multiple of 28 px with between
``112 * 112`` and ``224 * 224`` pixels, so it costs 4 x 4 to 8 x 8 merged tokens (16 to 64
``<|image_pad|>``); windows are 56 px, 2 x 2 merged tokens, so every image has several (4 to 16).

Tokenizer: the byte-level BPE of the LLaVA family's tiny fixture (its vocabulary and merges,
reached through the registry: family packages do not import each other) in a ``Qwen2Tokenizer``,
plus Qwen's 22 added tokens in the real order, so ``id - 151643 + 400`` maps a real added-token id
to the tiny one (``<|endoftext|>`` 400 ... ``<|image_pad|>`` 412, ``<|video_pad|>`` 413). As in the
real ones: no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``, and an embedding with more rows
(``vocab_size`` 448) than the tokenizer has tokens (422).

Loading: ``Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)`` works as is. A stock
``AutoProcessor.from_pretrained(folder, backend="pil")`` does not, for this folder or a real one:
transformers 5.x maps ``qwen2_5_vl`` to a torchvision-only video processor, which the CPU torch here
cannot import. :func:`~recomp_eval.models.qwen2_5_vl.loader.load_processor` builds the stock ``Qwen2_5_VLProcessor`` (stock image
processor ``Qwen2VLImageProcessorPil``, tokenizer and chat template, all read from the folder)
without a video processor. A built folder is reused, keyed by a hash of the spec and of the LLaVA
fixture folder it borrows from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from recomp_eval.models.tiny_configs import publish_once, scale_weights_

SPEC_FILE = "tiny_qwen_spec.json"
FORMAT = 1  # bump when the folder's layout changes (enters the cache key)

# Qwen2.5's added tokens in the order of their real ids (151643 ...): special ones, then plain
# ones, as in tokenizer_config.json's ``added_tokens_decoder`` of Qwen/Qwen2.5-VL-7B-Instruct.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PLAIN_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
REAL_FIRST_ADDED_ID = 151643  # <|endoftext|> in the real tokenizer

# The ``chat_template`` of Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json, verbatim (copy in
# tests/data/checkpoints/qwen2.5-vl-7b-instruct/, see its SOURCES.md).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of the tiny Qwen2.5-VL; every field enters the cache key."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 56  # px: 56 // (2 * 14) = 2 x 2 merged tokens a window (real: 112 px, 4 x 4)
    min_pixels: int = 112 * 112  # resized area bounds: 4 x 4 to 8 x 8 merged tokens an image
    max_pixels: int = 224 * 224
    vision_width: int = 32
    vision_mlp: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    fullatt_block_indexes: tuple[int, ...] = (1, 3)  # the rest attend within windows
    tokens_per_second: int = 2
    text_width: int = 64
    text_mlp: int = 128
    text_layers: int = 3  # FastV (k_layer 2 by default) needs a layer after the pruning one
    text_heads: int = 4  # head_dim 16
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2; real (16, 24, 24)
    rope_theta: float = 1000000.0
    vocab_size: int = 448  # embedding rows, more than the 422 tokens (real 151936 / 152064)
    # as Qwen2.5-VL-7B-Instruct (the 3B ties them: True). Untied, the random LM's greedy tokens
    # vary; tied, each prompt tends to repeat one token (its own embedding wins the logits).
    tie_word_embeddings: bool = False
    weight_scale: float = 3.0  # as the other tiny fixtures: spreads a random LLM's logits
    seed: int = 0


def source_folder() -> Path:
    """The LLaVA family's tiny folder (built if absent), through the registry."""
    from recomp_eval.models import get_adapter

    return Path(get_adapter("llava").resolve("tiny"))


_BASE_VOCAB = 400  # size of the LLaVA fixture's BPE vocabulary (its TinySpec.vocab_size); checked


def tiny_token_id(real_id: int) -> int:
    """The tiny tokenizer's id of the added token that has ``real_id`` in the real tokenizer."""
    return real_id - REAL_FIRST_ADDED_ID + _BASE_VOCAB


def build_tokenizer(source: Path):
    """A ``Qwen2Tokenizer`` over the LLaVA fixture's byte-level BPE plus Qwen's added tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Qwen2Tokenizer

    base = json.loads(AutoTokenizer.from_pretrained(source).backend_tokenizer.to_str())["model"]
    vocab = dict(base["vocab"])
    if len(vocab) != _BASE_VOCAB:
        raise ValueError(
            f"the LLaVA fixture's vocabulary has {len(vocab)} tokens, not {_BASE_VOCAB}"
        )
    added = SPECIAL_TOKENS + PLAIN_TOKENS
    vocab.update({token: _BASE_VOCAB + i for i, token in enumerate(added)})  # fixes the ids
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in base["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        errors="replace",
        model_max_length=131072,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_TOKENS])
    got = [tok.convert_tokens_to_ids(t) for t in added]
    if got != [_BASE_VOCAB + i for i in range(len(added))] or len(tok) != _BASE_VOCAB + len(added):
        raise RuntimeError(f"added-token ids came out as {got} (tokenizer of {len(tok)})")
    return tok


def token_ids() -> dict[str, int]:
    """The tiny ids of Qwen's added tokens (``<|image_pad|>`` -> 412, ...)."""
    return {t: _BASE_VOCAB + i for i, t in enumerate(SPECIAL_TOKENS + PLAIN_TOKENS)}


def config_dict(spec: TinyQwenSpec) -> dict[str, Any]:
    """``config.json`` in the key order and flat layout of the Hub files, with tiny values."""
    ids = token_ids()
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.text_width,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_mlp,
        "max_position_embeddings": 128000,
        "max_window_layers": spec.text_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers,
        "num_key_value_heads": spec.text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": spec.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "float32",  # real: bfloat16; the tiny weights are stored in float32
        "transformers_version": _transformers_version(),
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": spec.vision_layers,
            "hidden_act": "silu",
            "hidden_size": spec.vision_width,
            "intermediate_size": spec.vision_mlp,
            "num_heads": spec.vision_heads,
            "in_chans": 3,
            "out_hidden_size": spec.text_width,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "spatial_patch_size": spec.patch_size,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": spec.tokens_per_second,
            "temporal_patch_size": spec.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "vocab_size": spec.vocab_size,
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def generation_config_dict() -> dict[str, Any]:
    """``generation_config.json`` as the Hub's (do_sample with temperature 1e-6, repetition
    penalty 1.05, EOS ``<|im_end|>`` then ``<|endoftext|>``), with the tiny ids."""
    ids = token_ids()
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 1e-06,
        "transformers_version": _transformers_version(),
    }


def preprocessor_config_dict(spec: TinyQwenSpec) -> dict[str, Any]:
    """``preprocessor_config.json`` in the Hub's key order, with the tiny pixel bounds."""
    return {
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def tokenizer_config_dict(tok) -> dict[str, Any]:
    """``tokenizer_config.json`` in the key order of Qwen/Qwen2.5-VL-7B-Instruct's."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = SPECIAL_TOKENS + PLAIN_TOKENS
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.convert_tokens_to_ids(t)): {
                "content": t,
                **flags,
                "special": t in SPECIAL_TOKENS,
            }
            for t in added
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "add_bos_token": False,
    }


def _check_spec(spec: TinyQwenSpec) -> None:
    unit = spec.spatial_merge_size * spec.patch_size
    problems = []
    if spec.text_width % spec.text_heads or spec.text_heads % spec.text_kv_heads:
        problems.append("text_width / text_heads / text_kv_heads do not divide")
    elif 2 * sum(spec.mrope_section) != spec.text_width // spec.text_heads:
        problems.append(f"mrope_section {spec.mrope_section} must sum to head_dim / 2")
    if spec.vision_width % spec.vision_heads or (spec.vision_width // spec.vision_heads) % 4:
        problems.append("vision head_dim must be a multiple of 4 (2-D rotary)")
    if not all(0 <= i < spec.vision_layers for i in spec.fullatt_block_indexes):
        problems.append(f"fullatt_block_indexes {spec.fullatt_block_indexes} outside the depth")
    if spec.window_size % unit:
        problems.append(f"window_size {spec.window_size} is not a multiple of merge x patch {unit}")
    if not unit * unit <= spec.min_pixels <= spec.max_pixels:
        problems.append("min_pixels / max_pixels out of order")
    if spec.vocab_size < _BASE_VOCAB + len(SPECIAL_TOKENS) + len(PLAIN_TOKENS):
        problems.append(f"vocab_size {spec.vocab_size} is smaller than the tokenizer")
    if problems:
        raise ValueError(f"TinyQwenSpec: {'; '.join(problems)}")


def _write_json(path: Path, obj: Any, indent: int = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _build(spec: TinyQwenSpec, folder: Path, source: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(spec.seed)
    tok = build_tokenizer(source)
    raw = config_dict(spec)
    _write_json(folder / "config.json", raw)
    config = Qwen2_5_VLConfig.from_pretrained(folder)  # the path a real config.json takes
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    scale_weights_(model.model.language_model, spec.weight_scale)
    model.save_pretrained(folder)
    _write_json(folder / "config.json", raw)  # save_pretrained rewrote it in the 5.x layout
    _write_json(folder / "generation_config.json", generation_config_dict())

    tok.save_pretrained(folder)
    _write_json(folder / "tokenizer_config.json", tokenizer_config_dict(tok))
    for stray in ("chat_template.jinja", "special_tokens_map.json"):
        (folder / stray).unlink(missing_ok=True)
    _write_json(folder / "preprocessor_config.json", preprocessor_config_dict(spec))
    # the Hub file: 4-space indent, no final newline
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=4), encoding="utf-8"
    )
    record = {**asdict(spec), "tokenizer_from": str(source), "format": FORMAT}
    (folder / SPEC_FILE).write_text(json.dumps(record, indent=1))


def default_qwen_cache_dir() -> Path:
    """``$RECOMP_EVAL_CACHE/tiny_qwen`` (default ``<tmp>/recomp_eval/tiny_qwen``)."""
    root = os.environ.get("RECOMP_EVAL_CACHE") or os.path.join(tempfile.gettempdir(), "recomp_eval")
    return Path(root) / "tiny_qwen"


def build_tiny_qwen(spec: TinyQwenSpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiny Qwen2.5-VL folder and return its path.

    The key hashes ``spec``, :data:`FORMAT` and the name of the LLaVA fixture folder (itself a
    hash of its settings), so a changed tokenizer there gives a new folder here.
    """
    spec = spec or TinyQwenSpec()
    _check_spec(spec)
    source = source_folder()
    settings = {**asdict(spec), "tokenizer_from": source.name, "format": FORMAT}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir or default_qwen_cache_dir()) / key
    return publish_once(folder, SPEC_FILE, lambda tmp: _build(spec, tmp, source))


@functools.cache
def load_tiny_qwen(
    spec: TinyQwenSpec | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Build (or reuse) the tiny folder; return ``(model, processor)`` loaded from it.

    Plain ``from_pretrained`` (no family loader exists yet): the model in eval mode on
    ``device``, the processor of :func:`~recomp_eval.models.qwen2_5_vl.loader.load_processor` with a left-padding tokenizer (the real
    tokenizer pads on the right, which batched generation cannot use).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = str(build_tiny_qwen(spec))
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    model = model.to(device).eval()
    from recomp_eval.models.qwen2_5_vl.loader import load_processor

    processor = load_processor(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor
