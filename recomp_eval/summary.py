"""Summaries of a finished run: latency statistics, peak memory, FLOPs, headline metric, slices."""

from __future__ import annotations

import resource
import statistics
from pathlib import Path
from typing import Any

import torch

from recomp_eval.efficiency.flops import flops_summary
from recomp_eval.methods import BuiltMethod

STAGES = ("vision", "text", "compression", "prefill", "decode")
SLICE_TAGS = ("size", "family", "near_large")


def percentiles(values: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank) and mean; NaN when empty."""
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "mean": float("nan")}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * (len(ordered) - 1) + 0.5))]
    return {"median": statistics.median(ordered), "p90": p90, "mean": statistics.fmean(ordered)}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak MiB: the CUDA allocator's peak on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"total": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"total": rss, "kind": "host_rss"}


def latency_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median/p90/mean ms per stage over non-warm-up samples.

    Stage times are per batch; a sample's share is the batch time over the batch size (exact
    per-sample latency needs ``runner.batch_size=1``, as ``experiment=latency`` sets). Decode per
    token is the batch's step time.
    """
    timed = [r for r in rows if not r.get("warmup")] or rows

    def share(r: dict[str, Any], stage: str) -> float:
        return r["timings_ms"].get(stage, 0.0) / max(1, r["batch_size"])

    latency = {s: percentiles([share(r, s) for r in timed]) for s in STAGES}
    latency["batch_size"] = {"max": float(max((r["batch_size"] for r in rows), default=0))}
    latency["decode_per_token"] = percentiles(
        [r["timings_ms"].get("decode", 0.0) / max(1, r["new_tokens"] - 1) for r in timed]
    )
    return latency


def primary_metric_key(
    metrics: dict[str, float],
    bench: str,
    protocol: str,
    primary: str | None = None,
    metric_names: list[str] | None = None,
) -> str:
    """The headline number's key: the benchmark config's ``primary`` result for the protocol
    (accuracy, POPE mean F1 over splits or pooled F1, MME perception), with the variant of the
    first of its ``metrics`` that reports it (``pope/f1_mean_llava``).

    Args:
        primary, metric_names: the composed benchmark config's ``primary`` and ``metrics`` for
            ``protocol``; None reads ``configs/benchmark/<bench>.yaml``.
    """
    from recomp_eval.benchmarks.specs import scoring_spec
    from recomp_eval.metrics.registry import METRICS
    from recomp_eval.metrics.scoring import metrics_for

    name = scoring_spec(bench).primary_for(protocol) if primary is None else primary
    names = metrics_for(bench, protocol, metric_names)
    keys = [METRICS.get(m).key(bench, name) for m in names] + [f"{bench}/{name}"]
    for key in keys:
        if key in metrics:
            return key
    raise KeyError(f"no primary metric '{name}' for {bench} among {sorted(metrics)}")


def slice_metrics(
    rows: list[dict[str, Any]],
    bench: str,
    protocol: str,
    primary: str,
    metric_names: list[str] | None,
    data_dir: str | None,
) -> dict[str, float]:
    """The primary metric per tag value when the data folder ships ``tags.parquet``.

    SynthVQA tags every question with the size of the object it asks about and its family,
    so results can be sliced (e.g. small objects next to a large salient one). Keys:
    ``benchmark/slice/<tag>=<value>/<metric>``.
    """
    from recomp_eval.metrics import score

    if not data_dir or not (Path(data_dir) / "tags.parquet").exists():
        return {}
    from recomp_eval.synth.writers import read_tags

    tags = read_tags(data_dir)
    metric = primary.split("/", 1)[1]
    out: dict[str, float] = {}
    for tag in SLICE_TAGS:
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            value = tags.get(row["sample_id"], {}).get(tag)
            if value is not None:
                groups.setdefault(str(value), []).append(row)
        for value, subset in sorted(groups.items()):
            scored = score(bench, subset, protocol, metrics=metric_names)
            if primary in scored:
                out[f"{bench}/slice/{tag}={value}/{metric}"] = scored[primary]
                out[f"{bench}/slice/{tag}={value}/n"] = float(len(subset))
    return out


