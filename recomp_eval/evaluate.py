"""``evaluate(cfg)``: load the model once, run every requested (method, retention), score, record.

Each run lives in a folder addressed by a hash of everything that changes its outputs (model,
dtype, method and options, retention, protocol, dataset id/revision/split/version, limit,
generation settings), so running the same command again resumes it.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recomp_eval import keepmap
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.methods import BuiltMethod, build_method, check_retention
from recomp_eval.records import RunRecord, environment, stable_hash, write_json_atomic
from recomp_eval.runner import PendingSample, SampleStore, run_loop
from recomp_eval.summary import (
    flops_summary,
    latency_summary,
    num_patches,
    peak_memory,
    primary_metric_key,
    slice_metrics,
)
from recomp_eval.tracking import make_tracker

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """One (method, retention, options) to evaluate on the loaded model."""

    method: str
    retention: float | None
    options: dict[str, Any]

    @property
    def label(self) -> str:
        variant = self.options.get("variant")
        return f"{self.method}[{variant}]" if variant else self.method


def load_model(model_cfg: DictConfig | dict[str, Any]):
    """Load the configured checkpoint (``id: tiny`` builds the offline tiny model)."""
    from recomp_eval.models.loader import load_llava
    from recomp_eval.models.tiny import build_tiny

    cfg = dict(model_cfg)
    model_id = str(build_tiny()) if cfg["id"] == "tiny" else resolve_local(str(cfg["id"]))
    device = cfg.get("device", "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={device} but CUDA is not available; pass model.device=cpu "
            f"(and model.dtype=float32 or bfloat16 on CPU)"
        )
    return load_llava(
        model_id,
        dtype=cfg.get("dtype", "float32"),
        device=device,
        attn_implementation=cfg.get("attn_implementation", "sdpa"),
        clip_text_id=cfg.get("clip_text_id"),
    )


def resolve_local(model_id: str) -> str:
    """A relative folder is looked up in the working directory, then in the repository."""
    path = Path(os.path.expanduser(model_id))
    if path.is_absolute() or path.exists():
        return str(path)
    in_repo = CONFIG_DIR.parent / path
    return str(in_repo) if in_repo.exists() else model_id  # else: a hub id


def expand_runs(cfg: DictConfig) -> list[RunSpec]:
    """The ``runs`` list, or the single ``method`` group selection with top-level retention."""
    base = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(base, dict)
    specs = []
    entries = list(cfg.get("runs") or []) or [{}]
    for entry in entries:
        entry = (
            OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
        )
        if entry.get("method") and entry["method"] != base.get("name"):
            options: dict[str, Any] = {}
            method_name = entry["method"]
            default_retention = None
        else:
            options = {k: v for k, v in base.items() if k not in ("name", "retention")}
            method_name = base["name"]
            default_retention = base.get("retention")
        options.update(entry.get("options") or {})
        retention = entry.get("retention", cfg.get("retention"))
        if retention is None:
            retention = default_retention
        check_retention(retention)
        specs.append(RunSpec(method_name, retention, options))
    return specs


def build_benchmark(bench_cfg: dict[str, Any], limit: int | None = None):
    """Instantiate the benchmark config (``_target_`` names the class); ``limit`` overrides."""
    from hydra.utils import instantiate

    cfg = dict(bench_cfg)
    if limit is not None:
        cfg["limit"] = int(limit)
    if "_target_" not in cfg:
        raise ValueError(f"benchmark config {cfg.get('name')!r} has no _target_ class")
    return instantiate(cfg, _convert_="all")


class Evaluation:
    """State shared by the runs of one process: config, model bundle, benchmark, protocol."""

    def __init__(self, cfg: DictConfig, bundle: Any = None) -> None:
        from recomp_eval.benchmarks.prompts import generation_settings

        self.cfg = cfg
        torch.manual_seed(int(cfg.seed))
        if cfg.runner.get("torch_threads"):
            torch.set_num_threads(int(cfg.runner.torch_threads))
        self.bundle = bundle if bundle is not None else load_model(cfg.model)
        self.protocol = str(cfg.protocol.name)
        bench_cfg = OmegaConf.to_container(cfg.benchmark, resolve=True)
        assert isinstance(bench_cfg, dict)
        self.bench_cfg = bench_cfg
        self.benchmark = build_benchmark(bench_cfg, limit=cfg.get("limit"))
        self.settings = dict(generation_settings(self.benchmark.name, self.protocol))
        if cfg.runner.get("max_new_tokens"):  # smoke tests only; part of the run key
            self.settings["max_new_tokens"] = int(cfg.runner.max_new_tokens)
        self.records_dir = Path(cfg.paths.records_dir)
        self.vision_cache = None
        if cfg.runner.get("share_vision"):  # one tower pass per batch across `runs` (opt-in)
            self.vision_cache = self.shared_vision_cache()

    def shared_vision_cache(self):
        """A :class:`VisionCache` that captures the q/k layers of every entry of ``runs``."""
        from recomp_eval.inject.context import hook_layers, vision_tower
        from recomp_eval.inject.vision_cache import VisionCache

        n_layers = vision_tower(self.bundle.model).config.num_hidden_layers
        q_layers, k_layers = set(), set()
        for spec in expand_runs(self.cfg):
            q, k = hook_layers(build_method(spec.method, retention=spec.retention,
                                            **spec.options).spec, n_layers)  # fmt: skip
            q_layers.update(q)
            k_layers.update(k)
        return VisionCache(q_layers, k_layers)

    # --- identity of a run ----------------------------------------------------------------------

    def run_identity(self, spec: RunSpec, method: BuiltMethod) -> dict[str, Any]:
        model = self.cfg.model
        return {
            "model": {
                "id": str(model.id),
                "revision": model.get("revision"),
                "dtype": str(model.dtype),
                "attn": str(model.get("attn_implementation", "sdpa")),
            },
            "method": {"name": spec.method, "config": method.config, "retention": spec.retention},
            "protocol": OmegaConf.to_container(self.cfg.protocol, resolve=True),
            "benchmark": {k: v for k, v in self.bench_cfg.items() if k not in ("data_dir",)},
            "revision": self.benchmark_revision(),
            "limit": self.cfg.get("limit"),
            "generation": self.settings,
        }

    def benchmark_revision(self) -> str | None:
        source = getattr(self.benchmark, "source", None)
        if source is None:
            len(self.benchmark)  # loads the split and resolves its source
            source = getattr(self.benchmark, "source", None)
        if source is None:
            return None
        return source.resolved_revision or source.revision

    def run_dir(self, spec: RunSpec, key: str) -> Path:
        ret = "adaptive" if spec.retention is None else f"r{spec.retention:g}"
        label = spec.label.replace("[", "-").replace("]", "")
        return (
            self.records_dir
            / self.benchmark.name
            / str(self.cfg.model.name)
            / self.protocol
            / f"{label}-{ret}-{key}"
        )

    # --- one run --------------------------------------------------------------------------------

    def pending(self, done: dict[str, Any]) -> Iterator[PendingSample]:
        from recomp_eval.benchmarks.prompts import user_prompt

        for sample in self.benchmark.iterate(skip=done.keys()):
            yield PendingSample(
                sample.sample_id, sample, user_prompt(sample, self.protocol), "default"
            )

    def generate_batch(self, method: BuiltMethod, batch: list[PendingSample], warm: bool):
        from recomp_eval.pipeline import generate

        results = generate(
            self.bundle,
            method,
            images=[p.sample.image for p in batch],
            user_texts=[p.user_text for p in batch],
            questions=[p.sample.question for p in batch],
            protocol=self.protocol,
            sample_ids=[p.sample_id for p in batch],
            max_new_tokens=int(self.settings["max_new_tokens"]),
            stop=tuple(self.settings.get("stop") or ()),
            vision_cache=self.vision_cache,
        )
        rows = []
        for pending, res in zip(batch, results):
            codes = None
            if res.compressed is not None:
                c = res.compressed
                codes = keepmap.encode(keepmap.keep_map(c.role[0], c.source[0], c.members[0]))
            rows.append(
                {
                    "sample_id": pending.sample_id,
                    "question": pending.sample.question,
                    "answers": pending.sample.answers,
                    "meta": pending.sample.meta,
                    "prediction": res.text,
                    "kept_tokens": res.kept_tokens,
                    "text_tokens": res.text_tokens,
                    "new_tokens": len(res.new_token_ids),
                    "timings_ms": res.timings,
                    "batch_size": res.batch_size,
                    "warmup": not warm,
                    "keep_map": codes,
                    "prompt": res.prompt if pending is batch[0] else None,
                }
            )
        return rows

    def run(self, spec: RunSpec) -> RunRecord:
        method = build_method(spec.method, retention=spec.retention, **spec.options)
        identity = self.run_identity(spec, method)
        key = stable_hash(identity)
        out_dir = self.run_dir(spec, key)
        store = SampleStore(out_dir / "samples.jsonl")
        done = store.load()
        if done:
            log.info("resuming %s: %d samples already done", out_dir, len(done))
        device = self.bundle.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = int(self.cfg.runner.warmup_batches)
        counter = {"batches": 0}

        def gen(batch: list[PendingSample]) -> list[dict[str, Any]]:
            warm = counter["batches"] >= warmup
            counter["batches"] += 1
            return self.generate_batch(method, batch, warm)

        total = max(0, len(self.benchmark) - len(done))
        run_loop(
            self.pending(done),
            gen,
            store,
            batch_size=int(self.cfg.runner.batch_size),
            window=int(self.cfg.runner.sort_window),
            total=total,
            desc=f"{self.benchmark.name}:{spec.label}@{spec.retention}",
            stop_after=self.cfg.runner.get("stop_after_batches"),
        )
        rows = list(store.load().values())
        record = self.make_record(spec, method, identity, key, rows)
        write_json_atomic(out_dir / "results.json", record.to_dict())
        log.info("wrote %s", out_dir / "results.json")
        return record

    # --- the record -----------------------------------------------------------------------------

    def make_record(self, spec, method, identity, key, rows) -> RunRecord:
        from recomp_eval.metrics import score

        bench = self.benchmark.name
        metric_names = (
            self.bench_cfg.get("metrics", {}).get(self.protocol)
            if isinstance(self.bench_cfg.get("metrics"), dict)
            else None
        )
        metrics = score(bench, rows, self.protocol, metrics=metric_names)
        metrics.update(self.loyalty(spec, rows))
        primary = primary_metric_key(metrics, bench, self.protocol)
        data_dir = self.bench_cfg.get("data_dir")
        metrics.update(slice_metrics(rows, bench, self.protocol, primary, metric_names, data_dir))
        kept = [float(r["kept_tokens"]) for r in rows]
        latency = latency_summary(rows)
        flops = flops_summary(self.bundle.model.config, method, rows)
        report = self.benchmark.report()
        n_total = len(rows) + report.get("n_skipped", 0)
        reportable = self.cfg.get("limit") is None and self.bundle.device.type == "cuda"
        prompt = next((r["prompt"] for r in rows if r.get("prompt")), None)
        return RunRecord(
            run_key=key,
            model={
                "name": str(self.cfg.model.name),
                "id": str(self.cfg.model.id),
                "dtype": str(self.cfg.model.dtype),
            },
            benchmark={
                "name": bench,
                "version": self.benchmark.version,
                "source": report.get("source"),
                "split": self.bench_cfg.get("split"),
            },
            protocol=self.protocol,
            method={
                "name": spec.method,
                "label": spec.label,
                "retention": spec.retention,
                "options": spec.options,
                "config": method.config,
            },
            metrics=metrics,
            primary_metric=primary,
            tokens={
                "mean": statistics.fmean(kept) if kept else float("nan"),
                "min": min(kept, default=float("nan")),
                "max": max(kept, default=float("nan")),
                "requested_retention": spec.retention,
            },
            latency_ms=latency,
            flops=flops,
            samples={
                "evaluated": len(rows),
                "total": n_total,
                "skipped": report.get("n_skipped", 0),
                "skipped_ids": report.get("skipped", []),
                "converted": report.get("n_converted", 0),
                "first_prompt": prompt,
            },
            reportable=reportable,
            peak_memory_mb=peak_memory(self.bundle.device),
            env=environment(str(self.bundle.device)),
            config=OmegaConf.to_container(self.cfg, resolve=True),  # type: ignore[arg-type]
        )

    def loyalty(self, spec: RunSpec, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Loyalty metrics against the uncompressed run of the same setting, when it exists."""
        if spec.method == "none":
            return {}
        from recomp_eval.metrics.loyalty import loyalty_metrics

        ref_spec = RunSpec("none", None, {})
        ref_method = build_method("none")
        ref_key = stable_hash(self.run_identity(ref_spec, ref_method))
        ref_store = SampleStore(self.run_dir(ref_spec, ref_key) / "samples.jsonl")
        reference = list(ref_store.load().values()) if ref_store.path.exists() else []
        if not reference:
            return {}
        return loyalty_metrics(rows, reference, self.benchmark.name, self.protocol)


