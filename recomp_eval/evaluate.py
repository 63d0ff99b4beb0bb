"""``evaluate(cfg)``: check the inputs, load the model once, run every (method, retention), record.

Each run lives in a folder addressed by its run key (:mod:`recomp_eval.runs`: everything that
changes answers, checkpoint and data contents included), so running the same command again
resumes it; the folder's bookkeeping (claim, identity, processes, supersession) is
:mod:`recomp_eval.run_folder`. Cheap checks come first: runner settings, output folder, the
dataset and every method's options are validated before the model is loaded.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recomp_eval.benchmarks.base import BadSample
from recomp_eval.merge import finish_run
from recomp_eval.methods import BuiltMethod, build_method
from recomp_eval.records import RunRecord, environment, sample_row, stable_hash
from recomp_eval.run_folder import RunFolder, settle
from recomp_eval.runner import (
    PendingSample,
    SampleStore,
    check_runner_config,
    load_run_rows,
    run_loop,
)
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
from recomp_eval.shards import device_for, owned_ids, samples_file, world_from
from recomp_eval.summary import peak_memory, record_context
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


# overrides that only say how a run is split: the command that finishes a run drops them
SPLIT_OVERRIDES = ("runner.shard=", "runner.num_shards=", "hydra/launcher=", "hydra.launcher.")


def launch_command() -> str | None:
    """The command line that resumes this evaluation in one process (from Hydra's overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None
    kept = [o for o in overrides if not o.lstrip("+~").startswith(SPLIT_OVERRIDES)]
    return " ".join(["recomp-eval", *map(shlex.quote, kept)])


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
        # the composed protocol config (command-line overrides included) for prompts and decoding
        self.protocol_spec = protocol_spec_from_config(
            OmegaConf.to_container(cfg.protocol, resolve=True)
        )
        self.settings = dict(generation_settings(self.benchmark.name, self.protocol_spec))
        if cfg.runner.get("max_new_tokens"):  # smoke tests only; part of the run key
            self.settings["max_new_tokens"] = int(cfg.runner.max_new_tokens)
        self.records_dir = Path(cfg.paths.records_dir)
        self.world = world_from(cfg.runner)
        if (
            cfg.get("experiment_name") == "latency"
            and self.world.size > 1
            and not str(cfg.model.device).startswith("cuda")
        ):
            raise ValueError(
                f"experiment=latency measures one process per device, but this is one of "
                f"{self.world.size} processes on {cfg.model.device}; run it in a single process "
                f"(python -m recomp_eval experiment=latency ...), or one process per GPU"
            )
        self.sample_ids = self.benchmark.sample_ids()  # what the shards split (no image decoded)
        self.example_id = min(self.sample_ids, default=None)  # its prompt goes in the record
        self.mine = owned_ids(self.sample_ids, self.world)  # this process's shard of every run
        self.command = launch_command()
        self.contents = self.fingerprint_inputs(bundle)
        self.bundle = bundle if bundle is not None else load_model(self.model_config())
        self.adapter = self.bundle.adapter
        self.shapes = self.adapter.shapes(self.bundle)
        self.check_model_side()  # template, signals, in-LLM settings: before any vision work
        self.session = uuid.uuid4().hex[:12]  # this evaluation's entry in processes.json
        self.vision_cache = None
        if cfg.runner.get("share_vision"):  # one tower pass per batch across `runs` (opt-in)
            self.vision_cache = self.shared_vision_cache()

    def model_config(self) -> dict[str, Any]:
        """``model`` with this process's device (``cuda:LOCAL_RANK`` under torchrun)."""
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        assert isinstance(model_cfg, dict)
        model_cfg["device"] = device_for(str(model_cfg.get("device", "cpu")), self.world)
        return model_cfg

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
            adapter.check_method(method)
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

    def pending(self, done: dict[str, Any], too_long: list[BadSample],
                only: set[str] | None = None) -> Iterator[PendingSample]:  # fmt: skip
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
        for sample in self.benchmark.iterate(skip=done.keys(), only=only):
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
        masks = {}  # target masks are drawn on one patch grid (not on LLaVA-NeXT's crops)
        if self.shapes.fixed_grid:
            masks = self.benchmark.targets([p.sample_id for p in batch], self.shapes.grid)
        # the prompt is kept on each batch's first row, and on the run's first sample in id order
        # (the record's example prompt, the same whatever the batches or the world size)
        return [
            sample_row(
                p.sample, res, warm=warm, first=p is batch[0] or p.sample_id == self.example_id,
                target_mask=masks.get(p.sample_id),
            )
            for p, res in zip(batch, results)
        ]  # fmt: skip

    def run(self, spec: RunSpec, method: BuiltMethod) -> RunRecord | None:
        """Evaluate this process's shard of one run; returns the run's record if this process
        completed the run (the last shard to finish builds it), else None."""
        retention = effective_retention(spec, method.config)
        identity = self.run_identity(spec, method, retention)
        key = stable_hash(identity)
        used = {"checkpoint", "data"} | ({"clip_text"} if method.spec.text else set())
        document = identity_document(spec.label, identity, key, self.contents, used)
        policy = str(self.cfg.runner.get("on_change") or "new")
        folder, notes = settle(RunFolder(self.run_path(spec, retention, key)), document, policy)
        shard = None if self.world.size == 1 else self.world.name
        with folder.claim(str(self.cfg.runner.get("on_busy") or "exit"), shard=shard):
            if folder.identity() is None:
                folder.write_identity({**document, "created": _now()})
            self._run_in(folder, spec, method, retention, notes)
        record = finish_run(folder)
        if record is None and self.world.size > 1:
            log.info("%s of %s done; the last shard to finish writes its results.json (or "
                     "recomp-eval-merge)", self.world.name, folder.path)  # fmt: skip
        return record

    def _run_in(self, folder: RunFolder, spec, method, retention, notes) -> None:
        """Generate this process's pending samples of the run, then write its shard marker."""
        own = folder.path / samples_file(self.world)
        store = SampleStore(own)
        done = load_run_rows(folder.path, own=own)
        mine = self.mine
        if done:
            log.info("resuming %s: %d samples already done", folder.path, len(done))
        device = self.bundle.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = int(self.cfg.runner.warmup_batches)
        counter = {"batches": 0, "samples": 0}
        extra = {"rank": self.world.rank, "world_size": self.world.size,
                 "launcher": self.world.launcher, "device": str(device),
                 "command": self.command}  # fmt: skip

        def gen(batch: list[PendingSample]) -> list[dict[str, Any]]:
            warm = counter["batches"] >= warmup
            counter["batches"] += 1
            rows = self.generate_batch(method, batch, warm)
            counter["samples"] += len(rows)
            return rows

        def after_batch() -> None:
            folder.note_process(self.session, counter["samples"], peak_memory(device),
                                shard=None if self.world.size == 1 else self.world.name,
                                extra=extra)  # fmt: skip

        too_long: list[BadSample] = []
        total = max(0, len(mine - done.keys()))
        desc = (
            f"{self.benchmark.name}:{spec.label}@{'adaptive' if retention is None else retention}"
        )
        started = time.time()
        try:
            run_loop(
                self.pending(done, too_long, only=mine),
                gen,
                store,
                batch_size=int(self.cfg.runner.batch_size),
                window=int(self.cfg.runner.sort_window),
                total=total,
                desc=desc if self.world.size == 1 else f"{desc} [{self.world.name}]",
                stop_after=self.cfg.runner.get("stop_after_batches"),
                after_batch=after_batch,
                progress=self.world.rank == 0 or self.world.launcher != "torchrun",
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
        report = self.benchmark.report()  # this process's samples: skipped, converted
        reference = None if spec.method == "none" else self.reference_dir()
        context = record_context(self, spec, method, retention, notes, reference, report)
        folder.write_marker(self.world.name, {
            "rank": self.world.rank,
            "size": self.world.size,
            "launcher": self.world.launcher,
            "session": self.session,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(device),
            "env": environment(str(device)),
            "n_total": len(self.sample_ids),
            "n_owned": len(mine),
            "generated": counter["samples"],
            "loop_started": started,
            "loop_ended": time.time(),
            "too_long": [b.__dict__ for b in too_long],
            "skipped": list(report.get("skipped", [])),
            "converted": report.get("n_converted", 0),
            "peak_memory_mb": peak_memory(device),
            "context": {**context, "command": self.command},
        })  # fmt: skip

    def reference_dir(self) -> Path:
        """The folder of the uncompressed run of the same setting (for loyalty)."""
        ref_spec = RunSpec("none", None, {})
        ref_method = build_method("none")
        identity = self.run_identity(ref_spec, ref_method, None)
        return self.run_path(ref_spec, None, stable_hash(identity))


def evaluate(cfg: DictConfig, bundle: Any = None) -> list[RunRecord]:
    """Run every configured (method, retention) on one loaded model; returns the records this
    process completed (with several shards, the last shard of each run to finish builds its
    record and logs it to the dashboard: once per run)."""
    evaluation = Evaluation(cfg, bundle)
    records = []
    for spec, method in zip(evaluation.specs, evaluation.methods):
        record = evaluation.run(spec, method)
        if record is None:
            continue
        log_run(cfg, evaluation, spec, record)
        records.append(record)
    return records


def log_run(cfg: DictConfig, evaluation: Evaluation, spec: RunSpec, record: RunRecord) -> None:
    """The dashboard entry of a finished run (``logger``; nothing with ``logger=none``)."""
    if cfg.logger.get("name", "none") == "none":
        return
    identity_cfg = OmegaConf.to_container(cfg, resolve=True)
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    tracker = make_tracker(
        logger_cfg,  # type: ignore[arg-type]
        name=f"{evaluation.benchmark.name}-{spec.label}-{spec.retention}",
        config={**identity_cfg, "run": {**spec.__dict__, "label": spec.label}},  # type: ignore[dict-item]
        output_dir=Path(cfg.paths.root),
    )
    with tracker:
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
