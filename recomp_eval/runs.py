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
