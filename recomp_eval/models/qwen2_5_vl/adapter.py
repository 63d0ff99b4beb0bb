"""The Qwen2.5-VL family: HF ``Qwen2_5_VLForConditionalGeneration`` (transformers 5.x).

Vision side: the processor's dynamic-resolution patches of every image run through the tower as
one packed sequence (:mod:`recomp_eval.models.qwen2_5_vl.vision`). Methods compress the merged
tokens, which are what the LLM sees: image i has ``N_i`` of them on its own ``(h_i/2, w_i/2)``
grid. Images are grouped by grid, the method runs once per group, and ``retention`` applies to
``N_i``. A token's members are merged tokens, each one 2 x 2 patch group; keep maps draw them on
the patch grid.

Signals: ``features`` and ``projected`` (the merged tokens: the merger is the projector),
``keys`` (the score block's keys, per merge group), ``seeds``. With the model option
``cls_attn: received``, ``cls_attn`` is the attention each merge group receives at the score block
(``score_block``, default the last full-attention block), recomputed from its q/k under sdpa. This
is a substitute for the CLS attention, which this tower has none of. Without the option, methods
that need CLS attention refuse in one line. There is no CLIP text tower: text-guided methods
(``recomp``, ``trim``, ``cdpruner``) refuse. VisionZip needs the CLS row and refuses.

LLM side: M-RoPE positions. Each sample's positions come from stock ``get_rope_index`` on its
*unpruned* sequence (every merged token in place). The kept tokens take the positions of their
source tokens, and the text keeps its own. ``generate`` gets them as ``position_ids``
[4,B,L] (text row first, as transformers builds them); decoding continues from the last one. So
pruning never renumbers the spatial positions. In-LLM methods keep original positions (FastV,
DART); PyramidDrop renumbers after each stage and refuses.

Letters: B images, N_i merged tokens of image i, E LLM width, T_i kept tokens, L length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recomp_eval.efficiency.flops import DecoderShape
from recomp_eval.methods.base import Compressed, VisionSignals
from recomp_eval.models.base import (
    BatchLayout,
    HookPoints,
    ModelBundle,
    ModelShapes,
    TowerOutput,
    check_prompt,
    provenance_cpu,
    resolve_model_id,
    run_method,
    working_methods,
)
from recomp_eval.models.llm_inputs import expand_image_tokens, image_features_arg
from recomp_eval.models.qwen2_5_vl.vision import (
    QwenTowerPass,
    merged_counts,
    resolve_block,
    tower_pass,
)

CLS_SUBSTITUTES = ("none", "received")
BASE_SIGNALS = frozenset({"features", "keys", "seeds", "projected"})


class GroupedSignals:
    """Per-grid groups of samples with their :class:`VisionSignals` (one N per group)."""

    def __init__(self, groups: list[tuple[list[int], VisionSignals]]):
        self.groups = groups


class GroupedOutput:
    """The method's output per grid group: ``groups[j] = (samples, compressed)``."""

    def __init__(self, groups: list[tuple[list[int], Compressed]]):
        self.groups = groups

    def rows(self, batch: int) -> list[tuple[Compressed, int]]:
        """Per sample its group's :class:`Compressed` and its row there."""
        out: list[Any] = [None] * batch
        for samples, c in self.groups:
            for row, i in enumerate(samples):
                out[i] = (c, row)
        return out


