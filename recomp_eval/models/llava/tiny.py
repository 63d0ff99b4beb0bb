"""Offline tiny LLaVA fixture: random weights, locally trained tokenizer, saved to a folder.

The folder has the same layout as a real checkpoint plus a ``clip/`` sub-folder holding a tiny
``CLIPModel`` (text tower, text projection, vision tower, visual projection), so tests load it with
:func:`recomp_eval.models.llava.loader.load_llava` and :func:`~recomp_eval.models.llava.loader.load_clip_text`
exactly like ``llava-hf/llava-1.5-7b-hf`` and ``openai/clip-vit-large-patch14-336``.

Building takes well under a second; a built folder is reused (keyed by a hash of the options).
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

# A few sentences covering the prompt templates and test questions, so the BPE has real merges.
_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a red mat.",
    "Answer the question using a single word or phrase. Please answer yes or no.",
    "What colour is the bus? How many people are there? Is there a dog in the picture?",
    "Reference OCR token: stop, sign, street, 42, open, coffee, shop.",
    "the quick brown fox jumps over the lazy dog 0123456789 yes no left right",
)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Same shape as the llava-hf template: "USER: <image>\n{text} ASSISTANT:" (no system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model; every field enters the cache key."""

    image_size: int = 112  # 8 x 8 = 64 patches at patch 14
    patch_size: int = 14
    vision_width: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 3  # FastV (k_layer 2 by default) needs a layer after the pruning one
    text_heads: int = 4
    text_kv_heads: int = 2
    clip_text_width: int = 32
    clip_proj_dim: int = 16
    vocab_size: int = 400
    weight_scale: float = 3.0  # random LLMs emit near-constant tokens; scaling spreads the logits
    seed: int = 0


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on :data:`_CORPUS`; ``<image>`` is one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _clip_tokenizer(vocab_size: int):
    """CLIP-style text tokenizer: ``<s> text </s>``, right padding, EOT = ``</s>``."""
    from tokenizers import processors

    tok = _train_tokenizer(vocab_size)
    bos, eos = tok.convert_tokens_to_ids(["<s>", "</s>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    tok.padding_side = "right"
    tok.model_max_length = 77
    return tok


def clip_text_config(tok, width: int, proj_dim: int):
    """A 2-layer CLIP text tower config for ``tok`` (its special ids and 77-position limit)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        projection_dim=proj_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A ``LlavaProcessor`` as llava-hf ships it (CLS counted, CLIP normalisation, chat template).

    Uses ``CLIPImageProcessorPil``: the torchvision-backed class cannot load next to the CPU torch.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _build(spec: TinySpec, folder: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(spec.seed)
    tok = _train_tokenizer(spec.vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    vision = vision_config(spec)
    text = text_config(spec, tok)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    scale_weights_(model.model.language_model, spec.weight_scale)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)

    build_processor(tok, spec.image_size, spec.patch_size).save_pretrained(folder)

    # CLIP text tower + visual projection; the vision half copies LLaVA's tower (as in OpenAI's).
    clip_tok = _clip_tokenizer(spec.vocab_size)
    clip_cfg = CLIPConfig(
        text_config=clip_text_config(clip_tok, spec.clip_text_width, spec.clip_proj_dim).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=spec.clip_proj_dim,
    )
    clip = CLIPModel(clip_cfg).eval()
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(folder / "clip")
    clip_tok.save_pretrained(folder / "clip")
    (folder / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))


def default_cache_dir() -> Path:
    root = os.environ.get("RECOMP_EVAL_CACHE") or os.path.join(tempfile.gettempdir(), "recomp_eval")
    return Path(root) / "tiny"


def build_tiny(spec: TinySpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiny checkpoint folder and return its path.

    The folder loads with ``load_llava(path)``; its CLIP text tower with ``load_clip_text(path/"clip")``.
    """
    spec = spec or TinySpec()
    key = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir or default_cache_dir()) / key
    return publish_once(folder, "tiny_spec.json", lambda tmp: _build(spec, tmp))


def load_tiny(
    spec: TinySpec | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Build (or reuse) the tiny folder and load it with the real-checkpoint loader."""
    from recomp_eval.models.llava.loader import load_llava

    return load_llava(
        str(build_tiny(spec)), dtype=dtype, device=device, attn_implementation=attn_implementation
    )
