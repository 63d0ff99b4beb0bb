"""Analytic prefill FLOPs from the token counts the LLM actually saw.

Per decoder layer with ``n`` tokens, width ``d``, key/value width ``d_kv`` and FFN width ``m``, in
multiply-accumulates (MACs):

* ``fastv`` (FastV, arXiv 2403.06764): ``4 n d^2 + 2 n^2 d + 2 n d m`` (QKVO projections, QK^T and
  AV, a two-matrix FFN). With grouped-query attention the K/V projections shrink: we use
  ``2 n d^2 + 2 n d d_kv`` for QKVO, which equals ``4 n d^2`` when ``d_kv = d``.
* ``swiglu``: the same with a three-matrix (gate, up, down) FFN, ``3 n d m``: what LLaMA/Vicuna
  really run. LLaVA-1.5-7B at n = 640 gives 4.25 TMAC = 8.5 TFLOPs, the figure in RC's cost table.

FLOPs = 2 x MACs. Prefill only: norms, softmax, the LM head and decoding are excluded.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Formula = Literal["fastv", "swiglu"]


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder stack, read from a transformers text config."""

    hidden: int
    intermediate: int
    layers: int
    kv_hidden: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """Build from a Llama-style config (``hidden_size``, ``intermediate_size``, ...)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            kv_hidden=kv_heads * head_dim,
        )


def layer_macs(n: int, shape: DecoderShape, formula: Formula = "swiglu") -> int:
    """MACs of one decoder layer over ``n`` tokens (prefill)."""
    d, m = shape.hidden, shape.intermediate
    qkvo = 2 * n * d * d + 2 * n * d * shape.kv_hidden
    attention = 2 * n * n * d
    ffn_mats = {"fastv": 2, "swiglu": 3}
    if formula not in ffn_mats:
        raise ValueError(f"unknown FLOPs formula '{formula}'; use 'fastv' or 'swiglu'")
    return qkvo + attention + ffn_mats[formula] * n * d * m


def prefill_flops(
    tokens: int | Sequence[int], shape: DecoderShape, formula: Formula = "swiglu"
) -> int:
    """Prefill FLOPs of one sample.

    Args:
        tokens: the sequence length seen by every layer, or one length per layer (in-LLM pruning
            such as FastV shortens the sequence from layer K on).
        shape: decoder sizes.
        formula: ``fastv`` or ``swiglu`` (see module docstring).
    """
    per_layer = [int(tokens)] * shape.layers if isinstance(tokens, int) else list(tokens)
    if len(per_layer) != shape.layers:
        raise ValueError(f"got {len(per_layer)} per-layer token counts for {shape.layers} layers")
    return 2 * sum(layer_macs(n, shape, formula) for n in per_layer)


def vit_flops(vision_config: Any, passes: int = 1) -> int:
    """FLOPs of ``passes`` CLIP ViT forward passes (patches + CLS, GELU MLP: two matrices)."""
    side = vision_config.image_size // vision_config.patch_size
    n = side * side + 1
    shape = DecoderShape(
        hidden=vision_config.hidden_size,
        intermediate=vision_config.intermediate_size,
        layers=vision_config.num_hidden_layers,
        kv_hidden=vision_config.hidden_size,
    )
    return passes * prefill_flops(n, shape, "fastv")


def flops_summary(shapes: Any, method: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean analytic prefill TFLOPs per sample from the counts the LLM saw, and vision TFLOPs.

    ``shapes``: the family's :class:`~recomp_eval.models.base.ModelShapes` (decoder sizes,
    patches per image, one tower pass). ``method.llm`` (an
    :class:`~recomp_eval.llm_methods.base.LLMPruner`, or None) gives the per-layer image-token
    counts through ``visual_counts(num_image, num_layers)``; the tower passes a method costs
    come from :func:`recomp_eval.inject.tower_policy.vision_flops`.
    """
    from recomp_eval.inject.tower_policy import vision_flops

    shape = shapes.decoder
    per_sample = {"swiglu": [], "fastv": []}
    llm = method.llm
    for r in rows:
        text = int(r["text_tokens"])
        if llm is not None:  # an in-LLM method says how many image tokens each layer sees
            n_img = round(r.get("n_image_tokens") or shapes.patches)
            counts = [text + n for n in llm.visual_counts(n_img, shape.layers)]
        else:
            counts = text + round(float(r["kept_tokens"]))
        for formula in per_sample:
            per_sample[formula].append(prefill_flops(counts, shape, formula) / 1e12)  # type: ignore[arg-type]
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    # one tower pass per image: the family's own count where images vary (LLaVA-NeXT's crops,
    # Qwen2.5-VL's patches: rows' image.vision_flops), else the config's one image
    per_image = [float(r["image"]["vision_flops"]) for r in rows
                 if (r.get("image") or {}).get("vision_flops")]  # fmt: skip
    passes = vision_flops(shapes, method.spec) / max(int(shapes.vision_flops), 1)
    one = passes * mean(per_image) if per_image else vision_flops(shapes, method.spec)
    vision_tflops = one / 1e12
    return {
        "prefill_tflops": mean(per_sample["swiglu"]),
        "prefill_tflops_fastv_formula": mean(per_sample["fastv"]),
        "vision_tflops": vision_tflops,
        "formula": "swiglu: 2*(4nd^2 + 2n^2d + 3ndm) per layer (GQA-aware QKVO); fastv: 2ndm FFN",
    }
