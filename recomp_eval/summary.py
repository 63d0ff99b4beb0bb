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


# per-sample diagnostics of recomp_eval.metrics.targets averaged per run (with CIs) and per slice
TARGET_STATS = (
    "recall_kept", "recall_absorbed", "recall_seen", "recall_summary", "precision",
    "text_on_target", "text_auroc", "text_first_rank", "cls_attn_auroc", "cls_attn_first_rank",
    "recall_llm",
)  # fmt: skip
TARGET_SLICE_STATS = ("recall_kept", "recall_seen", "text_auroc")


def target_metrics(
    rows: list[dict[str, Any]], bench: str, data_dir: str | None
) -> dict[str, float]:
    """Run means of the per-sample target diagnostics (rows with a ``target`` entry).

    Keys: ``<bench>/target/<stat>`` with ``_lo``/``_hi`` (95 % percentile bootstrap over the
    questions, :func:`~recomp_eval.metrics.loyalty.paired_bootstrap_ci`, seed 0) and ``_n`` (the
    questions the stat is defined for), and per SynthVQA tag value
    ``<bench>/target_slice/<tag>=<value>/<stat>`` (and ``.../n``; ``recall_seen`` with its CI).
    """
    import numpy as np

    from recomp_eval.metrics.loyalty import paired_bootstrap_ci

    with_target = [r for r in rows if r.get("target")]
    if not with_target:
        return {}
    out: dict[str, float] = {}

    def values(subset: list[dict[str, Any]], stat: str) -> np.ndarray:
        got = [r["target"].get(stat) for r in subset]
        return np.asarray([v for v in got if v is not None], dtype=np.float64)

    for stat in TARGET_STATS:
        v = values(with_target, stat)
        if v.size:
            low, high = paired_bootstrap_ci(v)
            key = f"{bench}/target/{stat}"
            out.update({key: float(v.mean()), f"{key}_lo": low, f"{key}_hi": high,
                        f"{key}_n": float(v.size)})  # fmt: skip
    if data_dir and (Path(data_dir) / "tags.parquet").exists():
        from recomp_eval.synth.writers import read_tags

        tags = read_tags(data_dir)
        for tag in SLICE_TAGS:
            groups: dict[str, list[dict[str, Any]]] = {}
            for row in with_target:
                value = tags.get(row["sample_id"], {}).get(tag)
                if value is not None:
                    groups.setdefault(str(value), []).append(row)
            for value, subset in sorted(groups.items()):
                prefix = f"{bench}/target_slice/{tag}={value}"
                out[f"{prefix}/n"] = float(len(subset))
                for stat in TARGET_SLICE_STATS:
                    v = values(subset, stat)
                    if v.size:
                        out[f"{prefix}/{stat}"] = float(v.mean())
                        if stat == "recall_seen":  # the slice tables show its CI
                            low, high = paired_bootstrap_ci(v)
                            out[f"{prefix}/{stat}_lo"], out[f"{prefix}/{stat}_hi"] = low, high
    return out


def requested_and_achieved(
    method: BuiltMethod,
    retention: float | None,
    shapes: Any,
    kept: list[float],
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, float | None]:
    """Visual tokens asked for and given, for the record's ``tokens``.

    ``requested``: ``budget_from_ratio(retention, N)`` (None for an adaptive or released budget).
    ``achieved``: pre-LLM methods, the mean tokens the LLM received; in-LLM methods, the image
    tokens at the input of the last decoder layer (their ``kept tokens`` is the mean over
    layers). Where a count rule differs from the request (DART's ``4 + 8 (M // 8)``, TRIM's
    mean token, PyramidDrop's floors), the two differ. Families whose images vary (rows with an
    ``image`` entry) request per image ``retention`` of each item the method saw
    (``image.budget_over``: LLaVA-NeXT's crops, or all its patches with ``global``; Qwen2.5-VL's
    merged tokens), newlines not counted; the mean over rows.
    """
    from recomp_eval.methods.base import budget_from_ratio

    images = [r["image"] for r in rows or () if r.get("image", {}).get("budget_over")]
    if images and not shapes.fixed_grid:

        def asked(image: dict[str, Any]) -> int:  # one budget per item the method saw
            return sum(budget_from_ratio(float(retention), n) for n in image["budget_over"])

        requested = None if retention is None else statistics.fmean(map(asked, images))
        full = [float(r["n_image_tokens"]) for r in rows or () if r.get("n_image_tokens")]
        n = round(statistics.fmean(full)) if full else shapes.patches
    else:
        n = shapes.patches
        requested = None if retention is None else budget_from_ratio(float(retention), n)
    if method.llm is not None:
        achieved = float(method.llm.visual_counts(n, shapes.decoder.layers)[-1])
    else:
        achieved = statistics.fmean(kept) if kept else None
    return {"requested": requested, "achieved": achieved}


