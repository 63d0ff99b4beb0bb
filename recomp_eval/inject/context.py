"""``with compress(model, method) as probe:``: everything a method needs, on this model only.

Entering registers the vision q/k hooks the method's :class:`SignalSpec` asks for, at the hook
points the model family's adapter names, and, for in-LLM methods (``method.llm`` set, e.g.
FastV), the LLM pruning of :func:`recomp_eval.inject.llm_attention.llm_pruning`. Leaving removes
every hook and restores the attention implementation, also on error. Nothing is stored on
modules or in module globals: the captures live in the yielded :class:`CompressionProbe`.
The code knows no family: the adapter comes from the bundle, or from the registry by the
model's config.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from recomp_eval.signals.vision import QKProbe, capture_qk, resolve_layer


@dataclass
class CompressionProbe:
    """Per-context captures: ``vision`` (q/k hooks) and ``llm`` (the in-LLM pruning probe)."""

    vision: QKProbe
    q_layers: tuple[int, ...]
    k_layers: tuple[int, ...]
    llm: Any = None
    spec: Any = None  # the method's SignalSpec (families that capture signals in their pass)


def hook_layers(spec: Any, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolved (q_layers, k_layers) a :class:`SignalSpec` needs hooked."""
    q_layers: set[int] = set()
    k_layers: set[int] = set()
    if spec.cls_attn is not None:
        layer = resolve_layer(spec.cls_attn_layer, num_layers)
        q_layers.add(layer)
        k_layers.add(layer)
    if spec.keys is not None:
        k_layers.add(resolve_layer(spec.keys_layer, num_layers))
    return tuple(sorted(q_layers)), tuple(sorted(k_layers))


@contextmanager
def compress(
    model: torch.nn.Module, method: Any, image_token_id: int | None = None, adapter: Any = None
) -> Iterator[CompressionProbe]:
    """Install what ``method`` needs on ``model`` for the duration of the block.

    Args:
        model: a loaded vision-language model of a registered family.
        method: a :class:`~recomp_eval.methods.BuiltMethod`.
        image_token_id: the image placeholder id (default ``model.config.image_token_id``).
        adapter: the family adapter (default: the registry's adapter for the model's config).
    """
    from recomp_eval.inject.llm_attention import llm_pruning
    from recomp_eval.models import adapter_for_model

    points = (adapter or adapter_for_model(model)).hook_points(model)
    q_layers, k_layers = hook_layers(method.spec, points.num_layers)
    if points.attention is None:  # the family captures what it needs inside its tower pass
        q_layers, k_layers = (), ()
    if image_token_id is None:
        image_token_id = int(model.config.image_token_id)
    with ExitStack() as stack:
        vision = stack.enter_context(capture_qk(points.tower, q_layers, k_layers, points.attention))
        llm = None
        if method.llm is not None:
            llm = stack.enter_context(llm_pruning(model, method.llm, image_token_id))
        yield CompressionProbe(vision=vision, q_layers=q_layers, k_layers=k_layers, llm=llm,
                               spec=method.spec)  # fmt: skip
