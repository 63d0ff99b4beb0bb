"""The LLaVA-1.5 family: HF ``LlavaForConditionalGeneration`` (transformers 5.x), two phases.

Phase 1 (vision side): tower pass under the q/k hooks of
:func:`recomp_eval.inject.context.compress` -> :class:`VisionSignals` -> method ->
:class:`Compressed` -> projector -> one [T_i, E] tensor per sample.
Phase 2 (LLM): the prompt's single image token is repeated ``T_i`` times per sample at the id
level, sequences are left-padded, and ``generate`` receives the features through
``mm_encoder_outputs`` (used at prefill only), so one batch may mix token counts.

:class:`LlavaAdapter` is the :class:`~recomp_eval.models.base.ModelAdapter` of the family; the
module-level functions are its steps (tests use them directly).

Letters: B batch, N patches, C ViT width, E LLM width, T_i tokens kept for sample i, L length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recomp_eval.efficiency.flops import DecoderShape, vit_flops
from recomp_eval.methods.base import Compressed, SignalSpec, VisionSignals
from recomp_eval.models.base import (
    SIGNALS,
    HookPoints,
    ModelBundle,
    ModelShapes,
    TowerOutput,
    check_prompt,
)
from recomp_eval.models.llm_inputs import (  # noqa: F401 - the family's steps, re-exported
    expand_image_tokens,
    generate_with_features,
    image_features_arg,
)
from recomp_eval.signals.vision import (
    CLS_INDEX,
    cls_attention_concat,
    cls_attention_mean_heads,
    joint_space_similarity,
    patch_keys,
    resolve_layer,
)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The CLIP tower of a ``LlavaForConditionalGeneration`` (transformers 5.x layout)."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise RuntimeError(
            f"{type(model).__name__} has no model.vision_tower; expected a transformers 5.x "
            f"LlavaForConditionalGeneration"
        )
    return tower


def hook_points(model: torch.nn.Module) -> HookPoints:
    """The CLIP tower, its depth and heads, and where layer ``i``'s q/k projections are."""
    from recomp_eval.signals.vision import attention_module

    tower = vision_tower(model)
    return HookPoints(
        tower=tower,
        num_layers=tower.config.num_hidden_layers,
        num_heads=tower.config.num_attention_heads,
        attention=lambda layer: attention_module(tower, layer),
    )


@torch.no_grad()
def tower_pass(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    probe: Any,
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
    spec: SignalSpec,
    seeds: torch.Tensor | None = None,
) -> TowerOutput:
    """The vision signals ``spec`` asks for, from a :class:`TowerPass` ``done``.

    The number of tower passes (``spec.vit_passes``) is not handled here:
    :func:`recomp_eval.inject.tower_policy.vision_passes` runs them.
    """
    tower = vision_tower(model)
    num_layers = tower.config.num_hidden_layers
    num_heads = tower.config.num_attention_heads
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
    hidden = done.hidden
    features = hidden[:, CLS_INDEX + 1 :]  # [B,N,C]
    projected = None
    if spec.projected:  # the projector acts per token: selecting on its output = selecting rows
        projector = model.model.multi_modal_projector
        projected = projector(features.to(next(projector.parameters()).dtype))  # [B,N,D]
    signals = VisionSignals(
        features=features,
        cls_attn=cls_attn,
        keys=keys,
        cls_feature=hidden[:, CLS_INDEX] if spec.cls_feature else None,  # [B,C]
        seeds=seeds if spec.needs_seeds else None,
        projected=projected,
    )
    return TowerOutput(signals=signals, last_hidden=done.last_hidden)


