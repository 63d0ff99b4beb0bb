"""Typed protocol and benchmark specs, instantiated from the YAML (the single source of both).

``configs/protocol/<name>.yaml`` becomes a :class:`ProtocolSpec` (conversation, system prompt,
image mode, greedy or not, and one :class:`BenchmarkPrompt` per benchmark);
``configs/benchmark/<config>.yaml``, merged over its ``defaults`` as Hydra composes it, becomes a
:class:`BenchmarkSpec` (prompt template, :class:`ScoringSpec`, submission format). The prompt,
scoring and loyalty code read these specs; no table of theirs is repeated in Python.

The builders read every key: a protocol key they do not know, or a benchmark key that is neither
theirs nor a constructor argument of the benchmark's ``_target_`` class, raises, so nothing sits
in a config that no code reads. Files are read once per (file, config folder) and cached; the
folder is :data:`recomp_eval.config_path.CONFIG_DIR` unless one is passed.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from recomp_eval.config_path import CONFIG_DIR

PROTOCOL_GROUP = "protocol"
BENCHMARK_GROUP = "benchmark"
IMAGE_MODES = ("pad", "crop")  # pad to square with the mean colour, or the processor's crop
TEMPLATE_FIELDS = frozenset({"question", "ocr", "suffix"})

MME_BUILTIN_SUFFIX = " Please answer yes or no."  # in every MME question; replaced by the suffix
QUESTION_OPS: Mapping[str, Callable[[str], str]] = MappingProxyType(
    {
        "strip": str.strip,
        "capitalize": str.capitalize,  # first letter upper, *rest lower* (lmms-eval TextVQA)
        "drop_mme_suffix": lambda q: q.replace(MME_BUILTIN_SUFFIX, ""),
    }
)


class UnknownConfigError(KeyError, ValueError):
    """No config file of that name in the group (message: one line with a did-you-mean)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BenchmarkPrompt:
    """How one protocol asks one benchmark (``configs/protocol/*.yaml`` ``benchmarks.<name>``).

    Attributes:
        suffix: appended after the question (and OCR line).
        question_ops: applied to the dataset question in order, names of :data:`QUESTION_OPS`.
        ocr: add ``\\nReference OCR token: t1, t2, ...`` (omitted when a sample has no tokens, as
            in LLaVA's question file).
        max_new_tokens: always explicit.
        stop: stop strings passed to generation.
    """

    suffix: str
    question_ops: tuple[str, ...]
    ocr: bool
    max_new_tokens: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class ProtocolSpec:
    """A protocol preset (``configs/protocol/<name>.yaml``).

    Attributes:
        name: the protocol (the file name).
        conversation: conversation style (``llava15``: vicuna_v1 with the system prompt;
            ``lmms_eval``: the checkpoint's chat template, no system prompt).
        system_prompt: the system prompt, or None.
        image_mode: ``pad`` (to square with the mean colour) or ``crop`` (processor centre crop).
        pad_color: the 8-bit RGB padding colour of ``pad``, None for ``crop``.
        do_sample: False = greedy decoding.
        benchmarks: per benchmark name, its :class:`BenchmarkPrompt`.
    """

    name: str
    conversation: str
    system_prompt: str | None
    image_mode: str
    pad_color: tuple[int, ...] | None
    do_sample: bool
    benchmarks: Mapping[str, BenchmarkPrompt]

    def prompt(self, benchmark: str) -> BenchmarkPrompt:
        if benchmark not in self.benchmarks:
            raise KeyError(
                f"protocol '{self.name}' has no settings for benchmark '{benchmark}'; it has: "
                f"{', '.join(self.benchmarks)}"
            )
        return self.benchmarks[benchmark]


@dataclass(frozen=True)
class ScoringSpec:
    """How one benchmark is scored, per protocol (the ``metrics``, ``answer_pipeline`` and
    ``primary`` keys of its config).

    Attributes:
        benchmark: the benchmark name (prefix of the result keys).
        metrics: protocol -> registry names of the metrics to compute.
        answer_pipeline: protocol -> normaliser steps giving the canonical answer (loyalty's
            agreement).
        primary: protocol -> the headline result name (``accuracy``, ``f1_mean``, ...), without
            benchmark prefix and metric variant.
    """

    benchmark: str
    metrics: Mapping[str, tuple[str, ...]]
    answer_pipeline: Mapping[str, tuple[str, ...]]
    primary: Mapping[str, str]

    def _pick(self, table: Mapping[str, Any], protocol: str) -> Any:
        if protocol not in table:
            raise KeyError(f"unknown protocol '{protocol}'; known: {', '.join(table)}")
        return table[protocol]

    def metrics_for(self, protocol: str) -> tuple[str, ...]:
        return self._pick(self.metrics, protocol)

    def pipeline_for(self, protocol: str) -> tuple[str, ...]:
        return self._pick(self.answer_pipeline, protocol)

    def primary_for(self, protocol: str) -> str:
        return self._pick(self.primary, protocol)


