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

from typing import Any

import torch

from recomp_eval.efficiency.flops import DecoderShape, vit_flops
from recomp_eval.methods.base import Compressed, SignalSpec
from recomp_eval.models.base import (
    SIGNALS,
    BatchLayout,
    ModelBundle,
    ModelShapes,
    TowerOutput,
    check_prompt,
    provenance_cpu,
    resolve_model_id,
    run_method,
)
from recomp_eval.models.clip_tower import (  # noqa: F401 - the family's steps, re-exported
    ClipTowerSteps,
    add_text_signal,
    hook_points,
    last_hidden_state,
    signals_from_pass,
    tower_pass,
    vision_tower,
)
from recomp_eval.models.llm_inputs import (  # noqa: F401 - the family's steps, re-exported
    expand_image_tokens,
    generate_with_features,
    image_features_arg,
)


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


@torch.no_grad()
def project(model: torch.nn.Module, compressed: Compressed) -> list[torch.Tensor]:
    """Projector on the kept tokens; per-sample [T_i, E] (padding rows dropped)."""
    feats = model.model.multi_modal_projector(compressed.features)  # [B,M,E]
    return [f[:t] for f, t in zip(feats, compressed.lengths.tolist())]


class LlavaAdapter(ClipTowerSteps):
    """The :class:`~recomp_eval.models.base.ModelAdapter` of LLaVA-1.5 checkpoints."""

    family = "llava"
    supported_signals = frozenset(SIGNALS)  # a CLIP tower with a CLS token and a CLIP text pair

    def resolve(self, model_id: str) -> str:
        """``tiny`` builds the offline tiny checkpoint; folders and hub ids as they are."""
        from recomp_eval.models.llava.tiny import build_tiny

        return resolve_model_id(model_id, "tiny", build_tiny)

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

    def layout(self, bundle: ModelBundle, images, pixel_values: torch.Tensor) -> BatchLayout:
        return BatchLayout.one_each(len(images))  # one tower item per image

    def apply(self, bundle, method, tower_out, layout=None) -> Compressed:
        return run_method(method, tower_out)

    def project(
        self, bundle: ModelBundle, compressed: Compressed, layout=None
    ) -> list[torch.Tensor]:
        return project(bundle.model, compressed)

    def provenance(self, bundle, compressed: Compressed, layout=None):
        """Per sample the method's output rows as they are (the LLM sees them in that order)."""
        cpu = provenance_cpu(compressed)
        return [(cpu.sample(i), {}) for i in range(cpu.lengths.shape[0])]

    def keep_map_panels(self, bundle: ModelBundle, codes, row) -> list:
        return [("", codes.reshape(self.shapes(bundle).grid))]  # one grid over the image

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
