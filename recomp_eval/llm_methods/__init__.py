"""Pure scoring rules for in-LLM visual-token pruning (no transformers import).

The model glue (registered attention function, decoder-layer pre-hooks) lives in
:mod:`recomp_eval.inject.llm_attention`; these modules only decide which image positions survive.
"""

from recomp_eval.llm_methods.fastv import (
    FastVConfig,
    keep_index,
    kept_count,
    last_query_scores,
    mean_query_scores,
    select_keep,
)

__all__ = [
    "FastVConfig",
    "keep_index",
    "kept_count",
    "last_query_scores",
    "mean_query_scores",
    "select_keep",
]
