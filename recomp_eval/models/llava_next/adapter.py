"""The LLaVA-NeXT family: HF ``LlavaNextForConditionalGeneration`` (anyres), two phases.

Phase 1 (vision side): the processor's anyres crops of every image (a base crop and a grid
of crops) run through the CLIP tower as one batch of tower items under the q/k hooks; the
signals are per crop (each crop its own CLS attention and, for text-guided methods, the
question's text signal). The method runs per the model option ``scope``:

- ``per_crop`` (default, the peers' convention): every crop is one item with its own budget
  (``retention`` of its N patches: 64/576 per crop is 64 x 5 = 320 for a five-crop image);
- ``global``: an image's crops are one item of K*N patches with one budget over all of them
  (images are grouped by crop count, the method runs once per group).

The kept tokens go through the projector and are placed in the stock packed order
(:mod:`recomp_eval.models.llava_next.tokens`; base crop first, then the unpadded grid map row by
row), with the ``image_newline`` rule of the model option ``newlines`` (``row``: per kept row,
``all``, ``none``). Newlines are LLM inputs: they count in the tokens the LLM receives
(``kept_tokens``) and are reported apart in each row's ``image`` entry.
Phase 2 (LLM): the prompt's single image token is repeated T_i times per sample (T_i: the
packed rows, newlines included) and ``generate`` receives the rows through
``mm_encoder_outputs``, as the LLaVA-1.5 family.

Letters: B images, P tower items (crops), K_i crops of image i, N patches per crop, C tower
width, E LLM width, T_i tokens the LLM receives for image i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from recomp_eval.efficiency.flops import DecoderShape, vit_flops
from recomp_eval.methods.base import Compressed
from recomp_eval.models.base import (
    SIGNALS,
    BatchLayout,
    ModelBundle,
    ModelShapes,
    TowerOutput,
    check_prompt,
    resolve_model_id,
    run_method,
)
from recomp_eval.models.clip_tower import ClipTowerSteps
from recomp_eval.models.llava_next.packing import crops_per_image, pack_layout
from recomp_eval.models.llava_next.tokens import (
    NEWLINE_MODES,
    SCOPES,
    ImageTokens,
    from_crops,
    from_image_row,
    gather_packed,
    group_signals,
    llm_provenance,
    packed_order,
    token_crops,
)


class GlobalOutput:
    """The method's output with ``scope: global``: one :class:`Compressed` per crop-count
    group, each row an image (``groups[j] = (samples, compressed)``)."""

    def __init__(self, groups: list[tuple[list[int], Compressed]]):
        self.groups = groups


def image_sizes(images: Sequence[Any]) -> list[tuple[int, int]]:
    """(height, width) of each PIL image, as the processor's ``image_sizes``."""
    return [(int(im.size[1]), int(im.size[0])) for im in images]


