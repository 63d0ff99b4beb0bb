"""Question signal for text-guided methods: which text, and its CLIP text embedding ``e_t``.

Sources (:class:`~recomp_eval.methods.base.TextSpec`):

- ``question``: the dataset question without protocol suffixes (the ``paper`` variant; CDPruner).
- ``user_text``: the user turn, question plus the protocol's answer-format suffix (TRIM).
- ``first_line``: the released RC behaviour: decode the tokenized prompt with the image token
  removed and special tokens kept, and take the text before the first newline (under vicuna_v1
  the system prompt; under the llava-hf template ``<s> USER:``).
- ``prompt``: the whole decoded prompt, image token removed.

Pooling: ``eot`` = HF ``text_embeds`` (projection of the first-EOS position; the sequence is padded
to the longest text, which leaves the EOT state unchanged under CLIP's causal mask); ``last`` =
projection of ``last_hidden_state[:, -1]`` with padding to ``max_len`` (the release: max_len 20,
truncation fills every slot so the last slot is the EOT).

Embedding vectors (``TextSpec.output == "embeddings"``, :func:`encode_text_embeddings`): one
``text_embeds`` row per text, or with ``segments`` one per ``max_len``-token segment of the
untruncated ids (CDPruner's long-question handling: the ids are right-padded with id 0 and mask 0
to a multiple of ``max_len``; later segments have no BOS and usually no EOT).
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
    user_texts: Sequence[str] = (),
) -> list[str]:
    """The string each sample's text tower input is made from.

    Args:
        spec: the method's text spec.
        questions: dataset questions (no protocol suffix), one per sample.
        prompt_ids: the tokenized full prompt of each sample (one image token, no padding).
        tokenizer: the LLM tokenizer that made ``prompt_ids``.
        user_texts: the user turns (question plus protocol suffix), for ``source="user_text"``.
    """
    if spec.source == "question":
        return list(questions)
    if spec.source == "user_text":
        if len(user_texts) != len(prompt_ids):
            raise ValueError(
                f"text source 'user_text' needs one user turn per sample, got {len(user_texts)} "
                f"for {len(prompt_ids)} prompts"
            )
        return list(user_texts)
    if spec.source == "first_line":
        return [first_line(ids, tokenizer, image_token_id) for ids in prompt_ids]
    if spec.source == "prompt":
        return [
            tokenizer.decode([i for i in ids if i != image_token_id], skip_special_tokens=False)
            for ids in prompt_ids
        ]
    raise ValueError(
        f"unknown text source '{spec.source}'; use question, user_text, first_line or prompt"
    )


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


@torch.no_grad()
def encode_text_embeddings(
    clip_text: Any, texts: Sequence[str], spec: TextSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ``text_embeds`` per text (or per ``max_len`` segment), not normalised.

    Args:
        clip_text: a :class:`~recomp_eval.models.llava.loader.ClipText`.
        texts: B strings.
        spec: ``max_len``, ``pool`` (``eot`` only) and ``segments``.
    Returns:
        embeds [B,M,D] in the text tower's dtype (zero rows past a sample's segments) and
        mask [B,M] bool; ``M = 1`` without ``segments``.
    """
    if spec.pool != "eot":
        raise ValueError("text embedding vectors use eot pooling (HF text_embeds); set pool: eot")
    if not spec.segments:
        embeds = encode_texts(clip_text, texts, spec)  # [B,D]
        return embeds[:, None], torch.ones(len(texts), 1, dtype=torch.bool, device=embeds.device)
    model = clip_text.model
    device = next(model.parameters()).device
    width = spec.max_len
    ids = clip_text.tokenizer(list(texts), truncation=False)["input_ids"]  # B lists, BOS..EOS
    counts = [max(1, -(-len(row) // width)) for row in ids]  # segments per text
    segment_ids = torch.zeros(sum(counts), width, dtype=torch.int64)  # [S,max_len], pad id 0
    segment_mask = torch.zeros(sum(counts), width, dtype=torch.int64)  # [S,max_len]
    at = 0
    for row, count in zip(ids, counts):  # host-side layout of a few ids per text
        flat = torch.tensor(row, dtype=torch.int64)
        segment_ids[at : at + count].view(-1)[: len(row)] = flat
        segment_mask[at : at + count].view(-1)[: len(row)] = 1
        at += count
    out = model(input_ids=segment_ids.to(device), attention_mask=segment_mask.to(device))
    flat_embeds = out.text_embeds  # [S,D]
    b, m = len(texts), max(counts)
    embeds = flat_embeds.new_zeros(b, m, flat_embeds.shape[-1])  # [B,M,D]
    mask = torch.zeros(b, m, dtype=torch.bool, device=flat_embeds.device)  # [B,M]
    at = 0
    for i, count in enumerate(counts):
        embeds[i, :count] = flat_embeds[at : at + count]
        mask[i, :count] = True
        at += count
    return embeds, mask
