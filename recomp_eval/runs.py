"""What one run is: its method settings, its label, its identity (run key) and its folder.

These are pure functions of the composed config (and of the checkpoint and data fingerprints),
so every process computes the same key and folder for the same run, however it was declared:

* ``method=fastv`` and ``runs=[{method: fastv}]`` are one run: a ``runs`` entry starts from the
  method's YAML (``configs/method/<name>.yaml``) exactly as the ``method`` group selection does;
* the label names the variant and every option that differs from that YAML
  (``recomp[paper,text_weight=0]``), so ablations and option sweeps never collapse into one row;
* the run key hashes everything that changes answers: model id, revision, dtype, attention,
  checkpoint contents (fingerprint), method name and resolved options, retention, protocol,
  benchmark settings, dataset revision and contents (fingerprint), limit, generation settings.
  The batch size, sharing of vision passes and the output folder are not part of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.methods import check_retention
from recomp_eval.records import stable_hash

MAX_LABEL_CHARS = 96  # folder names stay well under the 255-byte limit; the key keeps them unique
# Benchmark settings outside the identity: where the data lives (its contents are fingerprinted)
# and which metric is the headline (scoring only; added after schema 2, so keys stay the same).
NOT_IN_IDENTITY = ("data_dir", "primary")


def method_defaults(name: str) -> dict[str, Any]:
    """The options of ``configs/method/<name>.yaml`` (without ``name``), in file order."""
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        from recomp_eval.methods import build_method

        build_method(name)  # raises the registry's did-you-mean error for an unknown name
        raise ValueError(
            f"method '{name}' has no config file {path}; add one (configs mirror code)"
        )
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(loaded, dict)
    return {k: v for k, v in loaded.items() if k != "name"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


@dataclass
class RunSpec:
    """One (method, retention, options) to evaluate on the loaded model.

    ``options``: every method option (the YAML's values with overrides applied; ``retention``
    excluded). ``defaults``: the method YAML's options, against which the label is written.
    """

    method: str
    retention: float | None
    options: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name``, or ``name[variant,opt=value,...]`` naming the variant and non-defaults."""
        parts = []
        if self.options.get("variant") is not None:
            parts.append(_fmt(self.options["variant"]))
        for key, value in self.options.items():
            if key in ("variant", "retention") or key == "name":
                continue
            if key in self.defaults and self.defaults[key] == value:
                continue
            parts.append(f"{key}={_fmt(value)}")
        return f"{self.method}[{','.join(parts)}]" if parts else self.method

    @property
    def budget(self) -> str:
        return "adaptive" if self.retention is None else "fixed"


def expand_runs(cfg: DictConfig) -> list[RunSpec]:
    """The ``runs`` list, or the single ``method`` group selection with top-level retention.

    A ``runs`` entry naming the selected method starts from the composed ``method`` group (so
    command-line overrides such as ``method.k_layer=3`` apply); any other method starts from its
    YAML. Retention: the entry's, else the top-level ``retention``, else the method YAML's.
    """
    base = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(base, dict)
    specs = []
    entries = list(cfg.get("runs") or []) or [{}]
    for entry in entries:
        if isinstance(entry, DictConfig):
            entry = OmegaConf.to_container(entry, resolve=True)
        unknown = set(entry) - {"method", "retention", "options"}
        if unknown:
            raise ValueError(
                f"runs entry {entry} has unknown keys {sorted(unknown)}; an entry takes "
                f"method, retention and options (e.g. {{method: recomp, retention: 0.1, "
                f"options: {{variant: official}}}})"
            )
        name = entry.get("method") or base["name"]
        defaults = method_defaults(name)
        start = base if name == base["name"] else {"name": name, **defaults}
        options = {k: v for k, v in start.items() if k not in ("name", "retention")}
        options.update(entry.get("options") or {})
        retention = entry.get("retention", cfg.get("retention"))
        if retention is None:
            retention = start.get("retention")
        check_retention(retention)
        defaults = {k: v for k, v in defaults.items() if k != "retention"}
        specs.append(RunSpec(name, retention, options, defaults))
    return specs


def effective_retention(spec: RunSpec, method_config: dict[str, Any]) -> float | None:
    """The retention the built method applies (a method may default to a fixed budget)."""
    if spec.retention is not None:
        return spec.retention
    value = method_config.get("retention")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def settings_key(identity: dict[str, Any]) -> str:
    """Hash of a run's identity without the content fingerprints: the same command on the same
    paths. Two folders sharing it differ only in checkpoint or data contents."""
    rest = {k: v for k, v in identity.items() if k not in ("contents", "method")}
    method = {k: v for k, v in identity.get("method", {}).items() if k != "clip_text"}
    return stable_hash({**rest, "method": method})