class LlavaNextAdapter(ClipTowerSteps):
    """The :class:`~recomp_eval.models.base.ModelAdapter` of LLaVA-NeXT checkpoints.

    ``scope`` and ``newlines`` come from the model config's ``options`` (part of the run's
    identity); the base LLM (``vicuna`` or ``mistral``) is read from the checkpoint at load.
    """

    family = "llava_next"
    supported_signals = frozenset(SIGNALS)  # the CLIP tower of LLaVA-1.5, per crop

    def __init__(self, scope: str = "per_crop", newlines: str = "row", base: str | None = None):
        if scope not in SCOPES:
            raise ValueError(
                f"model.options.scope={scope!r}; expected one of {', '.join(SCOPES)} "
                f"(per_crop: a budget per crop; global: one budget over an image's crops)"
            )
        if newlines not in NEWLINE_MODES:
            raise ValueError(
                f"model.options.newlines={newlines!r}; expected one of {', '.join(NEWLINE_MODES)}"
                f" (row: a newline per kept row; all: every row's; none: no newlines)"
            )
        self.scope, self.newlines, self.base = scope, newlines, base

    # --- loading and prompts ---------------------------------------------------------------

    def resolve(self, model_id: str) -> str:
        """``tiny_next`` builds the offline tiny checkpoint; folders and hub ids as they are."""
        from recomp_eval.models.llava_next.tiny import build_tiny_next

        return resolve_model_id(model_id, "tiny_next", build_tiny_next)

    def load(self, model_id, dtype, device, attn_implementation, clip_text_id,
             device_map=None) -> ModelBundle:  # fmt: skip
        from recomp_eval.models.llava_next.conversation import base_of
        from recomp_eval.models.llava_next.loader import load_llava_next

        bundle = load_llava_next(model_id, dtype=dtype, device=device,
                                 attn_implementation=attn_implementation,
                                 clip_text_id=clip_text_id, device_map=device_map)  # fmt: skip
        bundle.adapter = LlavaNextAdapter(self.scope, self.newlines, base_of(bundle.model.config))
        return bundle

    def _base(self, bundle: ModelBundle) -> str:
        from recomp_eval.models.llava_next.conversation import base_of

        return self.base or base_of(bundle.model.config)

    def render_prompt(self, bundle: ModelBundle, protocol: str, user_text: str) -> str:
        from recomp_eval.models.llava_next.conversation import render_prompt

        return render_prompt(protocol, user_text, bundle.tokenizer, bundle.processor,
                             bundle.image_token, self._base(bundle))  # fmt: skip

    def check_prompt(self, bundle: ModelBundle, protocol: str, prompt: str, text: str) -> None:
        check_prompt(prompt, text, bundle.image_token, protocol)

    def template_source(self, bundle: ModelBundle, protocol: str) -> str:
        from recomp_eval.models.llava_next.conversation import template_source

        return template_source(protocol, bundle.tokenizer, bundle.processor, bundle.model_id,
                               self._base(bundle))  # fmt: skip

    def follows(self, protocol: str) -> str:
        from recomp_eval.models.llava_next.conversation import follows

        return follows(protocol, self.base or "vicuna")

    # --- vision side -----------------------------------------------------------------------

    def preprocess(self, bundle: ModelBundle, images, protocol: str) -> torch.Tensor:
        """The processor's anyres crops of every image, flat: [sum K_i, 3, S, S] (the
        protocol's ``image_mode`` is LLaVA-1.5's and does not apply: anyres as the processor)."""
        rgb = [im.convert("RGB") for im in images]
        out = bundle.image_processor(images=rgb, return_tensors="pt")
        counts = crops_per_image(bundle.model, out["image_sizes"])
        pixels = out["pixel_values"]  # [B, max K, 3, S, S], zero crops padding
        return torch.cat([pv[:k] for pv, k in zip(pixels, counts)], dim=0)

    def layout(self, bundle: ModelBundle, images, pixel_values: torch.Tensor) -> BatchLayout:
        sizes = image_sizes(images)
        counts = crops_per_image(bundle.model, sizes)
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} crops for images that need {sum(counts)}: the pixels "
                f"do not come from this checkpoint's anyres processor"
            )
        return BatchLayout(items=tuple(counts), data=sizes)

    def apply(self, bundle, method, tower_out: TowerOutput, layout: BatchLayout):
        """Per crop: the method on the crops as they are. Global: on each image's crops
        concatenated, one call per group of images with equally many crops."""
        if self.scope == "per_crop":
            return run_method(method, tower_out)
        starts = _starts(layout.items)
        groups = []
        for k in sorted(set(layout.items)):
            samples = [i for i, c in enumerate(layout.items) if c == k]
            members = [range(starts[i], starts[i] + k) for i in samples]
            grouped = TowerOutput(group_signals(tower_out.signals, members), tower_out.last_hidden)
            groups.append((samples, run_method(method, grouped)))
        return GlobalOutput(groups)

    def _image_tokens(self, compressed: Any, layout: BatchLayout) -> list[ImageTokens]:
        """One :class:`ImageTokens` per image (whole-image indexing) from the method output."""
        if isinstance(compressed, GlobalOutput):
            out: list[ImageTokens | None] = [None] * len(layout.items)
            for samples, c in compressed.groups:
                n = c.members.shape[-1] // layout.items[samples[0]]
                for row, i in enumerate(samples):
                    out[i] = from_image_row(c, row, n)
            return out  # type: ignore[return-value]
        starts = _starts(layout.items)
        return [from_crops(compressed, s, k) for s, k in zip(starts, layout.items)]

    def _packed(self, bundle: ModelBundle, compressed: Any, layout: BatchLayout):
        tokens = self._image_tokens(compressed, layout)
        layouts = [pack_layout(bundle.model, size) for size in layout.data]
        orders = [packed_order(lay, tok, self.newlines) for lay, tok in zip(layouts, tokens)]
        return tokens, layouts, orders

    def project(self, bundle: ModelBundle, compressed: Any, layout: BatchLayout):
        """B x [T_i, E]: the projector on each image's kept tokens, in the packed order with
        its newlines."""
        inner = bundle.model.model
        tokens, _, orders = self._packed(bundle, compressed, layout)
        out = []
        for tok, order in zip(tokens, orders):
            feats = inner.multi_modal_projector(tok.features)  # [T,E]
            out.append(gather_packed(feats, order.order, inner.image_newline))  # [T_i,E]
        return out

    def provenance(self, bundle: ModelBundle, compressed: Any, layout: BatchLayout):
        """Per image the LLM-order provenance over its K*N patches and the row's ``image``
        entry: crops, size, unpadded grid, kept tokens per crop, newlines, margin drops."""
        tokens, layouts, orders = self._packed(bundle, compressed, layout)
        crop_flops = vit_flops(bundle.model.config.vision_config)
        result = []
        for tok, lay, order, size in zip(tokens, layouts, orders, layout.data):
            placed = order.order[order.order >= 0]
            crop = token_crops(tok, lay.patches)[placed]
            info = {
                "crops": lay.crops,
                "size": list(size),
                "grid": list(lay.grid),
                "scope": self.scope,
                "newline_rule": self.newlines,
                "kept_per_crop": [int((crop == k).sum()) for k in range(lay.crops)],
                "summary_tokens": int((crop < 0).sum()),
                "newlines": order.newlines,
                "margin_dropped": order.margin_dropped,
                "image_tokens": lay.length,  # what the LLM would see uncompressed
                # the patch counts `retention` applies to, and one tower pass over the crops
                "budget_over": [lay.patches * lay.crops]
                if self.scope == "global"
                else [lay.patches] * lay.crops,
                "vision_flops": lay.crops * crop_flops,
            }
            result.append((llm_provenance(tok, order), info))
        return result

    # --- LLM side --------------------------------------------------------------------------

    def keep_map_panels(self, bundle: ModelBundle, codes, row) -> list:
        """Two panels over the whole image: the base crop's patches and the grid crops' map,
        unpadded as packed (codes over the K*N patches, crop-major)."""
        import numpy as np

        layout = pack_layout(bundle.model, tuple(row["image"]["size"]))
        side = math.isqrt(layout.patches)
        panels = [("base crop", codes[: layout.patches].reshape(side, side))]
        rows, cols = layout.grid
        if rows:
            on_map = layout.row >= 0
            src = layout.source[on_map]
            grid = np.asarray(codes)[src[src >= 0].numpy()].reshape(rows, cols)
            panels.append((f"{layout.crops - 1} grid crops", grid))
        return panels

    def shapes(self, bundle: ModelBundle) -> ModelShapes:
        """Sizes from the config; ``patches`` is the largest packed image (every pinpoint at
        its own aspect ratio: no unpadding), which bounds the context check."""
        config = bundle.model.config
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        largest = max(pack_layout(bundle.model, tuple(p)).length
                      for p in config.image_grid_pinpoints)  # fmt: skip
        return ModelShapes(
            patches=largest,
            grid=(side, side),
            decoder=DecoderShape.from_config(config.text_config),
            vision_flops=vit_flops(vc),  # one crop; the records count each image's crops
            context_length=int(config.text_config.max_position_embeddings),
            fixed_grid=False,
        )


def _starts(items: Sequence[int]) -> list[int]:
    """First tower item of each sample."""
    starts, at = [], 0
    for k in items:
        starts.append(at)
        at += k
    return starts