def evaluate(cfg: DictConfig, bundle: Any = None) -> list[RunRecord]:
    """Run every configured (method, retention) on one loaded model; returns their records."""
    evaluation = Evaluation(cfg, bundle)
    records = []
    for spec in expand_runs(cfg):
        identity_cfg = OmegaConf.to_container(cfg, resolve=True)
        tracker = (
            make_tracker(
                OmegaConf.to_container(cfg.logger, resolve=True),  # type: ignore[arg-type]
                name=f"{evaluation.benchmark.name}-{spec.label}-{spec.retention}",
                config={**identity_cfg, "run": spec.__dict__},  # type: ignore[dict-item]
                output_dir=Path(cfg.paths.root),
            )
            if cfg.logger.get("name", "none") != "none"
            else make_tracker(None)
        )
        with tracker:
            record = evaluation.run(spec)
            tracker.log_metrics(
                {k: v for k, v in record.metrics.items() if isinstance(v, (int, float))}
            )
            tracker.log_metrics(
                {
                    f"{evaluation.benchmark.name}/kept_tokens": record.tokens["mean"],
                    f"{evaluation.benchmark.name}/prefill_tflops": record.flops["prefill_tflops"],
                }
            )
            log_samples(tracker, evaluation, spec, record, int(cfg.runner.keep_maps))
        records.append(record)
    return records