@dataclass(frozen=True)
class BenchmarkSpec:
    """The declarative part of a benchmark config (the loader's part goes to its class).

    Attributes:
        name: benchmark name (several configs share one: ``vqav2`` and ``vqav2_testdev``).
        prompt_template: ``str.format`` template with ``{question}``, ``{ocr}``, ``{suffix}``.
        scoring: metrics, answer pipeline and primary result per protocol.
        submission: EvalAI submission format written after a run (``vqav2``, ``textvqa``), or None.
        version: bumped on any prompt or normalisation change.
    """

    name: str
    prompt_template: str
    scoring: ScoringSpec
    submission: str | None
    version: int


# --- reading a mapping key by key ---------------------------------------------------------------


class _Keys:
    """Reads a config mapping; :meth:`finish` raises on the keys that were not read."""

    def __init__(self, cfg: Mapping[str, Any], where: str) -> None:
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(cfg).__name__}")
        self.cfg, self.where, self.read = cfg, where, set()

    def __call__(self, key: str) -> Any:
        if key not in self.cfg:
            raise KeyError(f"{self.where}: missing key '{key}'")
        self.read.add(key)
        return self.cfg[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.cfg.get(key, default)

    def finish(self, also_read: Iterable[str] = ()) -> None:
        unread = sorted(set(self.cfg) - self.read - set(also_read))
        if unread:
            raise ValueError(f"{self.where}: keys that no code reads: {unread}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{where}: expected a list of strings, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _per_protocol(
    value: Any, where: str, protocols: Sequence[str], cast: Callable[[Any, str], Any]
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or set(value) != set(protocols):
        got = sorted(value) if isinstance(value, Mapping) else value
        raise ValueError(f"{where}: needs one entry per protocol {list(protocols)}, got {got}")
    return MappingProxyType({p: cast(value[p], f"{where}.{p}") for p in protocols})


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{where}: expected a name, got {value!r}")
    return value


# --- builders -----------------------------------------------------------------------------------


def benchmark_prompt_from_config(cfg: Mapping[str, Any], where: str) -> BenchmarkPrompt:
    keys = _Keys(cfg, where)
    ops = _strings(keys("question_ops"), f"{where}.question_ops")
    for op in ops:
        if op not in QUESTION_OPS:
            raise ValueError(
                f"{where}: unknown question op '{op}'; known: {', '.join(QUESTION_OPS)}"
            )
    prompt = BenchmarkPrompt(
        suffix=str(keys("suffix")),
        question_ops=ops,
        ocr=bool(keys("ocr")),
        max_new_tokens=_int(keys("max_new_tokens"), f"{where}.max_new_tokens", minimum=1),
        stop=_strings(keys("stop"), f"{where}.stop"),
    )
    keys.finish()
    return prompt


def protocol_spec_from_config(cfg: Mapping[str, Any], where: str = "protocol") -> ProtocolSpec:
    """Build a :class:`ProtocolSpec` from a protocol config (a file or the composed ``protocol``);
    every key must be one that is read here."""
    keys = _Keys(cfg, where)
    image_mode = keys("image_mode")
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"{where}: image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    pad_color = keys("pad_color")
    system_prompt = keys("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"{where}.system_prompt: expected a string or null, got {system_prompt!r}")
    benchmarks = keys("benchmarks")
    if not isinstance(benchmarks, Mapping):
        raise TypeError(f"{where}.benchmarks: expected a mapping, got {benchmarks!r}")
    spec = ProtocolSpec(
        name=_name(keys("name"), f"{where}.name"),
        conversation=_name(keys("conversation"), f"{where}.conversation"),
        system_prompt=system_prompt,
        image_mode=image_mode,
        pad_color=None if pad_color is None else tuple(int(c) for c in pad_color),
        do_sample=bool(keys("do_sample")),
        benchmarks=MappingProxyType(
            {
                str(b): benchmark_prompt_from_config(v, f"{where}.benchmarks.{b}")
                for b, v in benchmarks.items()
            }
        ),
    )
    keys.finish()
    return spec


def _constructor_arguments(target: str) -> frozenset[str]:
    """Keyword arguments the ``_target_`` class accepts (its ``__init__`` and its bases')."""
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    return frozenset(names)


def benchmark_spec_from_config(
    cfg: Mapping[str, Any], where: str = "benchmark", protocols: Sequence[str] | None = None
) -> BenchmarkSpec:
    """Build a :class:`BenchmarkSpec` from a benchmark config (a merged file or the composed
    ``benchmark``). Keys not read here must be constructor arguments of the ``_target_`` class.

    Args:
        protocols: the protocols each per-protocol table must cover; default: every
            ``configs/protocol`` file.
    """
    protocols = tuple(protocols) if protocols is not None else protocol_names()
    keys = _Keys(cfg, where)
    name = _name(keys("name"), f"{where}.name")
    template = keys("prompt_template")
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if not fields <= TEMPLATE_FIELDS or "question" not in fields:
        raise ValueError(
            f"{where}.prompt_template: needs {{question}} and only fields of "
            f"{sorted(TEMPLATE_FIELDS)}, got {template!r}"
        )
    version = _int(keys("version"), f"{where}.version")
    submission = keys.get("submission")
    spec = BenchmarkSpec(
        name=name,
        prompt_template=template,
        scoring=ScoringSpec(
            benchmark=name,
            metrics=_per_protocol(keys("metrics"), f"{where}.metrics", protocols, _strings),
            answer_pipeline=_per_protocol(
                keys("answer_pipeline"), f"{where}.answer_pipeline", protocols, _strings
            ),
            primary=_per_protocol(keys("primary"), f"{where}.primary", protocols, _name),
        ),
        submission=None if submission is None else _name(submission, f"{where}.submission"),
        version=version,
    )
    target = keys("_target_")
    keys.finish(also_read=_constructor_arguments(target))
    return spec


# --- loading the files --------------------------------------------------------------------------


def _config_dir(config_dir: str | Path | None) -> Path:
    return Path(config_dir if config_dir is not None else CONFIG_DIR)


def _stems(group_dir: Path) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in group_dir.glob("*.yaml") if not p.stem.startswith("_")))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Hydra's merge of a later config over an earlier one: mappings merge, the rest replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _compose(group_dir: Path, stem: str, where: str) -> dict[str, Any]:
    path = group_dir / f"{stem}.yaml"
    if not path.is_file():
        known = _stems(group_dir)
        close = difflib.get_close_matches(stem, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownConfigError(f"unknown {where} '{stem}'{hint}; known: {', '.join(known)}")
    own = _read_yaml(path)
    defaults = own.pop("defaults", None) or ["_self_"]
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out: dict[str, Any] = {}
    for entry in defaults:
        if not isinstance(entry, str):
            raise ValueError(f"{path}: only same-group defaults are supported, got {entry!r}")
        out = _merge(out, own if entry == "_self_" else _compose(group_dir, entry, where))
    return out


def load_config(group: str, stem: str, config_dir: str | Path | None = None) -> dict[str, Any]:
    """``configs/<group>/<stem>.yaml`` as a plain dict, merged over its ``defaults`` as Hydra
    composes the group (``defaults: [_base, _self_]``)."""
    return _compose(_config_dir(config_dir) / group, stem, group)


def protocol_names(config_dir: str | Path | None = None) -> tuple[str, ...]:
    """The protocols: one file each in ``configs/protocol``."""
    return _stems(_config_dir(config_dir) / PROTOCOL_GROUP)


def benchmark_names(config_dir: str | Path | None = None) -> tuple[str, ...]:
    """The benchmarks: the ``configs/benchmark`` files named after their benchmark (the defaults
    of scoring; ``vqav2_testdev`` and ``textvqa_test`` are other configs of ``vqav2``/``textvqa``)."""
    folder = _config_dir(config_dir) / BENCHMARK_GROUP
    return tuple(s for s in _stems(folder) if _read_yaml(folder / f"{s}.yaml").get("name") == s)


@functools.cache
def _protocol_spec(name: str, config_dir: Path) -> ProtocolSpec:
    where = f"configs/{PROTOCOL_GROUP}/{name}.yaml"
    spec = protocol_spec_from_config(load_config(PROTOCOL_GROUP, name, config_dir), where)
    if spec.name != name:
        raise ValueError(f"{where}: name '{spec.name}' differs from the file name")
    return spec


@functools.cache
def _benchmark_spec(config: str, config_dir: Path) -> BenchmarkSpec:
    where = f"configs/{BENCHMARK_GROUP}/{config}.yaml"
    cfg = load_config(BENCHMARK_GROUP, config, config_dir)
    return benchmark_spec_from_config(cfg, where, protocol_names(config_dir))


def protocol_spec(name: str, config_dir: str | Path | None = None) -> ProtocolSpec:
    """The :class:`ProtocolSpec` of ``configs/protocol/<name>.yaml`` (cached)."""
    return _protocol_spec(name, _config_dir(config_dir))


def benchmark_spec(config: str, config_dir: str | Path | None = None) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` of ``configs/benchmark/<config>.yaml`` (cached). A benchmark
    name gives its default config (``vqav2`` -> ``vqav2.yaml``)."""
    return _benchmark_spec(config, _config_dir(config_dir))


def scoring_spec(benchmark: str, config_dir: str | Path | None = None) -> ScoringSpec:
    """The default :class:`ScoringSpec` of a benchmark name (from ``<benchmark>.yaml``)."""
    return benchmark_spec(benchmark, config_dir).scoring
