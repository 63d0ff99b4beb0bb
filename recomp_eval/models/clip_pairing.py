"""Does the CLIP checkpoint pair with LLaVA's vision tower? (LLaVA-1.5 froze its tower.)

Text-guided scores (RC) project LLaVA's patch features with the CLIP checkpoint's
``visual_projection``, which only fits if both towers hold the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Largest relative difference (max |a - b| / max |a|, a = LLaVA's tensor, in float32) at which two
# vision towers still count as the same weights. Both sides are loaded in one dtype; a checkpoint
# kept in fp32 and one kept in fp16 differ by <= 2^-11 of an element in float32 loads and, after a
# second rounding, by <= 2^-8 (3.9e-3) in bfloat16 loads; different weights differ by far more.
PAIRING_RTOL = 1e-2


def pairing_tensor_names(num_layers: int) -> tuple[str, ...]:
    """Vision-tower tensors the pairing check compares: the patch and position embeddings,
    ``pre_layrnorm``, and the first and last layer's ``q_proj`` and ``fc1`` weights.

    Names are relative to the CLIP vision transformer (5.x ``CLIPVisionModel`` layout).
    """
    last = num_layers - 1
    layers = tuple(
        f"encoder.layers.{i}.{leaf}"
        for i in dict.fromkeys((0, last))  # one layer when the tower has one
        for leaf in ("self_attn.q_proj.weight", "mlp.fc1.weight")
    )
    return (
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        *layers,
    )


def vision_tower(model: Any) -> torch.nn.Module:
    """The CLIP vision transformer (``embeddings``, ``encoder``) inside ``model``.

    Accepts a ``LlavaForConditionalGeneration`` (``model.vision_tower``), a ``LlavaModel``, a
    ``CLIPVisionModelWithProjection`` / ``CLIPModel`` (``vision_model``) or the tower itself.
    """
    inner = getattr(model, "model", None)
    for candidate in (
        getattr(inner, "vision_tower", None),
        getattr(model, "vision_tower", None),
        getattr(model, "vision_model", None),
        model,
    ):
        if hasattr(candidate, "embeddings") and hasattr(candidate, "encoder"):
            return candidate
    raise TypeError(f"no CLIP vision tower found in {type(model).__name__}")


def clip_pairing_check(
    llava_model: torch.nn.Module,
    clip_vision_model: torch.nn.Module | Mapping[str, torch.Tensor],
    names: Sequence[str] | None = None,
    rtol: float = PAIRING_RTOL,
) -> dict[str, Any]:
    """Whether a CLIP checkpoint's vision tower is LLaVA's (LLaVA-1.5 froze its tower).

    Text-guided scores (RC) project LLaVA's patch features with the CLIP checkpoint's
    ``visual_projection``, which only fits if both towers hold the same weights. Compares a few
    tensors by name, cast to float32: per tensor ``max |a - b| / max |a|`` (``a`` LLaVA's).

    Args:
        llava_model: a ``LlavaForConditionalGeneration`` (or anything :func:`vision_tower` takes).
        clip_vision_model: the CLIP checkpoint's ``CLIPVisionModelWithProjection`` (or its tower),
            or a mapping from tower tensor names to tensors.
        names: tower tensor names; default :func:`pairing_tensor_names` for LLaVA's layer count.
        rtol: the largest relative difference that still matches (:data:`PAIRING_RTOL`).

    Returns:
        ``{"checked": [names compared], "missing": [names absent on either side],
        "max_rel_diff": float (inf for a shape mismatch), "worst": name or None, "rtol": rtol,
        "matches": bool}``; ``matches`` needs every name present and within ``rtol``.
    """
    tower = vision_tower(llava_model)
    if names is None:
        names = pairing_tensor_names(tower.config.num_hidden_layers)
    ours = dict(tower.named_parameters())
    if isinstance(clip_vision_model, Mapping):
        theirs = dict(clip_vision_model)
    else:
        theirs = dict(vision_tower(clip_vision_model).named_parameters())
    checked: list[str] = []
    missing: list[str] = []
    worst, max_rel = None, 0.0
    for name in names:
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None:
            missing.append(name)
            continue
        checked.append(name)
        rel = _relative_difference(a, b)
        if worst is None or rel > max_rel:
            worst, max_rel = name, rel
    return {
        "checked": checked,
        "missing": missing,
        "max_rel_diff": max_rel,
        "worst": worst,
        "rtol": rtol,
        "matches": bool(checked) and not missing and max_rel <= rtol,
    }


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |a|`` in float32 on the CPU; ``inf`` for other shapes or non-finite."""
    if a.shape != b.shape:
        return float("inf")
    a32 = a.detach().to("cpu", torch.float32)
    b32 = b.detach().to("cpu", torch.float32)
    scale = a32.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    rel = float((a32 - b32).abs().max() / scale)
    return rel if math.isfinite(rel) else float("inf")  # NaN weights never match


def checkpoint_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "?"


def pairing_warning(clip_id: str, llava_id: str, result: Mapping[str, Any]) -> str:
    missing = result["missing"]
    gap = f", {len(missing)} tensor(s) missing or misnamed ({missing[0]}, ...)" if missing else ""
    return (
        f"CLIP checkpoint '{clip_id}' does not pair with LLaVA '{llava_id}': its vision tower "
        f"differs (largest relative difference {result['max_rel_diff']:.3g} in "
        f"{result['worst']}, tolerance {result['rtol']:g}{gap}); text-guided scores would "
        f"project LLaVA's patch features with another tower's visual_projection"
    )
