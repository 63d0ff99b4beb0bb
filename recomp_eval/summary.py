"""Summaries of a finished run: latency statistics, peak memory, FLOPs, headline metric, slices."""

from __future__ import annotations

import resource
import statistics
from pathlib import Path
from typing import Any

import torch

from recomp_eval.efficiency.flops import DecoderShape, prefill_flops, vit_flops
from recomp_eval.methods import BuiltMethod

STAGES = ("vision", "text", "compression", "prefill", "decode")
SLICE_TAGS = ("size", "family", "near_large")
PRIMARY_NAMES = {
    "gqa": ("accuracy",),
    "vqav2": ("accuracy",),
    "textvqa": ("accuracy",),
    "pope": ("f1_mean", "f1"),
    "mme": ("perception",),
}


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


def num_patches(config: Any) -> int:
    """Patches of the vision tower (24 x 24 = 576 for CLIP ViT-L/14-336)."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


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


def primary_metric_key(metrics: dict[str, float], bench: str, protocol: str) -> str:
    """The headline number: accuracy, POPE mean F1 over splits (or pooled F1), MME perception."""
    from recomp_eval.metrics.registry import METRICS
    from recomp_eval.metrics.scoring import DEFAULT_METRICS

    spec = METRICS.get(DEFAULT_METRICS[bench][protocol][0])
    for name in PRIMARY_NAMES[bench]:
        key = spec.key(bench, name)
        if key in metrics:
            return key
    raise KeyError(f"no primary metric for {bench} among {sorted(metrics)}")


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


def flops_summary(config: Any, method: BuiltMethod, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean analytic prefill TFLOPs per sample from the counts the LLM saw, and ViT TFLOPs.

    ``config``: the LLaVA config (``text_config`` and ``vision_config`` give the sizes).
    """
    shape = DecoderShape.from_config(config.text_config)
    per_sample = {"swiglu": [], "fastv": []}
    llm = method.llm
    for r in rows:
        text = int(r["text_tokens"])
        if llm is not None:
            from recomp_eval.llm_methods.fastv import kept_count

            n_img = round(r.get("n_image_tokens") or num_patches(config))
            keep = kept_count(n_img, llm)
            k = min(llm.k_layer, shape.layers)
            counts = [text + n_img] * k + [text + keep] * (shape.layers - k)
        else:
            counts = text + round(float(r["kept_tokens"]))
        for formula in per_sample:
            per_sample[formula].append(prefill_flops(counts, shape, formula) / 1e12)  # type: ignore[arg-type]
    vit = vit_flops(config.vision_config, passes=method.spec.vit_passes) / 1e12
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "prefill_tflops": mean(per_sample["swiglu"]),
        "prefill_tflops_fastv_formula": mean(per_sample["fastv"]),
        "vision_tflops": vit,
        "formula": "swiglu: 2*(4nd^2 + 2n^2d + 3ndm) per layer (GQA-aware QKVO); fastv: 2ndm FFN",
    }
