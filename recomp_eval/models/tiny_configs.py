"""Family-neutral pieces of the offline tiny checkpoints (random weights built from configs).

Each family's ``tiny.py`` describes its checkpoint in a frozen spec with the fields read here
(``vision_width``, ``vision_layers``, ``vision_heads``, ``image_size``, ``patch_size``,
``clip_proj_dim``, ``text_width``, ``text_layers``, ``text_heads``, ``text_kv_heads``); family
packages do not import each other, so what they share lives here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def publish_once(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build(tmp)`` into a temporary sibling and renamed into place
    (atomic), unless ``folder/marker`` exists already; a concurrent builder may win the race."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / marker).exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def scale_weights_(model: torch.nn.Module, factor: float) -> None:
    """Multiply every matrix of ``model`` by ``factor`` in place (spreads a random model's
    logits so that greedy tokens vary)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)


def vision_config(spec: Any):
    """The tiny CLIP vision tower of ``spec`` (GELU MLP twice as wide as the tower)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=2 * spec.vision_width,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.clip_proj_dim,
    )


def text_config(spec: Any, tokenizer: Any):
    """The tiny Llama decoder of ``spec`` over ``tokenizer``'s vocabulary and special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=2 * spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