class QwenAdapter:
    """The :class:`~recomp_eval.models.base.ModelAdapter` of Qwen2.5-VL checkpoints; options:
    ``min_pixels``, ``max_pixels`` (None: the checkpoint's), ``score_block`` (None: the last
    full-attention block), ``cls_attn`` (``none`` or ``received``)."""

    family = "qwen2_5_vl"

    def __init__(self, min_pixels: int | None = None, max_pixels: int | None = None,
                 score_block: int | None = None, cls_attn: str = "none"):  # fmt: skip
        if cls_attn not in CLS_SUBSTITUTES:
            raise ValueError(
                f"model.options.cls_attn={cls_attn!r}; expected none (methods needing a CLS "
                f"attention refuse) or received (the attention each token receives at the score "
                f"block stands in for it)"
            )
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.score_block, self.cls_attn = score_block, cls_attn
        extra = {"cls_attn"} if cls_attn == "received" else set()
        self.supported_signals = BASE_SIGNALS | extra

    def _options(self) -> dict[str, Any]:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "score_block": self.score_block, "cls_attn": self.cls_attn}  # fmt: skip

    # --- loading and prompts ---------------------------------------------------------------

    def resolve(self, model_id: str) -> str:
        """``tiny_qwen`` builds the offline tiny checkpoint; folders and hub ids as they are."""
        from recomp_eval.models.qwen2_5_vl.tiny import build_tiny_qwen

        return resolve_model_id(model_id, "tiny_qwen", build_tiny_qwen)

    def load(self, model_id, dtype, device, attn_implementation, clip_text_id,
             device_map=None) -> ModelBundle:  # fmt: skip
        from recomp_eval.models.qwen2_5_vl.loader import load_qwen

        bundle = load_qwen(model_id, dtype=dtype, device=device,
                           attn_implementation=attn_implementation, device_map=device_map,
                           min_pixels=self.min_pixels, max_pixels=self.max_pixels)  # fmt: skip
        bundle.adapter = QwenAdapter(**self._options())
        return bundle

    def render_prompt(self, bundle: ModelBundle, protocol: str, user_text: str) -> str:
        from recomp_eval.models.qwen2_5_vl.conversation import render_prompt

        return render_prompt(protocol, user_text, bundle.processor)

    def check_prompt(self, bundle: ModelBundle, protocol: str, prompt: str, text: str) -> None:
        check_prompt(prompt, text, bundle.image_token, protocol)

    def template_source(self, bundle: ModelBundle, protocol: str) -> str:
        from recomp_eval.models.qwen2_5_vl.conversation import template_source

        return template_source(protocol, bundle.processor, bundle.model_id)

    def follows(self, protocol: str) -> str:
        from recomp_eval.models.qwen2_5_vl.conversation import follows

        return follows(protocol)

    def text_tower_path(self, checkpoint: str, clip_text_id: str | None) -> str:
        raise ValueError(
            f"text-guided methods need a CLIP text tower, which the qwen2_5_vl family does not "
            f"have; methods that work with qwen2_5_vl: {', '.join(working_methods(self))}"
        )

    def text_pairing(self, bundle: ModelBundle) -> dict[str, Any]:
        return {}

    def check_method(self, method: Any) -> None:
        """PyramidDrop renumbers the kept rows after each stage: on M-RoPE that would flatten
        the images' spatial positions, so it refuses here."""
        llm = method.llm
        if llm is not None and getattr(llm, "positions", "original") == "renumber":
            raise ValueError(
                f"method '{method.name}' renumbers the kept tokens' positions after each stage, "
                f"which would flatten qwen2_5_vl's M-RoPE spatial positions; in-LLM methods that "
                f"keep them: fastv, dart"
            )

    # --- vision side -----------------------------------------------------------------------

    def preprocess(self, bundle: ModelBundle, images, protocol: str) -> torch.Tensor:
        """The processor's packed patches of every image, [P, 3*2*14*14] (dynamic resolution
        within the pixel bounds; the protocol's ``image_mode`` does not apply)."""
        rgb = [im.convert("RGB") for im in images]
        return bundle.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def layout(self, bundle: ModelBundle, images, pixel_values: torch.Tensor) -> BatchLayout:
        grids = image_grids(bundle.image_processor, images)
        if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} patches for images whose grids need "
                f"{sum(t * h * w for t, h, w in grids)}: the pixels do not come from this "
                f"checkpoint's image processor"
            )
        return BatchLayout(items=(1,) * len(images), data=grids)  # one packed item per image

    def hook_points(self, model: torch.nn.Module) -> HookPoints:
        visual = model.model.visual
        vc = model.config.vision_config
        return HookPoints(tower=visual, num_layers=int(vc.depth), num_heads=int(vc.num_heads),
                          attention=None)  # fmt: skip

    def _needs_block(self, spec: Any) -> bool:
        return spec is not None and (spec.keys is not None or spec.cls_attn is not None)

    def tower_pass(self, bundle, pixel_values, probe, extra_q=(), extra_k=(), layout=None):
        block = None
        if self._needs_block(getattr(probe, "spec", None)) or extra_k or extra_q:
            block = resolve_block(bundle.model, self.score_block)
        return tower_pass(bundle.model, pixel_values, layout.data, block)

    def last_hidden(self, bundle, pixel_values, layout=None) -> torch.Tensor:
        raise ValueError("qwen2_5_vl has no second tower pass (RC official's repeated pass)")

    def signals(self, bundle, done: QwenTowerPass, spec, seeds=None, layout=None) -> TowerOutput:
        """Per grid group: merged tokens [G,N,E], keys [G,N,C], the received-attention
        substitute [G,N] when ``cls_attn: received``, the merged grid."""
        grids = layout.data
        counts = merged_counts(grids)
        starts = np.cumsum([0, *counts])[:-1].tolist()
        by_grid: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(tuple(g), []).append(i)
        groups = []
        for grid, samples in by_grid.items():
            rows = [torch.arange(starts[i], starts[i] + counts[i]) for i in samples]
            index = torch.stack(rows).to(done.merged.device)  # [G,N]
            features = done.merged[index]  # [G,N,E]
            keys = cls_attn = None
            if spec.keys is not None:
                keys = done.keys[index]  # [G,N,C]
                if spec.keys == "mean_heads":
                    heads = int(bundle.model.config.vision_config.num_heads)
                    keys = keys.reshape(*keys.shape[:2], heads, -1).mean(dim=2)
            if spec.cls_attn is not None:
                cls_attn = done.received[index].to(features.dtype)  # [G,N]
            groups.append((samples, VisionSignals(
                features=features,
                cls_attn=cls_attn,
                keys=keys,
                grid=(int(grid[1]) // 2, int(grid[2]) // 2),
                seeds=None if seeds is None else seeds[samples],
                projected=features if spec.projected else None,
            )))  # fmt: skip
        return TowerOutput(signals=GroupedSignals(groups), last_hidden=done.merged, layout=layout)

    def add_text_signal(self, bundle, tower_out, spec, questions, prompt_ids, user_texts=()):
        raise ValueError(self.text_tower_path("", None))

    def apply(self, bundle, method, tower_out: TowerOutput, layout: BatchLayout):
        groups = []
        for samples, signals in tower_out.signals.groups:
            grouped = TowerOutput(signals, tower_out.last_hidden)
            groups.append((samples, run_method(method, grouped)))
        return GroupedOutput(groups)

    def project(self, bundle: ModelBundle, compressed: GroupedOutput, layout: BatchLayout):
        """B x [T_i, E]: the kept merged tokens (the merger already is the projector)."""
        return [c.features[row, : int(c.lengths[row])]
                for c, row in compressed.rows(len(layout.items))]  # fmt: skip

    def provenance(self, bundle: ModelBundle, compressed: GroupedOutput, layout: BatchLayout):
        from recomp_eval.models.qwen2_5_vl.flops import tower_flops

        out = []
        cpu = {id(c): provenance_cpu(c) for _, c in compressed.groups}
        vc = bundle.model.config.vision_config
        for (c, row), grid in zip(compressed.rows(len(layout.items)), layout.data):
            t, h, w = (int(v) for v in grid)
            info = {
                "grid_thw": [t, h, w],
                "merged_grid": [h // 2, w // 2],
                "image_tokens": t * h * w // 4,
                "budget_over": [t * h * w // 4],
                "vision_flops": tower_flops(vc, t * h * w),
            }
            out.append((cpu[id(c)].sample(row), info))
        return out

    # --- LLM side --------------------------------------------------------------------------

    def expand_prompt(self, bundle, prompt_ids, lengths):
        return expand_image_tokens(prompt_ids, lengths, bundle.image_token_id,
                                   bundle.tokenizer.pad_token_id, bundle.device)  # fmt: skip

    def generate(self, bundle, input_ids, attention_mask, features, provenance=None,
                 **generate_kwargs):  # fmt: skip
        """``generate`` with the kept tokens at the M-RoPE positions of their source tokens."""
        from recomp_eval.models.qwen2_5_vl.positions import kept_position_ids

        position_ids = kept_position_ids(bundle.model, input_ids, attention_mask,
                                         bundle.image_token_id, provenance)  # fmt: skip
        return bundle.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     mm_encoder_outputs=image_features_arg(features),
                                     position_ids=position_ids, **generate_kwargs)  # fmt: skip

    def shapes(self, bundle: ModelBundle) -> ModelShapes:
        """``patches``: the most merged tokens an image can get (``max_pixels``), which bounds
        the context check; ``vision_flops`` per image come from each image's patches."""
        from recomp_eval.models.qwen2_5_vl.flops import tower_flops
        from recomp_eval.models.qwen2_5_vl.loader import pixel_bounds

        config = bundle.model.config
        vc = config.vision_config
        _, high = pixel_bounds(bundle.image_processor)
        patch = int(vc.patch_size)
        most = high // (patch * patch)  # patches within max_pixels
        side = int(most**0.5) // 2 * 2
        return ModelShapes(
            patches=most // 4,
            grid=(side // 2, side // 2),
            decoder=DecoderShape.from_config(config.text_config),
            vision_flops=tower_flops(vc, side * side),
            context_length=int(config.text_config.max_position_embeddings),
            fixed_grid=False,
        )

    def keep_map_panels(self, bundle: ModelBundle, codes, row) -> list:
        """The merged tokens' codes on the patch grid (each merged token covers 2 x 2 patches)."""
        rows, cols = row["image"]["merged_grid"]
        merged = np.asarray(codes).reshape(rows, cols)
        return [("", np.kron(merged, np.ones((2, 2), dtype=merged.dtype)))]


def image_grids(image_processor: Any, images) -> list[tuple[int, int, int]]:
    """(t, h, w) patch grid of each image, as the processor's ``image_grid_thw`` (its own
    ``smart_resize`` within its pixel bounds)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from recomp_eval.models.qwen2_5_vl.loader import pixel_bounds

    low, high = pixel_bounds(image_processor)
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    grids = []
    for im in images:
        height, width = smart_resize(im.size[1], im.size[0], factor=patch * merge,
                                     min_pixels=low, max_pixels=high)  # fmt: skip
        grids.append((1, height // patch, width // patch))
    return grids
