"""FastV as a registered method: identity on the vision side, pruning inside the LLM.

The vision side hands every patch to the projector (:func:`recomp_eval.methods.identity.compress`);
``BuiltMethod.llm`` carries a :class:`~recomp_eval.llm_methods.fastv.FastVConfig` that the model
adapter applies with :func:`recomp_eval.inject.llm_attention.llm_pruning`.
"""

from __future__ import annotations

from typing import Any

from recomp_eval.llm_methods.fastv import FastVConfig
from recomp_eval.methods.base import SignalSpec
from recomp_eval.methods.identity import compress


def build(
    name: str = "fastv",
    retention: float | None = None,
    k_layer: int = 2,
    ratio: float = 0.5,
    variant: str = "prune",
    score: str = "last_query",
    **kwargs: Any,
):
    """Build FastV.

    Args:
        retention: if set, the kept image tokens are ``budget_from_ratio(retention, N)`` (overrides
            ``ratio``); None uses ``ratio``.
        k_layer, ratio, variant, score: see :class:`~recomp_eval.llm_methods.fastv.FastVConfig`.
    """
    from recomp_eval.methods import BuiltMethod

    if kwargs:
        raise ValueError(
            f"method '{name}' got unknown options {sorted(kwargs)}; known: retention, k_layer, "
            f"ratio, variant, score"
        )
    cfg = FastVConfig(
        k_layer=k_layer, ratio=ratio, variant=variant, score=score, retention=retention
    )
    config = {
        "retention": retention,
        "k_layer": k_layer,
        "ratio": ratio,
        "variant": variant,
        "score": score,
    }
    return BuiltMethod(name=name, spec=SignalSpec(), fn=compress, config=config, llm=cfg)
