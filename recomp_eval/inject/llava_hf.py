"""Two-phase adapter for HF ``LlavaForConditionalGeneration`` (transformers 5.x).

Phase 1 (vision side, done here): tower pass under the q/k hooks of
:func:`recomp_eval.inject.context.compress` -> :class:`VisionSignals` -> method ->
:class:`Compressed` -> projector -> one [T_i, E] tensor per sample.
Phase 2 (LLM): the prompt's single image token is repeated ``T_i`` times per sample at the id
level, sequences are left-padded, and ``generate`` receives the features through
``mm_encoder_outputs`` (used at prefill only), so one batch may mix token counts.

Letters: B batch, N patches, C ViT width, E LLM width, T_i tokens kept for sample i, L length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recomp_eval.inject.context import CompressionProbe, vision_tower
from recomp_eval.methods.base import Compressed, SignalSpec, VisionSignals
from recomp_eval.signals.vision import (
    CLS_INDEX,
    cls_attention_concat,
    cls_attention_mean_heads,
    joint_space_similarity,
    patch_keys,
    resolve_layer,
)


@dataclass
class TowerOutput:
    """What one vision-side run produced (before the text signal and the method)."""

    signals: VisionSignals
    last_hidden: torch.Tensor  # [B,N+1,C] ViT last_hidden_state (pre post_layernorm) for RC's Z


@torch.no_grad()
def tower_pass(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    probe: CompressionProbe,
    extra_q: Sequence[int] = (),
    extra_k: Sequence[int] = (),
):
    """One tower pass under ``probe``'s hooks: feature-layer and last hidden states and the q/k
    captures of the hooked layers, as a :class:`~recomp_eval.inject.vision_cache.TowerPass`.

    pixel_values: [B,3,S,S]. ``extra_q``/``extra_k``: further layers to capture during the same
    pass (hooks registered for the pass only), e.g. for other runs sharing it.
    """
    from recomp_eval.inject.vision_cache import TowerPass
    from recomp_eval.signals.vision import capture_qk

    tower = vision_tower(model)
    dtype = next(tower.parameters()).dtype
    probe.vision.clear()
    extra_q = [i for i in extra_q if i not in probe.q_layers]
    extra_k = [i for i in extra_k if i not in probe.k_layers]
    with capture_qk(tower, extra_q, extra_k) as extra:
        out = tower(pixel_values.to(tower.device, dtype), output_hidden_states=True)
    return TowerPass(
        hidden=out.hidden_states[model.config.vision_feature_layer],  # [B,N+1,C]
        last_hidden=out.last_hidden_state,  # [B,N+1,C]
        q={
            **{i: extra.require("q", i) for i in extra_q},
            **{i: probe.vision.require("q", i) for i in probe.q_layers},
        },
        k={
            **{i: extra.require("k", i) for i in extra_k},
            **{i: probe.vision.require("k", i) for i in probe.k_layers},
        },
    )


@torch.no_grad()
def signals_from_pass(
    model: torch.nn.Module,
    done: Any,
    pixel_values: torch.Tensor,
    spec: SignalSpec,
    seeds: torch.Tensor | None = None,
) -> TowerOutput:
    """The vision signals ``spec`` asks for, from a :class:`TowerPass` ``done``.

    ``pixel_values`` [B,3,S,S] is only used for the second tower pass of ``vit_passes == 2``.
    """
    tower = vision_tower(model)
    num_layers = tower.config.num_hidden_layers
    num_heads = tower.config.num_attention_heads
    last_hidden = done.last_hidden
    cls_attn = keys = None
    if spec.cls_attn is not None:
        layer = resolve_layer(spec.cls_attn_layer, num_layers)
        q, k = done.q[layer], done.k[layer]  # [B,N+1,C]
        if spec.cls_attn == "concat_heads":
            cls_attn = cls_attention_concat(q, k)  # [B,N]
        elif spec.cls_attn == "mean_heads":
            cls_attn = cls_attention_mean_heads(q, k, num_heads)  # [B,N]
        else:
            raise ValueError(f"unknown cls_attn definition '{spec.cls_attn}'")
    if spec.keys is not None:
        k = done.k[resolve_layer(spec.keys_layer, num_layers)]  # [B,N+1,C]
        keys = patch_keys(k, spec.keys, num_heads)  # [B,N,Ck]
    if spec.vit_passes == 2:
        # The released RC runs a second, identical tower for Z; kept for cost parity only.
        dtype = next(tower.parameters()).dtype
        last_hidden = tower(pixel_values.to(tower.device, dtype)).last_hidden_state
    elif spec.vit_passes != 1:
        raise ValueError(f"vit_passes must be 1 or 2, got {spec.vit_passes}")
    hidden = done.hidden
    signals = VisionSignals(
        features=hidden[:, CLS_INDEX + 1 :],  # [B,N,C]
        cls_attn=cls_attn,
        keys=keys,
        cls_feature=hidden[:, CLS_INDEX] if spec.cls_feature else None,  # [B,C]
        seeds=seeds if spec.needs_seeds else None,
    )
    return TowerOutput(signals=signals, last_hidden=last_hidden)


@torch.no_grad()
def run_tower(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    spec: SignalSpec,
    probe: CompressionProbe,
    seeds: torch.Tensor | None = None,
) -> TowerOutput:
    """Tower pass(es) and the vision signals ``spec`` asks for, in the model dtype.

    Args:
        model: ``LlavaForConditionalGeneration``.
        pixel_values: [B,3,S,S].
        spec: the method's signal spec.
        probe: from ``compress(model, method)`` (its hooks fill ``probe.vision``).
        seeds: [B] int64, passed through to the signals when ``spec.needs_seeds``.
    """
    return signals_from_pass(model, tower_pass(model, pixel_values, probe), pixel_values, spec,
                             seeds)  # fmt: skip


def add_text_signal(
    tower_out: TowerOutput, text_embeds: torch.Tensor, visual_projection: torch.nn.Module
) -> None:
    """Set ``signals.text_sim`` [B,N] from ``e_t`` [B,D] and the tower's last hidden state."""
    tower_out.signals.text_sim = joint_space_similarity(
        text_embeds, tower_out.last_hidden, visual_projection
    )  # [B,N]


@torch.no_grad()
def project(model: torch.nn.Module, compressed: Compressed) -> list[torch.Tensor]:
    """Projector on the kept tokens; per-sample [T_i, E] (padding rows dropped)."""
    feats = model.model.multi_modal_projector(compressed.features)  # [B,M,E]
    return [f[:t] for f, t in zip(feats, compressed.lengths.tolist())]


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