def context_key(identity: dict[str, Any]) -> str:
    """Hash of everything but the method: runs with equal context keys are comparable (same
    model contents, data, protocol, limit and generation settings), e.g. a method and ``none``."""
    return stable_hash({k: v for k, v in identity.items() if k != "method"})


def pairing_key(identity: dict[str, Any]) -> str:
    """Hash of the context without the sample selection (``limit``, ``limit_seed``): runs with
    equal pairing keys answered the same questions the same way wherever their samples overlap,
    so per-sample comparisons (% of none on the paired samples) are valid between them."""
    bench = {k: v for k, v in identity.get("benchmark", {}).items()
             if k not in ("limit", "limit_seed")}  # fmt: skip
    rest = {k: v for k, v in identity.items() if k not in ("method", "limit", "benchmark")}
    return stable_hash({**rest, "benchmark": bench})


def folder_name(spec: RunSpec, retention: float | None, key: str) -> str:
    """``<label>-<adaptive|r0.1>-<key>`` with the label made file-system safe."""
    label = re.sub(r"[^A-Za-z0-9._=+-]+", "-", spec.label).strip("-")
    if len(label) > MAX_LABEL_CHARS:
        label = label[:MAX_LABEL_CHARS].rstrip("-") + "~"
    ret = "adaptive" if retention is None else f"r{retention:g}"
    return f"{label}-{ret}-{key}"


def run_dir(records_dir: Path, bench: str, model: str, protocol: str, name: str) -> Path:
    return Path(records_dir) / bench / model / protocol / name


def content_fingerprints(
    model_cfg: Any, checkpoint: str, data_dir: str | None, uses_text: bool, mode: str = "quick"
) -> dict[str, Any]:
    """Fingerprints of the checkpoint, the data folder and (for text-guided runs) the text
    tower: cheap by default; ``mode="full"`` hashes every byte once and caches it."""
    from recomp_eval.fingerprint import checkpoint_fingerprint, data_fingerprint
    from recomp_eval.models import DEFAULT_FAMILY, get_adapter

    model = dict(model_cfg)
    out: dict[str, Any] = {
        "checkpoint": checkpoint_fingerprint(checkpoint, model.get("revision"), mode),
        "data": data_fingerprint(data_dir, mode) if data_dir else None,
        "clip_text": None,
    }
    if uses_text:
        adapter = get_adapter(str(model.get("family") or DEFAULT_FAMILY))
        tower = adapter.text_tower_path(checkpoint, model.get("clip_text_id"))
        out["clip_text"] = checkpoint_fingerprint(tower, None, mode)
    return out


def run_identity(
    model_cfg: dict[str, Any],
    method_name: str,
    method_config: dict[str, Any],
    retention: float | None,
    uses_text: bool,
    protocol_cfg: dict[str, Any],
    bench_cfg: dict[str, Any],
    revision: str | None,
    limit: int | None,
    generation: dict[str, Any],
    contents: dict[str, Any],
) -> dict[str, Any]:
    """Everything that changes a run's answers; its :func:`~recomp_eval.records.stable_hash`
    is the run key (``contents``: the :func:`content_fingerprints`)."""
    digest = lambda fp: None if fp is None else fp.digest  # noqa: E731
    return {
        "model": {
            "id": str(model_cfg["id"]),
            "revision": model_cfg.get("revision"),
            "dtype": str(model_cfg["dtype"]),
            "attn": str(model_cfg.get("attn_implementation", "sdpa")),
        },
        "method": {
            "name": method_name,
            "config": method_config,
            "retention": retention,
            # the text tower is an input of text-guided methods only
            "clip_text": digest(contents["clip_text"]) if uses_text else None,
        },
        "protocol": protocol_cfg,
        "benchmark": {k: v for k, v in bench_cfg.items() if k not in NOT_IN_IDENTITY},
        "revision": revision,
        "limit": limit,
        "generation": generation,
        "contents": {
            "checkpoint": digest(contents["checkpoint"]),
            "data": digest(contents["data"]),
        },
    }


def identity_document(
    label: str, identity: dict[str, Any], key: str, contents: dict[str, Any], used: set[str]
) -> dict[str, Any]:
    """What a run folder's ``identity.json`` holds: the keys, the identity and the full
    fingerprints of the contents the run used (``used``: names in ``contents``)."""
    fingerprints = {
        k: (fp.to_dict() if fp is not None and k in used else None) for k, fp in contents.items()
    }
    return {
        "run_key": key,
        "settings_key": settings_key(identity),
        "context_key": context_key(identity),
        "pairing_key": pairing_key(identity),
        "label": label,
        "identity": identity,
        "fingerprints": fingerprints,
    }
