"""Question signal for text-guided methods: which text, and its CLIP text embedding ``e_t``.

Sources (:class:`~recomp_eval.methods.base.TextSpec`):

- ``question``: the dataset question without protocol suffixes (the ``paper`` variant).
- ``first_line``: the released RC behaviour: decode the tokenized prompt with the image token
  removed and special tokens kept, and take the text before the first newline (under vicuna_v1
  the system prompt; under the llava-hf template ``<s> USER:``).
- ``prompt``: the whole decoded prompt, image token removed.

Pooling: ``eot`` = HF ``text_embeds`` (projection of the first-EOS position; the sequence is padded
to the longest text, which leaves the EOT state unchanged under CLIP's causal mask); ``last`` =
projection of ``last_hidden_state[:, -1]`` with padding to ``max_len`` (the release: max_len 20,
truncation fills every slot so the last slot is the EOT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recomp_eval.methods.base import TextSpec


def first_line(prompt_ids: Sequence[int], tokenizer: Any, image_token_id: int) -> str:
    """Text before the first newline of the decoded prompt (image token removed, specials kept)."""
    ids = [i for i in prompt_ids if i != image_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return text.split("\n", 1)[0]


def select_texts(
    spec: TextSpec,
    questions: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    image_token_id: int,
) -> list[str]:
    """The string each sample's text tower input is made from.

    Args:
        spec: the method's text spec.
        questions: dataset questions (no protocol suffix), one per sample.
        prompt_ids: the tokenized full prompt of each sample (one image token, no padding).
        tokenizer: the LLM tokenizer that made ``prompt_ids``.
    """
    if spec.source == "question":
        return list(questions)
    if spec.source == "first_line":
        return [first_line(ids, tokenizer, image_token_id) for ids in prompt_ids]
    if spec.source == "prompt":
        return [
            tokenizer.decode([i for i in ids if i != image_token_id], skip_special_tokens=False)
            for ids in prompt_ids
        ]
    raise ValueError(f"unknown text source '{spec.source}'; use question, first_line or prompt")


@torch.no_grad()
def encode_texts(clip_text: Any, texts: Sequence[str], spec: TextSpec) -> torch.Tensor:
    """Projected CLIP text embedding per text.

    Args:
        clip_text: a :class:`~recomp_eval.models.llava.loader.ClipText`.
        texts: B strings.
        spec: ``max_len`` and ``pool``.
    Returns:
        [B,D] ``e_t`` in the text tower's dtype.
    """
    model = clip_text.model
    device = next(model.parameters()).device
    if spec.pool == "eot":
        padding = "longest"
    elif spec.pool == "last":
        padding = "max_length"
    else:
        raise ValueError(f"unknown text pooling '{spec.pool}'; use eot or last")
    batch = clip_text.tokenizer(
        list(texts),
        padding=padding,
        truncation=True,
        max_length=spec.max_len,
        return_tensors="pt",
    ).to(device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if spec.pool == "eot":
        return out.text_embeds  # [B,D]
    return model.text_projection(out.last_hidden_state[:, -1])  # [B,D]
