"""The contract of in-LLM visual-token pruning methods (no transformers import).

:mod:`recomp_eval.llm_methods.base` defines :class:`LLMPruner`, the interface a method implements
(FastV: :class:`recomp_eval.methods.fastv.FastVConfig`); the model mechanics (registered attention
function, decoder-layer pre-hooks) live in :mod:`recomp_eval.inject.llm_attention` and work for
every implementation.
"""

from recomp_eval.llm_methods.base import (
    POSITION_POLICIES,
    VARIANTS,
    AttentionInputs,
    LLMPruner,
    PositionPolicy,
    PruneView,
    Stage,
    Variant,
    check_depth,
    check_pruner,
    layer_counts,
    topk_keep,
)

__all__ = [
    "POSITION_POLICIES",
    "VARIANTS",
    "AttentionInputs",
    "LLMPruner",
    "PositionPolicy",
    "PruneView",
    "Stage",
    "Variant",
    "check_depth",
    "check_pruner",
    "layer_counts",
    "topk_keep",
]
