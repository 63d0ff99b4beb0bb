"""Metrics: answer normalisation, per-benchmark scoring, loyalty, submission files."""

from recomp_eval.metrics.gqa import gqa_accuracy
from recomp_eval.metrics.loyalty import loyalty_metrics, paired_bootstrap_ci
from recomp_eval.metrics.mme import COGNITION, PERCEPTION, mme_scores
from recomp_eval.metrics.normalize import (
    evalai_normalize,
    parse_mme_lmms_eval,
    parse_mme_tool,
    parse_pope_llava,
    parse_pope_strict,
)
from recomp_eval.metrics.pope import pope_metrics, pope_metrics_by_split, pope_metrics_lmms_eval
from recomp_eval.metrics.registry import (
    METRICS,
    NORMALIZERS,
    MetricSpec,
    Registry,
    apply_pipeline,
    register_builtin_normalizers,
    register_metric,
)
from recomp_eval.metrics.scoring import metrics_for, register_builtin_metrics, score
from recomp_eval.metrics.submission import (
    SUBMISSION_WRITERS,
    submission_entries,
    write_configured_submission,
    write_submission,
    write_textvqa_submission,
    write_vqav2_submission,
)
from recomp_eval.metrics.vqa import textvqa_accuracy, vqa_accuracy

__all__ = [
    "COGNITION",
    "METRICS",
    "NORMALIZERS",
    "PERCEPTION",
    "SUBMISSION_WRITERS",
    "MetricSpec",
    "Registry",
    "apply_pipeline",
    "evalai_normalize",
    "gqa_accuracy",
    "loyalty_metrics",
    "metrics_for",
    "mme_scores",
    "paired_bootstrap_ci",
    "parse_mme_lmms_eval",
    "parse_mme_tool",
    "parse_pope_llava",
    "parse_pope_strict",
    "pope_metrics",
    "pope_metrics_by_split",
    "pope_metrics_lmms_eval",
    "register_builtin_metrics",
    "register_builtin_normalizers",
    "register_metric",
    "score",
    "submission_entries",
    "textvqa_accuracy",
    "vqa_accuracy",
    "write_configured_submission",
    "write_submission",
    "write_textvqa_submission",
    "write_vqav2_submission",
]
