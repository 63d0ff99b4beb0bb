"""Family-neutral LLM inputs: a prompt with ``T_i`` image placeholders and precomputed features.

Every family that feeds the LLM through transformers' ``mm_encoder_outputs`` (LLaVA-1.5,
LLaVA-NeXT: the model concatenates ``pooler_output`` and scatters it into the placeholders at
prefill) uses these; family packages do not import each other.

Letters: B batch, L length, E LLM width, T_i visual tokens of sample i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def expand_image_tokens(
    prompt_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    image_token_id: int,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each prompt's single image token ``lengths[i]`` times; left-pad the batch.

    Args:
        prompt_ids: B token-id lists, each with exactly one ``image_token_id``.
        lengths: B kept-token counts T_i.
    Returns:
        input_ids [B,L] int64 and attention_mask [B,L] int64 (0 on the left padding).
    """
    rows = []
    for i, (ids, t) in enumerate(zip(prompt_ids, lengths)):
        ids = list(ids)
        count = ids.count(image_token_id)
        if count != 1:
            raise ValueError(
                f"sample {i}: the prompt holds {count} image tokens; exactly one is expected"
            )
        at = ids.index(image_token_id)
        rows.append(ids[:at] + [image_token_id] * int(t) + ids[at + 1 :])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)  # [B,L]
    mask = torch.zeros((len(rows), width), dtype=torch.int64)  # [B,L]
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
        mask[i, width - len(row) :] = 1
    return input_ids.to(device), mask.to(device)


def image_features_arg(features: Sequence[torch.Tensor]) -> dict[str, Any]:
    """``mm_encoder_outputs`` for ``generate``/``forward``: per-sample [T_i, E] tensors."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=list(features))}


@torch.no_grad()
def generate_with_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    features: Sequence[torch.Tensor],
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` with precomputed image features; returns [B, L + new] sequences."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_encoder_outputs=image_features_arg(features),
        **generate_kwargs,
    )
