"""``evaluate(cfg)``: check the inputs, load the model once, run every (method, retention), record.

Each run lives in a folder addressed by its run key (:mod:`recomp_eval.runs`: everything that
changes answers, checkpoint and data contents included), so running the same command again
resumes it; the folder's bookkeeping (claim, identity, processes, supersession) is
:mod:`recomp_eval.run_folder`. Cheap checks come first: runner settings, output folder, the
dataset and every method's options are validated before the model is loaded.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recomp_eval.benchmarks.base import BadSample
from recomp_eval.methods import BuiltMethod, build_method
from recomp_eval.metrics.submission import write_configured_submission
from recomp_eval.records import RunRecord, sample_row, stable_hash, write_json_atomic
from recomp_eval.run_folder import RunFolder, read_json, run_peak_memory, settle
from recomp_eval.runner import PendingSample, SampleStore, check_runner_config, run_loop
from recomp_eval.runs import (
    RunSpec,
    content_fingerprints,
    effective_retention,
    expand_runs,
    folder_name,
    identity_document,
    run_dir,
    run_identity,
)
from recomp_eval.summary import build_record, peak_memory
from recomp_eval.tracking import log_samples, make_tracker

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "RunSpec", "build_benchmark", "evaluate", "expand_runs", "load_model"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a stop hook) during a run; ``str()`` says what is saved and how to resume."""


def load_model(model_cfg: DictConfig | dict[str, Any]):
    """Load the configured checkpoint through its family (see :func:`recomp_eval.models.load_model`)."""
    from recomp_eval.models import load_model as load

    return load(model_cfg)


def build_benchmark(bench_cfg: dict[str, Any], limit: int | None = None):
    """Instantiate the benchmark config (``_target_`` names the class); ``limit`` overrides."""
    from hydra.utils import instantiate

    cfg = dict(bench_cfg)
    if limit is not None:
        cfg["limit"] = int(limit)
    if "_target_" not in cfg:
        raise ValueError(f"benchmark config {cfg.get('name')!r} has no _target_ class")
    return instantiate(cfg, _convert_="all")


