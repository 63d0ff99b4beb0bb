"""Model families: a lazy registry of adapters, and ``load_model`` from a ``model`` config.

A family is a package ``recomp_eval/models/<family>/`` with a
:class:`~recomp_eval.models.base.ModelAdapter`; ``configs/model/*.yaml`` name it
(``family: llava``). Entries are import paths, imported on first use, so importing this package
loads no family. Everything outside the family packages reaches a family through this registry
and the :class:`~recomp_eval.models.base.ModelBundle` it loads.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from recomp_eval.models.base import ModelAdapter, ModelBundle, ModelShapes, check_signals

__all__ = [
    "FAMILIES",
    "MODEL_TYPES",
    "ModelAdapter",
    "ModelBundle",
    "ModelShapes",
    "adapter_for_model",
    "check_signals",
    "get_adapter",
    "load_model",
    "register_family",
]

# family -> "module:Class" of its adapter
FAMILIES: dict[str, str] = {
    "llava": "recomp_eval.models.llava.adapter:LlavaAdapter",
    "llava_next": "recomp_eval.models.llava_next.adapter:LlavaNextAdapter",
    "qwen2_5_vl": "recomp_eval.models.qwen2_5_vl.adapter:QwenAdapter",
}
# transformers ``config.model_type`` -> family (to find the adapter of an already loaded model)
MODEL_TYPES: dict[str, str] = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_5_vl": "qwen2_5_vl",
}
DEFAULT_FAMILY = "llava"


def register_family(name: str, target: str, model_types: tuple[str, ...] = ()) -> None:
    """Add a family (``target``: ``"package.module:AdapterClass"``), e.g. from a plugin or test."""
    if name in FAMILIES and FAMILIES[name] != target:
        raise KeyError(f"model family '{name}' is already registered as {FAMILIES[name]}")
    FAMILIES[name] = target
    for model_type in model_types:
        MODEL_TYPES[model_type] = name


def get_adapter(family: str, options: dict[str, Any] | None = None) -> Any:
    """The adapter of ``family`` (built with the model config's ``options``, the family's own
    settings); an unknown name lists the known ones with a did-you-mean."""
    if family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown model family '{family}'{hint}; known families: {', '.join(sorted(FAMILIES))}"
            f" (model.family in configs/model/*.yaml)"
        )
    module, _, name = FAMILIES[family].partition(":")
    cls = getattr(importlib.import_module(module), name)
    options = dict(options or {})
    try:
        return cls(**options)
    except TypeError:
        raise ValueError(
            f"model.options {options} are not settings of the {family} family; remove them or "
            f"see docs/models.md for the options each family takes"
        ) from None


def adapter_for_model(model: Any) -> Any:
    """The adapter of a loaded model, by its config's ``model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"no model family handles model_type '{model_type}' ({type(model).__name__}); "
            f"known: {', '.join(sorted(MODEL_TYPES))}"
        )
    return get_adapter(MODEL_TYPES[model_type])


def resolve_model_path(model_cfg: Any) -> str:
    """The folder or hub id the ``model`` config loads from (the family resolves special ids)."""
    cfg = dict(model_cfg)
    return get_adapter(str(cfg.get("family") or DEFAULT_FAMILY)).resolve(str(cfg["id"]))


def load_model(model_cfg: Any) -> ModelBundle:
    """Load the configured checkpoint through its family's adapter (``model.family``)."""
    import torch

    cfg = dict(model_cfg)
    adapter = get_adapter(str(cfg.get("family") or DEFAULT_FAMILY), cfg.get("options"))
    from recomp_eval.shards import launched_world_size

    device = cfg.get("device", "cpu")
    device_map = cfg.get("device_map")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={device} but CUDA is not available; pass model.device=cpu "
            f"(and model.dtype=float32 or bfloat16 on CPU)"
        )
    if device_map is not None and launched_world_size() > 1:
        raise ValueError(
            f"model.device_map={device_map} spreads one model over every GPU it sees, but this "
            f"is one of {launched_world_size()} torchrun/accelerate processes; run it as a single "
            f"process (python -m recomp_eval ... model.device_map={device_map}), or drop "
            f"model.device_map to run one whole model per GPU"
        )
    return adapter.load(
        adapter.resolve(str(cfg["id"])),
        dtype=cfg.get("dtype", "float32"),
        device=device,
        attn_implementation=cfg.get("attn_implementation", "sdpa"),
        clip_text_id=cfg.get("clip_text_id"),
        **({} if device_map is None else {"device_map": device_map}),
    )