def record_context(evaluation: Any, spec: Any, method: BuiltMethod, retention: float | None,
                   notes: list[str], reference_dir: Path | None,
                   report: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What the record needs of the live evaluation, as JSON: each shard's marker carries it, so
    that the record can be built from the run folder alone (by the last shard to finish, or by
    ``recomp-eval-merge`` without loading a model).

    Args:
        evaluation: the :class:`~recomp_eval.evaluate.Evaluation` (config, bundle, benchmark).
        spec, method, retention: the run (``retention``: the effective one, None = adaptive).
        notes: remarks for the record (e.g. resumed across a contents change).
        reference_dir: the folder of the uncompressed run of the same setting (loyalty).
        report: the benchmark's ``report()`` after this process's pass (its data source).
    """
    from dataclasses import asdict

    from omegaconf import OmegaConf

    cfg, bench_cfg = evaluation.cfg, evaluation.bench_cfg
    limited = cfg.get("limit") if cfg.get("limit") is not None else bench_cfg.get("limit")
    return {
        "model": {
            "name": str(cfg.model.name),
            "id": str(cfg.model.id),
            "dtype": str(cfg.model.dtype),
        },
        "benchmark": {
            "name": evaluation.benchmark.name,
            "version": evaluation.benchmark.version,
            "source": report.get("source"),
            "split": bench_cfg.get("split"),
        },
        "bench_cfg": bench_cfg,
        "protocol": evaluation.protocol,
        "method": {
            "name": spec.method,
            "label": spec.label,
            "retention": retention,
            "budget": "adaptive" if retention is None else "fixed",
            "options": spec.options,
            "config": method.config,
        },
        "spec_retention": spec.retention,
        "shapes": asdict(evaluation.shapes),
        "reference_dir": None if reference_dir is None else str(reference_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "fingerprint_mode": str(cfg.runner.get("fingerprint") or "quick"),
        "limit": limited,
        "experiment": str(cfg.experiment_name) if cfg.get("experiment_name") else None,
        "notes": list(notes),
        "protocol_details": evaluation.protocol_details(),
    }


def _shapes(doc: dict[str, Any]) -> Any:
    from recomp_eval.efficiency.flops import DecoderShape
    from recomp_eval.models.base import ModelShapes

    return ModelShapes(**{**doc, "grid": tuple(doc["grid"]),
                          "decoder": DecoderShape(**doc["decoder"])})  # fmt: skip


def timing_note(shards: list[dict[str, Any]], processes: list[dict[str, Any]]) -> str:
    """How the run's latencies were measured: ``one process``, ``N processes, one GPU each``
    or ``N processes sharing cpu`` (any process of the run, resumes included, that ran with
    others makes it multi-process: tables mark such latencies)."""
    sizes = [int(p.get("world_size", 1)) for p in processes] + [len(shards)]
    if max(sizes) == 1:
        return "one process"
    n = max(sizes)
    places = [(m.get("host"), m["device"]) for m in shards]
    if all(d.startswith("cuda") for _, d in places) and len(set(places)) == len(places):
        return f"{n} processes, one GPU each"
    return f"{n} processes sharing {', '.join(sorted({d for _, d in places}))}"


def build_record(
    shards: list[dict[str, Any]],
    document: dict[str, Any],
    rows: list[dict[str, Any]],
    processes: list[dict[str, Any]],
    reference: list[dict[str, Any]],
    run_dir: Path,
) -> Any:
    """The :class:`~recomp_eval.records.RunRecord` of a run whose shards are all finished.

    Args:
        shards: the markers of one complete world, rank order (each holds the record context
            of :func:`record_context`, what its process skipped and its device).
        document: the run folder's identity document (``identity.json``).
        rows: every per-sample row of the run (all its sample files).
        processes: every process entry of the run (peak memory, world size).
        reference: the rows of the uncompressed run of the same setting (may be empty).
        run_dir: the run folder.
    """
    from recomp_eval.benchmarks.specs import benchmark_spec_from_config
    from recomp_eval.methods import build_method
    from recomp_eval.metrics import score
    from recomp_eval.records import RunRecord
    from recomp_eval.run_folder import run_peak_memory

    context = shards[0]["context"]
    bench_cfg, protocol = context["bench_cfg"], context["protocol"]
    bench = context["benchmark"]["name"]
    scoring = benchmark_spec_from_config(bench_cfg).scoring  # metrics, pipeline, primary (YAML)
    metric_names = list(scoring.metrics_for(protocol))
    by_id = lambda b: b["sample_id"]  # noqa: E731 - one order whatever the world size
    too_long = sorted((t for m in shards for t in m["too_long"]), key=by_id)
    skipped = sorted((b for m in shards for b in m["skipped"]), key=by_id) + too_long
    if not rows:
        reasons = sorted({s["reason"] for s in skipped})
        raise ValueError(
            f"no sample of {bench} was evaluated: {len(skipped)} skipped ("
            f"{', '.join(reasons) or 'none selected'}); check the data, benchmark.limit/filters "
            f"and runner.context_length"
        )
    missing = int(shards[0]["n_total"]) - len(rows) - len(skipped)
    if missing > 0:
        raise ValueError(
            f"{run_dir}: every shard is marked finished but {missing} samples have no answer; "
            f"delete the shard-*.json markers and rerun the same command to finish them"
        )
    metrics = score(bench, rows, protocol, metrics=metric_names)
    if context["method"]["name"] != "none" and reference:
        from recomp_eval.metrics.loyalty import loyalty_metrics

        metrics.update(loyalty_metrics(rows, reference, bench, protocol,
                                       answer_pipeline=scoring.pipeline_for(protocol),
                                       metrics=metric_names))  # fmt: skip
    primary = primary_metric_key(metrics, bench, protocol, primary=scoring.primary_for(protocol),
                                 metric_names=metric_names)  # fmt: skip
    metrics.update(slice_metrics(rows, bench, protocol, primary, metric_names,
                                 bench_cfg.get("data_dir")))  # fmt: skip
    metrics.update(target_metrics(rows, bench, bench_cfg.get("data_dir")))
    kept = [float(r["kept_tokens"]) for r in rows]
    method_doc = context["method"]
    method = build_method(method_doc["name"], retention=context["spec_retention"],
                          **method_doc["options"])  # fmt: skip
    # the run's first sample in id order carries its prompt (see Evaluation.generate_batch)
    prompt = next((r["prompt"] for r in rows if r.get("prompt")), None)
    identity = document["identity"]
    devices = [m["device"] for m in shards]
    world = {
        "size": len(shards),
        "launcher": shards[0]["launcher"],
        "shards": [
            {
                k: m.get(k)
                for k in ("rank", "device", "host", "pid", "session", "generated", "finished")
            }
            for m in shards
        ],
    }
    world["timing"] = timing_note(shards, processes)
    experiments = {m["context"]["experiment"] for m in shards} - {None}
    shapes = _shapes(context["shapes"])
    return RunRecord(
        run_key=document["run_key"],
        model=context["model"],
        benchmark=context["benchmark"],
        protocol=protocol,
        method=method_doc,
        metrics=metrics,
        primary_metric=primary,
        tokens={
            "mean": statistics.fmean(kept) if kept else float("nan"),
            "min": min(kept, default=float("nan")),
            "max": max(kept, default=float("nan")),
            "requested_retention": method_doc["retention"],
            **requested_and_achieved(method, method_doc["retention"], shapes, kept, rows),
        },
        latency_ms=latency_summary(rows),
        flops=flops_summary(shapes, method, rows),
        samples={
            "evaluated": len(rows),
            "total": len(rows) + len(skipped),
            "skipped": len(skipped),
            "skipped_ids": skipped,
            "prompt_too_long": len(too_long),
            "converted": sum(int(m["converted"]) for m in shards),
            "first_prompt": prompt,
        },
        reportable=context["limit"] is None and all(d.startswith("cuda") for d in devices),
        peak_memory_mb=run_peak_memory(processes, shards[0]["peak_memory_mb"]),
        env=shards[0]["env"],
        config=context["config"],
        run_dir=str(run_dir),
        identity={
            "settings_key": document["settings_key"],
            "context_key": document["context_key"],
            "pairing_key": document["pairing_key"],
            "contents": identity["contents"],
            "fingerprint_mode": context["fingerprint_mode"],
            "limit": context["limit"],
            "revision": identity["revision"],
        },
        experiments=sorted(experiments),
        notes=sorted({n for m in shards for n in m["context"]["notes"]}),
        protocol_details=context["protocol_details"],
        world=world,
    )
