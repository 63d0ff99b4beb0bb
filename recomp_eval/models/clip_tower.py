"""The steps every family with a CLIP ViT tower shares (LLaVA-1.5, LLaVA-NeXT).

The tower sits at ``model.model.vision_tower`` with ``model.config.vision_feature_layer`` and
``vision_config``; its items are images (LLaVA-1.5) or crops (LLaVA-NeXT, which runs them through
the tower as one batch). :class:`ClipTowerSteps` is the part of a family adapter these give: hook
points, the tower pass under the q/k hooks, the vision signals, and the CLIP text signal
(text tower from the CLIP checkpoint paired with the model's tower).

Letters: B tower items, N patches, C ViT width, D CLIP joint width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recomp_eval.methods.base import SignalSpec, VisionSignals
from recomp_eval.models.base import HookPoints, ModelBundle, TowerOutput
from recomp_eval.signals.vision import (
    CLS_INDEX,
    cls_attention_concat,
    cls_attention_mean_heads,
    joint_space_similarity,
    patch_keys,
    resolve_layer,
)

DEFAULT_CLIP_TEXT_ID = "openai/clip-vit-large-patch14-336"  # the tower LLaVA-1.5 and NeXT froze


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


def add_text_signal(
    tower_out: TowerOutput, text_embeds: torch.Tensor, visual_projection: torch.nn.Module
) -> None:
    """Set ``signals.text_sim`` [B,N] from ``e_t`` [B,D] and the tower's last hidden state."""
    tower_out.signals.text_sim = joint_space_similarity(
        text_embeds, tower_out.last_hidden, visual_projection
    )  # [B,N]


def check_feature_config(model: Any, tokenizer: Any, model_id: str) -> None:
    """The config assumptions of these steps, each a one-line error: one int feature layer, CLS
    dropped (``default``), an image placeholder that is one tokenizer token."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(
            f"{model_id}: vision_feature_layer={cfg.vision_feature_layer}; only a single int "
            f"layer is supported"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            f"{model_id}: vision_feature_select_strategy='{cfg.vision_feature_select_strategy}'; "
            f"the adapter expects 'default' (CLS dropped)"
        )
    token = tokenizer.convert_ids_to_tokens(int(cfg.image_token_id))
    if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError(f"{model_id}: image token '{token}' is not a single tokenizer token")


def load_clip_family(
    model_class: Any, model_type: str, model_id: str, dtype: Any, device: Any,
    attn_implementation: str, clip_text_id: str | None, device_map: Any,
    image_processor: Any, adapter: Any, processor_kwargs: dict[str, Any] | None = None,
) -> ModelBundle:  # fmt: skip
    """A CLIP-tower checkpoint as a :class:`ModelBundle`: the model (``model_class``, which must
    be a ``model_type`` checkpoint), the processor with ``image_processor(model_id)`` pinned in,
    a left-padding tokenizer, the config checked, and the CLIP text tower's id (``clip_text_id``,
    else the folder's ``clip/``, else :data:`DEFAULT_CLIP_TEXT_ID`)."""
    from transformers import AutoProcessor, AutoTokenizer

    from recomp_eval.models.checkpoint_checks import check_checkpoint_folder
    from recomp_eval.models.hf_loading import (
        _from_pretrained,
        _local_folder,
        load_hf_model,
        resolve_dtype,
    )

    torch_dtype = resolve_dtype(dtype)
    if (folder := _local_folder(model_id)) is not None:
        check_checkpoint_folder(folder)
    model, device = load_hf_model(model_class, model_id, torch_dtype, device,
                                  attn_implementation, device_map)  # fmt: skip
    if model.config.model_type != model_type:
        raise ValueError(
            f"{model_id} is a '{model.config.model_type}' checkpoint, not {model_type}; use its "
            f"family's model config (model.family)"
        )
    processor = _from_pretrained(AutoProcessor, model_id, **(processor_kwargs or {}))
    auto_class = type(processor.image_processor).__name__
    processor.image_processor = image_processor(model_id)
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    tokenizer.padding_side = "left"
    check_feature_config(model, tokenizer, model_id)
    if clip_text_id is None:
        sub = Path(model_id).expanduser() / "clip"
        clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
    return ModelBundle(model=model, tokenizer=tokenizer, processor=processor, model_id=model_id,
                       dtype=torch_dtype, device=device, clip_text_id=clip_text_id,
                       adapter=adapter, auto_image_processor_class=auto_class)  # fmt: skip