def log_samples(tracker, evaluation: Evaluation, spec: RunSpec, record: RunRecord, n: int) -> None:
    """A samples table with images and keep maps for the first ``n`` samples (dashboard only)."""
    if tracker.mode == "disabled" or n <= 0:
        return
    import matplotlib.pyplot as plt

    key = record.run_key
    store = SampleStore(evaluation.run_dir(spec, key) / "samples.jsonl")
    rows_by_id = store.load()
    grid = round(num_patches(evaluation.bundle.model.config) ** 0.5)
    table = []
    for sample in evaluation.benchmark:
        row = rows_by_id.get(sample.sample_id)
        if row is None:
            continue
        fig = None
        if row.get("keep_map"):
            fig = keepmap.render(
                keepmap.decode(row["keep_map"]),
                (grid, grid),
                sample.image,
                title=f"{sample.sample_id}: {row['kept_tokens']:.0f} tokens",
            )
        table.append(
            {
                "sample_id": sample.sample_id,
                "image": sample.image,
                "question": sample.question,
                "answers": sample.answers,
                "prediction": row["prediction"],
                "kept_tokens": row["kept_tokens"],
                "keep_map": fig,
            }
        )
        if len(table) >= n:
            break
    tracker.log_samples(table)
    for item in table:
        if item["keep_map"] is not None:
            plt.close(item["keep_map"])
