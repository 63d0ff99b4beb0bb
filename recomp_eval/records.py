"""Run records: the self-describing ``results.json`` of one (model, benchmark, method) run.

A record holds everything needed to interpret and reproduce a number: the resolved config, git
commit, package versions, device, dataset id and revision, protocol, metrics, token counts,
latencies, FLOPs and sample counts. ``reportable`` is False for ``limit`` runs and CPU timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NotRequired, TypedDict

SCHEMA_VERSION = 2  # 2: run identity covers checkpoint/data contents (identity, run_dir fields)
PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "hydra-core",
    "numpy",
    "pillow",
    "scikit-learn",
    "wandb",
    "recomp-eval",
)


@dataclass
class RunRecord:
    """One evaluated (model, benchmark, protocol, method, retention) combination."""

    run_key: str
    model: dict[str, Any]
    benchmark: dict[str, Any]
    protocol: str
    method: dict[str, Any]
    metrics: dict[str, float]
    primary_metric: str
    tokens: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    flops: dict[str, float]
    samples: dict[str, Any]
    reportable: bool
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""  # the run folder (samples.jsonl, identity.json, processes.json)
    identity: dict[str, Any] = field(default_factory=dict)  # settings/context keys, contents
    experiments: list[str] = field(default_factory=list)  # experiment files that ran it
    notes: list[str] = field(default_factory=list)  # e.g. resumed across a contents change
    # template source, the harness the prompts follow, image-processor class, CLIP pairing check
    protocol_details: dict[str, Any] = field(default_factory=dict)
    # the processes that evaluated it: world size, launcher, each shard's device; ``timing`` says
    # whether latencies come from one process or from several sharing the machine
    world: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SampleRow(TypedDict):
    """One line of a run's ``samples.jsonl``: the only place a per-sample row is defined."""

    sample_id: str
    question: str
    answers: list[str]
    meta: dict[str, Any]
    prediction: str  # the generation, stripped (and cut at a stop string)
    kept_tokens: float  # visual tokens the LLM saw (in-LLM methods: mean over layers)
    text_tokens: int  # prompt tokens other than the image placeholder
    new_tokens: int
    timings_ms: dict[str, float]  # the batch's stage times
    batch_size: int
    warmup: bool  # batch excluded from latency statistics
    keep_map: str | None  # recomp_eval.keepmap code string of the kept/merged patches
    prompt: str | None  # the rendered prompt, on the first row of each batch only
    # questions whose target object is known (SynthVQA): its patch mask ("0"/"1" per patch) and
    # where the method looked (recomp_eval.metrics.targets: recall, precision, AUROC per score)
    target_mask: NotRequired[str]
    target: NotRequired[dict[str, float | int | None]]
    # families whose images vary in size (LLaVA-NeXT): crops, kept tokens per crop, newlines,
    # the visual tokens of the uncompressed image (``image_tokens``), ... (the adapter's facts)
    image: NotRequired[dict[str, Any]]
    n_image_tokens: NotRequired[int]  # the image's visual tokens uncompressed (FLOPs, in-LLM)


def target_entry(codes: str, mask: Any, scores: dict[str, Any]) -> dict[str, float | int | None]:
    """Target recall/precision of a keep map and the localisation of each per-patch score.

    Args:
        codes: the sample's keep-map string (N codes).
        mask: [N] bool target patches.
        scores: name -> [1,N] per-patch scores (``Compressed.patch_scores`` of the sample);
            each adds ``<name>_auroc`` and ``<name>_first_rank``.
    """
    from recomp_eval.metrics.targets import localisation, target_stats

    entry: dict[str, float | int | None] = dict(target_stats(codes, mask))
    for name, score in sorted(scores.items()):
        loc = localisation(score[0].float().numpy(), mask)
        entry[f"{name}_auroc"] = loc["auroc"]
        entry[f"{name}_first_rank"] = loc["first_rank"]
    return entry


def sample_row(
    sample: Any, result: Any, warm: bool, first: bool, target_mask: Any = None
) -> SampleRow:
    """The row of one generated sample (``sample``: a benchmark Sample, ``result``: its
    :class:`~recomp_eval.pipeline.GenerationResult`; ``target_mask``: [N] bool patches of the
    object the question asks about, when the benchmark knows it)."""
    from recomp_eval import keepmap

    codes = None
    if result.compressed is not None:
        c = result.compressed
        codes = keepmap.encode(keepmap.keep_map(c.role[0], c.source[0], c.members[0]))
    row = SampleRow(
        sample_id=sample.sample_id,
        question=sample.question,
        answers=sample.answers,
        meta=sample.meta,
        prediction=result.text,
        kept_tokens=result.kept_tokens,
        text_tokens=result.text_tokens,
        new_tokens=len(result.new_token_ids),
        timings_ms=result.timings,
        batch_size=result.batch_size,
        warmup=not warm,
        keep_map=codes,
        prompt=result.prompt if first else None,
    )
    if result.image:
        row["image"] = dict(result.image)
        row["n_image_tokens"] = int(result.image["image_tokens"])
    if target_mask is not None and codes is not None:
        from recomp_eval.synth.targets import encode_mask

        row["target_mask"] = encode_mask(target_mask)
        row["target"] = target_entry(codes, target_mask, result.compressed.patch_scores)
        kept = result.llm_kept
        if kept is not None and target_mask.any():  # in-LLM methods: after the last stage
            row["target"]["recall_llm"] = float(
                (kept.numpy() & target_mask).sum() / target_mask.sum()
            )
    return row


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable payload, independent of key order."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def git_commit(cwd: Path | None = None) -> str:
    """Current commit hash (with ``-dirty`` when the tree has changes), or ``unknown``."""
    root = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment(device: str) -> dict[str, Any]:
    """Git commit, packages, python, host and accelerator names."""
    info: dict[str, Any] = {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
            info["cuda"] = torch.version.cuda
        else:
            info["device_name"] = platform.processor() or "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every ``results.json`` of the current schema under ``root`` (recursively), by path.

    Records of an older schema are left out (their run identity did not cover the checkpoint
    and data contents, so their answers may be stale).
    """
    records = []
    for path in sorted(Path(root).rglob("results.json")):
        with open(path) as handle:
            record = json.load(handle)
        if record.get("schema") != SCHEMA_VERSION:
            continue
        record["_path"] = str(path)
        records.append(record)
    return records