def build_record(
    evaluation: Any,
    spec: Any,
    method: BuiltMethod,
    retention: float | None,
    document: dict[str, Any],
    rows: list[dict[str, Any]],
    too_long: list[Any],
    memory: dict[str, Any],
    notes: list[str],
    run_dir: Path,
) -> Any:
    """The :class:`~recomp_eval.records.RunRecord` of a finished run.

    Args:
        evaluation: the :class:`~recomp_eval.evaluate.Evaluation` (config, bundle, benchmark).
        spec, method, retention: the run (``retention``: the effective one, None = adaptive).
        document: the run folder's identity document (``identity.json``).
        rows: every per-sample row of the run.
        too_long: samples skipped because their prompt does not fit the context.
        memory: the run's peak memory over the processes that generated it.
        notes: remarks for the record (e.g. resumed across a contents change).
        run_dir: the run folder.
    """
    from omegaconf import OmegaConf

    from recomp_eval.benchmarks.specs import benchmark_spec_from_config
    from recomp_eval.metrics import score
    from recomp_eval.records import RunRecord, environment

    cfg, bench_cfg, protocol = evaluation.cfg, evaluation.bench_cfg, evaluation.protocol
    bench = evaluation.benchmark.name
    scoring = benchmark_spec_from_config(bench_cfg).scoring  # metrics, pipeline, primary (YAML)
    metric_names = list(scoring.metrics_for(protocol))
    report = evaluation.benchmark.report()
    skipped = list(report.get("skipped", [])) + [b.__dict__ for b in too_long]
    if not rows:
        reasons = sorted({s["reason"] for s in skipped})
        raise ValueError(
            f"no sample of {bench} was evaluated: {len(skipped)} skipped ("
            f"{', '.join(reasons) or 'none selected'}); check the data, benchmark.limit/filters "
            f"and runner.context_length"
        )
    metrics = score(bench, rows, protocol, metrics=metric_names)
    if spec.method != "none":
        reference = evaluation.reference_rows()
        if reference:
            from recomp_eval.metrics.loyalty import loyalty_metrics

            metrics.update(loyalty_metrics(rows, reference, bench, protocol,
                                           answer_pipeline=scoring.pipeline_for(protocol),
                                           metrics=metric_names))  # fmt: skip
    primary = primary_metric_key(metrics, bench, protocol, primary=scoring.primary_for(protocol),
                                 metric_names=metric_names)  # fmt: skip
    data_dir = bench_cfg.get("data_dir")
    metrics.update(slice_metrics(rows, bench, protocol, primary, metric_names, data_dir))
    kept = [float(r["kept_tokens"]) for r in rows]
    device = evaluation.bundle.device
    prompt = next((r["prompt"] for r in rows if r.get("prompt")), None)
    identity = document["identity"]
    limited = cfg.get("limit") if cfg.get("limit") is not None else bench_cfg.get("limit")
    return RunRecord(
        run_key=document["run_key"],
        model={"name": str(cfg.model.name), "id": str(cfg.model.id), "dtype": str(cfg.model.dtype)},
        benchmark={
            "name": bench,
            "version": evaluation.benchmark.version,
            "source": report.get("source"),
            "split": bench_cfg.get("split"),
        },
        protocol=protocol,
        method={
            "name": spec.method,
            "label": spec.label,
            "retention": retention,
            "budget": "adaptive" if retention is None else "fixed",
            "options": spec.options,
            "config": method.config,
        },
        metrics=metrics,
        primary_metric=primary,
        tokens={
            "mean": statistics.fmean(kept) if kept else float("nan"),
            "min": min(kept, default=float("nan")),
            "max": max(kept, default=float("nan")),
            "requested_retention": retention,
        },
        latency_ms=latency_summary(rows),
        flops=flops_summary(evaluation.shapes, method, rows),
        samples={
            "evaluated": len(rows),
            "total": len(rows) + len(skipped),
            "skipped": len(skipped),
            "skipped_ids": skipped,
            "prompt_too_long": len(too_long),
            "converted": report.get("n_converted", 0),
            "first_prompt": prompt,
        },
        reportable=limited is None and device.type == "cuda",
        peak_memory_mb=memory,
        env=environment(str(device)),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        run_dir=str(run_dir),
        identity={
            "settings_key": document["settings_key"],
            "context_key": document["context_key"],
            "pairing_key": document["pairing_key"],
            "contents": identity["contents"],
            "fingerprint_mode": str(cfg.runner.get("fingerprint") or "quick"),
            "limit": limited,
            "revision": identity["revision"],
        },
        experiments=[str(cfg.experiment_name)] if cfg.get("experiment_name") else [],
        notes=list(notes),
        protocol_details=evaluation.protocol_details(),
    )
