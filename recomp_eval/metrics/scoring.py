"""``score(benchmark, records, protocol)``: the metrics a benchmark config names, per protocol.

Which metrics run comes from the benchmark's ``metrics:`` (``configs/benchmark/*.yaml``, read by
:mod:`recomp_eval.benchmarks.specs`) unless the caller passes them. Every pipeline starts by
stripping the generation (both LLaVA's ``model_vqa_loader`` and lmms-eval strip outputs before
scoring). Keys are ``benchmark/metric_variant``; the variant names whose convention the numbers
follow wherever LLaVA-1.5 and lmms-eval 0.7.3 differ. :func:`register_builtin_metrics` fills the
metric registry on its first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from recomp_eval.benchmarks.specs import scoring_spec
from recomp_eval.metrics.gqa import gqa_accuracy
from recomp_eval.metrics.mme import mme_correct, mme_scores
from recomp_eval.metrics.normalize import parse_pope_llava, parse_pope_strict
from recomp_eval.metrics.pope import pope_metrics_by_split, pope_metrics_lmms_eval
from recomp_eval.metrics.registry import METRICS, MetricSpec, Record, Registry
from recomp_eval.metrics.vqa import textvqa_accuracy, vqa_accuracy


def prediction_of(record: Record) -> str:
    """The stripped generation of a record."""
    return str(record.get("prediction") or "").strip()


def _answer(record: Record) -> str:
    answers = record.get("answers") or []
    if not answers:
        raise ValueError(f"record {record.get('sample_id')!r} has no ground-truth answer")
    return str(answers[0])


def _meta(record: Record, key: str) -> Any:
    meta = record.get("meta") or {}
    if key not in meta:
        raise KeyError(f"record {record.get('sample_id')!r} lacks meta[{key!r}]")
    return meta[key]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


PerSample = Callable[[str, Record], float]
_POPE_NEUTRAL = frozenset({"yes_ratio", "gt_yes_ratio", "unparseable_rate"})


def _mean_metric(name: str, variant: str, per_sample: PerSample, description: str) -> MetricSpec:
    def fn(records: Sequence[Record]) -> dict[str, float]:
        return {"accuracy": _mean([per_sample(prediction_of(r), r) for r in records])}

    return MetricSpec(name, fn, variant, per_sample, description=description)


def _gqa(variant: str) -> PerSample:
    return lambda p, r: gqa_accuracy(p, _answer(r), variant=variant)  # type: ignore[arg-type]


def _mme_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    return [
        {
            "category": _meta(r, "category"),
            "image_id": _meta(r, "image_id"),
            "prediction": prediction_of(r),
            "answer": _answer(r),
        }
        for r in records
    ]


def _mme_metric(parser: str) -> MetricSpec:
    return MetricSpec(
        f"mme_{parser}",
        lambda rs: mme_scores(_mme_rows(rs), parser=parser),
        parser,
        lambda pred, r: mme_correct(pred, _answer(r), parser=parser),
        neutral_keys=frozenset({"other_rate", "unpaired_images"}),
        description=f"MME acc + acc+ per category, perception and cognition, {parser} parser",
    )


def builtin_metrics() -> list[MetricSpec]:
    """The metrics that benchmark configs name (``metrics:``), with their metadata."""
    return [
        _mean_metric(
            "gqa_exact_match_llava",
            "llava",
            _gqa("llava"),
            "GQA exact match, LLaVA: trailing periods dropped, lower-cased, gold verbatim",
        ),
        _mean_metric(
            "gqa_exact_match_lmms_eval",
            "lmms_eval",
            _gqa("lmms_eval"),
            "GQA exact match, lmms-eval: lower-cased, all punctuation deleted on both sides",
        ),
        _mean_metric(
            "vqa_accuracy_lmms_eval_073",
            "lmms_eval_073",
            lambda p, r: vqa_accuracy(p, r["answers"], variant="lmms_eval_073"),
            "VQAv2 soft accuracy, EvalAI normalisation of prediction and all answers "
            "(lmms-eval 0.7.3)",
        ),
        _mean_metric(
            "textvqa_accuracy_m4c",
            "m4c",
            lambda p, r: textvqa_accuracy(p, r["answers"]),
            "TextVQA soft accuracy, m4c evaluator (LLaVA and lmms-eval agree)",
        ),
        MetricSpec(
            "pope_llava",
            lambda rs: pope_metrics_by_split(
                [prediction_of(r) for r in rs],
                [_answer(r) for r in rs],
                [_meta(r, "category") for r in rs],
            ),
            "llava",
            lambda p, r: float(parse_pope_llava(p) == _answer(r).lower().strip()),
            neutral_keys=_POPE_NEUTRAL,
            description="POPE, LLaVA parsing; metrics per split, f1_mean = paper number",
        ),
        MetricSpec(
            "pope_lmms_eval",
            lambda rs: pope_metrics_lmms_eval(
                [prediction_of(r) for r in rs], [_answer(r) for r in rs]
            ),
            "lmms_eval",
            lambda p, r: float(parse_pope_strict(p) == _answer(r).lower().strip()),
            neutral_keys=_POPE_NEUTRAL,
            description="POPE, lmms-eval strict yes/no, pooled; gt_yes_ratio is lmms-eval's "
            "pope_yes_ratio (ground truth, do not use)",
        ),
        _mme_metric("mme_tool"),
        _mme_metric("lmms_eval"),
    ]


def register_builtin_metrics(registry: Registry[MetricSpec]) -> None:
    """Register :func:`builtin_metrics` in ``registry`` (``METRICS`` calls this on first use)."""
    for spec in builtin_metrics():
        registry.register(spec.name, spec)


def _has_answers(record: Record) -> bool:
    return bool(record.get("answers"))


def metrics_for(
    benchmark: str, protocol: str, metrics: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The metric names to compute: ``metrics`` when given (e.g. from the composed benchmark
    config), else the ``metrics:`` of ``configs/benchmark/<benchmark>.yaml`` for ``protocol``.

    Raises:
        KeyError: unknown benchmark or protocol (also when ``metrics`` is given).
    """
    default = scoring_spec(benchmark).metrics_for(protocol)
    return default if metrics is None else tuple(metrics)


def score(
    benchmark: str,
    records: Sequence[Record],
    protocol: str,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Aggregate per-sample records into ``{"benchmark/metric_variant": value}``.

    Args:
        benchmark: ``gqa``, ``vqav2``, ``textvqa``, ``pope`` or ``mme``.
        records: per-sample mappings with ``prediction``, ``answers`` and ``meta`` (see
            :data:`~recomp_eval.metrics.registry.Record`). Records without answers (test splits)
            are not scored and are counted in ``benchmark/n_unscored``.
        protocol: ``llava15`` or ``lmms_eval``; picks the benchmark config's metrics.
        metrics: registry names overriding the YAML's (the composed benchmark config's).

    Returns:
        Accuracies in [0, 1] (POPE too); MME in its native points (category 0..200).
    """
    names = metrics_for(benchmark, protocol, metrics)
    scored = [r for r in records if _has_answers(r)]
    out: dict[str, float] = {
        f"{benchmark}/n_scored": float(len(scored)),
        f"{benchmark}/n_unscored": float(len(records) - len(scored)),
    }
    if not scored:
        return out
    for name in names:
        spec = METRICS.get(name)
        out.update({spec.key(benchmark, k): v for k, v in spec.fn(scored).items()})
    return out