class ClipTowerSteps:
    """Adapter methods shared by the CLIP-tower families (a mix-in: the family class gives
    ``family``, ``resolve`` and the rest of :class:`~recomp_eval.models.base.ModelAdapter`)."""

    def hook_points(self, model: torch.nn.Module) -> HookPoints:
        return hook_points(model)

    def check_method(self, method) -> None:
        """Every method runs on a CLIP tower (signals are checked apart)."""

    def expand_prompt(self, bundle, prompt_ids, lengths):
        """The prompt's image token repeated ``T_i`` times per sample, left-padded."""
        from recomp_eval.models.llm_inputs import expand_image_tokens

        return expand_image_tokens(prompt_ids, lengths, bundle.image_token_id,
                                   bundle.tokenizer.pad_token_id, bundle.device)  # fmt: skip

    def generate(self, bundle, input_ids, attention_mask, features, provenance=None,
                 **generate_kwargs):  # fmt: skip
        """``generate`` with the rows as ``mm_encoder_outputs`` (1-D positions: nothing to
        place by the provenance)."""
        from recomp_eval.models.llm_inputs import generate_with_features

        return generate_with_features(bundle.model, input_ids, attention_mask, features,
                                      **generate_kwargs)  # fmt: skip

    def tower_pass(self, bundle, pixel_values, probe, extra_q=(), extra_k=(), layout=None):
        return tower_pass(bundle.model, pixel_values, probe, extra_q, extra_k)

    def last_hidden(self, bundle: ModelBundle, pixel_values: torch.Tensor,
                    layout=None) -> torch.Tensor:  # fmt: skip
        return last_hidden_state(bundle.model, pixel_values)

    def signals(self, bundle, done, spec, seeds=None, layout=None) -> TowerOutput:
        """The tower pass's signals; ``spec.patch_embeds`` adds the feature-layer patches in the
        CLIP joint space (the tower's ``post_layernorm``, the CLIP pair's ``visual_projection``)."""
        if seeds is not None and layout is not None:  # per sample -> per tower item
            seeds = seeds[torch.as_tensor(layout.item_sample(), device=seeds.device)]
        out = signals_from_pass(bundle.model, done, spec, seeds)
        out.layout = layout
        if spec.patch_embeds is not None:
            from recomp_eval.models.clip_text import load_clip_text
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
        from recomp_eval.models.clip_text import load_clip_text
        from recomp_eval.signals.text import encode_text_embeddings, encode_texts, select_texts

        clip = load_clip_text(bundle.clip_text_id, bundle.dtype, bundle.device,
                              llava_model=bundle.model)  # fmt: skip
        texts = select_texts(spec.text, questions, prompt_ids, bundle.tokenizer,
                             bundle.image_token_id, user_texts)  # fmt: skip
        if tower_out.layout is not None:  # one text per tower item (a sample's crops share it)
            texts = tower_out.layout.repeat(texts)
        if spec.text.output == "embeddings":
            embeds, mask = encode_text_embeddings(clip, texts, spec.text)  # [B,M,D], [B,M]
            tower_out.signals.text_embeds, tower_out.signals.text_mask = embeds, mask
            return
        text_embeds = encode_texts(clip, texts, spec.text)  # [B,D]
        add_text_signal(tower_out, text_embeds, clip.visual_projection)

    def text_tower_path(self, checkpoint: str, clip_text_id: str | None) -> str:
        """Where the CLIP text tower loads from: ``model.clip_text_id``, else the checkpoint's
        ``clip/`` sub-folder, else the CLIP checkpoint LLaVA-1.5's tower came from."""
        if not clip_text_id:
            sub = Path(checkpoint) / "clip"
            clip_text_id = str(sub) if sub.is_dir() else DEFAULT_CLIP_TEXT_ID
        return self.resolve(str(clip_text_id))

    def text_pairing(self, bundle: ModelBundle) -> dict[str, Any]:
        """The CLIP pairing check of the text tower's checkpoint, for the record."""
        from recomp_eval.models.clip_text import load_clip_text

        clip = load_clip_text(bundle.clip_text_id, bundle.dtype, bundle.device,
                              llava_model=bundle.model)  # fmt: skip
        return {"clip_text_id": bundle.clip_text_id, **(clip.pairing or {})}