@torch.no_grad()
def last_hidden_state(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A plain tower pass's last hidden state [B,N+1,C] (pre ``post_layernorm``)."""
    tower = vision_tower(model)
    dtype = next(tower.parameters()).dtype
    return tower(pixel_values.to(tower.device, dtype)).last_hidden_state


@torch.no_grad()
def run_tower(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    spec: SignalSpec,
    probe: Any,
    seeds: torch.Tensor | None = None,
) -> TowerOutput:
    """Tower pass(es) and the vision signals ``spec`` asks for, in the model dtype.

    Args:
        model: ``LlavaForConditionalGeneration``.
        pixel_values: [B,3,S,S].
        spec: the method's signal spec (``vit_passes`` through the tower-pass policy).
        probe: from ``compress(model, method)`` (its hooks fill ``probe.vision``).
        seeds: [B] int64, passed through to the signals when ``spec.needs_seeds``.
    """
    from recomp_eval.inject.tower_policy import vision_passes
    from recomp_eval.timing import StageTimer

    adapter = LlavaAdapter()
    bundle = ModelBundle(model, None, None, "", pixel_values.dtype, pixel_values.device)
    done = vision_passes(
        adapter, bundle, probe, pixel_values, spec, StageTimer(pixel_values.device)
    )
    return signals_from_pass(model, done, spec, seeds)


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


class LlavaAdapter:
    """The :class:`~recomp_eval.models.base.ModelAdapter` of LLaVA-1.5 checkpoints."""

    family = "llava"
    supported_signals = frozenset(SIGNALS)  # a CLIP tower with a CLS token and a CLIP text pair

    def resolve(self, model_id: str) -> str:
        """``tiny`` builds the offline tiny checkpoint; a relative folder is looked up in the
        working directory, then in the repository; anything else is a hub id."""
        from recomp_eval.config_path import CONFIG_DIR
        from recomp_eval.models.llava.tiny import build_tiny

        if model_id == "tiny":
            return str(build_tiny())
        path = Path(model_id).expanduser()
        if path.is_absolute() or path.exists():
            return str(path)
        in_repo = CONFIG_DIR.parent / path
        return str(in_repo) if in_repo.exists() else model_id

    def load(self, model_id, dtype, device, attn_implementation, clip_text_id,
             device_map=None) -> ModelBundle:  # fmt: skip
        from recomp_eval.models.llava.loader import load_llava

        return load_llava(model_id, dtype=dtype, device=device,
                          attn_implementation=attn_implementation, clip_text_id=clip_text_id,
                          device_map=device_map)  # fmt: skip

    def render_prompt(self, bundle: ModelBundle, protocol: str, user_text: str) -> str:
        from recomp_eval.models.llava.conversation import render_prompt

        return render_prompt(protocol, user_text, bundle.tokenizer, bundle.processor,
                             bundle.image_token)  # fmt: skip

    def check_prompt(self, bundle: ModelBundle, protocol: str, prompt: str, text: str) -> None:
        check_prompt(prompt, text, bundle.image_token, protocol)

    def template_source(self, bundle: ModelBundle, protocol: str) -> str:
        from recomp_eval.models.llava.conversation import template_source

        return template_source(protocol, bundle.tokenizer, bundle.processor, bundle.model_id)

    def follows(self, protocol: str) -> str:
        """The reference harness the protocol's prompts and generation follow."""
        from recomp_eval.models.llava.conversation import LMMS_WRAPPER

        return LMMS_WRAPPER if protocol == "lmms_eval" else "LLaVA-1.5 model_vqa_loader"

    def preprocess(self, bundle: ModelBundle, images, protocol: str) -> torch.Tensor:
        from recomp_eval.models.llava.images import preprocess_images

        return preprocess_images(images, bundle.image_processor, protocol)

    def hook_points(self, model: torch.nn.Module) -> HookPoints:
        return hook_points(model)

    def tower_pass(self, bundle, pixel_values, probe, extra_q=(), extra_k=()):
        return tower_pass(bundle.model, pixel_values, probe, extra_q, extra_k)

    def last_hidden(self, bundle: ModelBundle, pixel_values: torch.Tensor) -> torch.Tensor:
        return last_hidden_state(bundle.model, pixel_values)

    def signals(self, bundle, done, spec, seeds=None) -> TowerOutput:
        """The tower pass's signals; ``spec.patch_embeds`` adds the feature-layer patches in the
        CLIP joint space (the tower's ``post_layernorm``, the CLIP pair's ``visual_projection``)."""
        out = signals_from_pass(bundle.model, done, spec, seeds)
        if spec.patch_embeds is not None:
            from recomp_eval.models.llava.loader import load_clip_text
            from recomp_eval.signals.vision import joint_space_patches

            clip = load_clip_text(bundle.clip_text_id, bundle.dtype, bundle.device,
                                  llava_model=bundle.model)  # fmt: skip
            out.signals.patch_embeds = joint_space_patches(
                out.signals.features,
                vision_tower(bundle.model).post_layernorm,
                clip.visual_projection,
                spec.patch_embeds,
            )  # [B,N,D]
        return out

    def add_text_signal(self, bundle, tower_out, spec, questions, prompt_ids,
                        user_texts=()) -> None:  # fmt: skip
        """CLIP text embedding of the text ``spec.text`` picks: against the patches projected by
        the CLIP checkpoint's ``visual_projection`` (``text_sim``), or as vectors
        (``text_embeds``, ``text_mask``) for methods that score patches themselves."""
        from recomp_eval.models.llava.loader import load_clip_text
        from recomp_eval.signals.text import encode_text_embeddings, encode_texts, select_texts

        clip = load_clip_text(bundle.clip_text_id, bundle.dtype, bundle.device,
                              llava_model=bundle.model)  # fmt: skip
        texts = select_texts(spec.text, questions, prompt_ids, bundle.tokenizer,
                             bundle.image_token_id, user_texts)  # fmt: skip
        if spec.text.output == "embeddings":
            embeds, mask = encode_text_embeddings(clip, texts, spec.text)  # [B,M,D], [B,M]
            tower_out.signals.text_embeds, tower_out.signals.text_mask = embeds, mask
            return
        text_embeds = encode_texts(clip, texts, spec.text)  # [B,D]
        add_text_signal(tower_out, text_embeds, clip.visual_projection)

    def text_tower_path(self, checkpoint: str, clip_text_id: str | None) -> str:
        """Where the CLIP text tower loads from: ``model.clip_text_id``, else the checkpoint's
        ``clip/`` sub-folder, else the CLIP checkpoint LLaVA-1.5's tower came from."""
        from recomp_eval.models.llava.loader import DEFAULT_CLIP_TEXT_ID

        if not clip_text_id:
            sub = Path(checkpoint) / "clip"
            clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
        return self.resolve(str(clip_text_id))

    def text_pairing(self, bundle: ModelBundle) -> dict[str, Any]:
        """The CLIP pairing check of the text tower's checkpoint, for the record."""
        from recomp_eval.models.llava.loader import load_clip_text

        clip = load_clip_text(bundle.clip_text_id, bundle.dtype, bundle.device,
                              llava_model=bundle.model)  # fmt: skip
        return {"clip_text_id": bundle.clip_text_id, **(clip.pairing or {})}

    def project(self, bundle: ModelBundle, compressed: Compressed) -> list[torch.Tensor]:
        return project(bundle.model, compressed)

    def expand_prompt(self, bundle, prompt_ids, lengths):
        return expand_image_tokens(prompt_ids, lengths, bundle.image_token_id,
                                   bundle.tokenizer.pad_token_id, bundle.device)  # fmt: skip

    def generate(self, bundle, input_ids, attention_mask, features, **generate_kwargs):
        return generate_with_features(bundle.model, input_ids, attention_mask, features,
                                      **generate_kwargs)  # fmt: skip

    def shapes(self, bundle: ModelBundle) -> ModelShapes:
        config = bundle.model.config
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        return ModelShapes(
            patches=side * side,
            grid=(side, side),
            decoder=DecoderShape.from_config(config.text_config),
            vision_flops=vit_flops(vc),
            context_length=int(config.text_config.max_position_embeddings),
        )