def check_output_root(cfg: DictConfig) -> None:
    """``paths.root`` and ``paths.records_dir`` must be folders (created when missing)."""
    for key in ("root", "records_dir"):
        path = Path(str(cfg.paths[key]))
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"paths.{key}={path} is a file, not a folder; point paths.root at a folder "
                f"(it is created when missing)"
            )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Evaluation:
    """State shared by the runs of one process: config, model bundle, benchmark, protocol."""

    def __init__(self, cfg: DictConfig, bundle: Any = None) -> None:
        from recomp_eval.benchmarks.prompts import generation_settings
        from recomp_eval.benchmarks.specs import protocol_spec_from_config

        self.cfg = cfg
        check_runner_config(cfg.runner)
        check_output_root(cfg)
        torch.manual_seed(int(cfg.seed))
        if cfg.runner.get("torch_threads"):
            torch.set_num_threads(int(cfg.runner.torch_threads))
        self.protocol = str(cfg.protocol.name)
        bench_cfg = OmegaConf.to_container(cfg.benchmark, resolve=True)
        assert isinstance(bench_cfg, dict)
        self.bench_cfg = bench_cfg
        self.specs = expand_runs(cfg)
        self.methods = [  # bad retention or unknown options fail before anything loads
            build_method(s.method, retention=s.retention, **s.options) for s in self.specs
        ]
        self.benchmark = build_benchmark(bench_cfg, limit=cfg.get("limit"))
        len(self.benchmark)  # reads the split: missing data fails before the model loads
        # the composed protocol config (command-line overrides included) for prompts and decoding
        self.protocol_spec = protocol_spec_from_config(
            OmegaConf.to_container(cfg.protocol, resolve=True)
        )
        self.settings = dict(generation_settings(self.benchmark.name, self.protocol_spec))
        if cfg.runner.get("max_new_tokens"):  # smoke tests only; part of the run key
            self.settings["max_new_tokens"] = int(cfg.runner.max_new_tokens)
        self.records_dir = Path(cfg.paths.records_dir)
        self.contents = self.fingerprint_inputs(bundle)
        self.bundle = bundle if bundle is not None else load_model(cfg.model)
        self.adapter = self.bundle.adapter
        self.shapes = self.adapter.shapes(self.bundle)
        self.check_model_side()  # template, signals, in-LLM settings: before any vision work
        self.session = uuid.uuid4().hex[:12]  # this evaluation's entry in processes.json
        self.vision_cache = None
        if cfg.runner.get("share_vision"):  # one tower pass per batch across `runs` (opt-in)
            self.vision_cache = self.shared_vision_cache()

    def check_model_side(self) -> None:
        """One-line errors for what only the loaded checkpoint can tell: a chat template that
        does not render the protocol's prompt, a signal the family cannot supply, an in-LLM
        method deeper than the LLM."""
        from recomp_eval.inject.llm_attention import check_depth
        from recomp_eval.models.base import PROBE_TEXT, check_signals

        b, adapter = self.bundle, self.adapter
        prompt = adapter.render_prompt(b, self.protocol, PROBE_TEXT)
        adapter.check_prompt(b, self.protocol, prompt, PROBE_TEXT)
        for method in self.methods:
            check_signals(method, adapter)
            if method.llm is not None:
                check_depth(method.llm, self.shapes.decoder.layers)

    def protocol_details(self) -> dict[str, Any]:
        """What the prompts and pixels follow, for the record."""
        b, adapter = self.bundle, self.adapter
        details = {
            "family": adapter.family,
            "template_source": adapter.template_source(b, self.protocol),
            "follows": adapter.follows(self.protocol),
            "image_processor": b.image_processor_class,
        }
        if any(m.spec.text is not None for m in self.methods):
            details["clip_pairing"] = adapter.text_pairing(b)
        return details

    def shared_vision_cache(self):
        """A :class:`VisionCache` that captures the q/k layers of every entry of ``runs``."""
        from recomp_eval.inject.context import hook_layers
        from recomp_eval.inject.vision_cache import VisionCache

        n_layers = self.adapter.hook_points(self.bundle.model).num_layers
        q_layers, k_layers = set(), set()
        for method in self.methods:
            q, k = hook_layers(method.spec, n_layers)
            q_layers.update(q)
            k_layers.update(k)
        return VisionCache(q_layers, k_layers)

    # --- identity of a run (pure functions in recomp_eval.runs) --------------------------------

    def fingerprint_inputs(self, bundle: Any) -> dict[str, Any]:
        from recomp_eval.models import resolve_model_path

        checkpoint = bundle.model_id if bundle is not None else resolve_model_path(self.cfg.model)
        uses_text = any(m.spec.text is not None for m in self.methods)
        mode = str(self.cfg.runner.get("fingerprint") or "quick")
        return content_fingerprints(self.cfg.model, checkpoint, self.bench_cfg.get("data_dir"),
                                    uses_text, mode)  # fmt: skip

    def run_identity(self, spec: RunSpec, method: BuiltMethod, retention) -> dict[str, Any]:
        source = getattr(self.benchmark, "source", None)
        revision = None if source is None else (source.resolved_revision or source.revision)
        return run_identity(
            OmegaConf.to_container(self.cfg.model, resolve=True),
            spec.method, method.config, retention, method.spec.text is not None,
            OmegaConf.to_container(self.cfg.protocol, resolve=True), self.bench_cfg, revision,
            self.cfg.get("limit"), self.settings, self.contents,
        )  # fmt: skip

    def run_path(self, spec: RunSpec, retention, key: str) -> Path:
        name = folder_name(spec, retention, key)
        return run_dir(self.records_dir, self.benchmark.name, str(self.cfg.model.name),
                       self.protocol, name)  # fmt: skip

    # --- one run --------------------------------------------------------------------------------

    def pending(self, done: dict[str, Any], too_long: list[BadSample]) -> Iterator[PendingSample]:
        """Samples not yet done whose prompt fits the model's context (others go to ``too_long``).

        Rule: text tokens + every visual token of the uncompressed image + ``max_new_tokens``
        must fit ``runner.context_length`` (default: the LLM's ``max_position_embeddings``), so
        every method skips the same samples and comparisons stay paired.
        """
        from recomp_eval.benchmarks.prompts import user_prompt
        from recomp_eval.pipeline import prompt_text_tokens

        patches = self.shapes.patches
        context = self.cfg.runner.get("context_length") or self.shapes.context_length
        budget = int(context) - patches - int(self.settings["max_new_tokens"])
        for sample in self.benchmark.iterate(skip=done.keys()):
            text = user_prompt(
                sample, self.protocol_spec, template=self.bench_cfg["prompt_template"]
            )
            n_text = prompt_text_tokens(self.bundle, text, self.protocol)
            if n_text > budget:
                detail = (f"{n_text} text + {patches} visual + "
                          f"{self.settings['max_new_tokens']} new tokens > context {context}")  # fmt: skip
                too_long.append(BadSample(sample.sample_id, "prompt_too_long", detail))
                continue
            yield PendingSample(sample.sample_id, sample, text, "default")

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
            do_sample=bool(self.settings["do_sample"]),
        )
        return [
            sample_row(p.sample, res, warm=warm, first=p is batch[0])
            for p, res in zip(batch, results)
        ]

    def run(self, spec: RunSpec, method: BuiltMethod) -> RunRecord:
        retention = effective_retention(spec, method.config)
        identity = self.run_identity(spec, method, retention)
        key = stable_hash(identity)
        used = {"checkpoint", "data"} | ({"clip_text"} if method.spec.text else set())
        document = identity_document(spec.label, identity, key, self.contents, used)
        policy = str(self.cfg.runner.get("on_change") or "new")
        folder, notes = settle(RunFolder(self.run_path(spec, retention, key)), document, policy)
        with folder.claim(str(self.cfg.runner.get("on_busy") or "exit")):
            if folder.identity() is None:
                folder.write_identity({**document, "created": _now()})
            return self._run_in(folder, spec, method, retention, notes)

    def _run_in(self, folder: RunFolder, spec, method, retention, notes) -> RunRecord:
        document = folder.identity()
        store = SampleStore(folder.path / "samples.jsonl")
        done = store.load()
        if done:
            log.info("resuming %s: %d samples already done", folder.path, len(done))
        device = self.bundle.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = int(self.cfg.runner.warmup_batches)
        counter = {"batches": 0, "samples": 0}

        def gen(batch: list[PendingSample]) -> list[dict[str, Any]]:
            warm = counter["batches"] >= warmup
            counter["batches"] += 1
            rows = self.generate_batch(method, batch, warm)
            counter["samples"] += len(rows)
            return rows

        def after_batch() -> None:
            folder.note_process(self.session, counter["samples"], peak_memory(device))

        too_long: list[BadSample] = []
        total = max(0, len(self.benchmark) - len(done))
        desc = (
            f"{self.benchmark.name}:{spec.label}@{'adaptive' if retention is None else retention}"
        )
        try:
            run_loop(
                self.pending(done, too_long),
                gen,
                store,
                batch_size=int(self.cfg.runner.batch_size),
                window=int(self.cfg.runner.sort_window),
                total=total,
                desc=desc,
                stop_after=self.cfg.runner.get("stop_after_batches"),
                after_batch=after_batch,
            )
        except KeyboardInterrupt:
            saved = len(done) + counter["samples"]
            raise RunInterrupted(
                f"interrupted: {saved} samples of {spec.label} are saved in {folder.path}; "
                f"rerun the same command to resume"
            ) from None
        if too_long:
            log.warning(
                "skipped %d samples whose prompt does not fit the model's context (listed in "
                "results.json as prompt_too_long), e.g. %s: %s",
                len(too_long), too_long[0].sample_id, too_long[0].detail,
            )  # fmt: skip
        rows = list(store.load().values())
        record = build_record(
            self, spec, method, retention, document, rows, too_long,
            run_peak_memory(folder.processes(), peak_memory(device)), notes, folder.path,
        )  # fmt: skip
        previous = (folder.path / "results.json").is_file()
        record.experiments = sorted(set(record.experiments) | self._earlier_experiments(folder))
        write_json_atomic(folder.path / "results.json", record.to_dict())
        if (sub := write_configured_submission(self.bench_cfg, rows, folder.path)) is not None:
            log.info("wrote the EvalAI submission %s", sub)
        log.info("%s %s", "rewrote" if previous else "wrote", folder.path / "results.json")
        return record

    @staticmethod
    def _earlier_experiments(folder: RunFolder) -> set[str]:
        earlier = read_json(folder.path / "results.json") or {}
        return set(earlier.get("experiments") or [])

    def reference_rows(self) -> list[dict[str, Any]]:
        """Per-sample rows of the uncompressed run of the same setting, when it exists."""
        ref_spec = RunSpec("none", None, {})
        ref_method = build_method("none")
        identity = self.run_identity(ref_spec, ref_method, None)
        ref_store = SampleStore(
            self.run_path(ref_spec, None, stable_hash(identity)) / "samples.jsonl"
        )
        return list(ref_store.load().values()) if ref_store.path.exists() else []


def evaluate(cfg: DictConfig, bundle: Any = None) -> list[RunRecord]:
    """Run every configured (method, retention) on one loaded model; returns their records."""
    evaluation = Evaluation(cfg, bundle)
    records = []
    for spec, method in zip(evaluation.specs, evaluation.methods):
        identity_cfg = OmegaConf.to_container(cfg, resolve=True)
        logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
        tracker = (
            make_tracker(
                logger_cfg,  # type: ignore[arg-type]
                name=f"{evaluation.benchmark.name}-{spec.label}-{spec.retention}",
                config={**identity_cfg, "run": {**spec.__dict__, "label": spec.label}},  # type: ignore[dict-item]
                output_dir=Path(cfg.paths.root),
            )
            if cfg.logger.get("name", "none") != "none"
            else make_tracker(None)
        )
        with tracker:
            record = evaluation.run(spec, method)
            tracker.set_run_key(record.run_key)  # the dashboard run names its results folder
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
