"""Small typed registries: answer normalisers (named pipeline steps) and metrics with metadata.

A benchmark config names its answer pipeline (``[strip, lowercase, evalai]``) and its metrics by
these names; unknown names fail with a "did you mean" hint. Importing registers nothing: each
registry registers its built-in entries (:func:`register_builtin_normalizers`,
:func:`recomp_eval.metrics.scoring.register_builtin_metrics`) on its first use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from recomp_eval.metrics import normalize as nz

T = TypeVar("T")

Record = Mapping[str, Any]
"""A scored sample: ``prediction: str``, ``answers: list[str]``, ``meta: dict`` (category,
split, image_id, ...), ``sample_id: str``."""


class Registry(Generic[T]):
    """Name -> object map that refuses collisions and suggests close names on a miss.

    Args:
        kind: what the entries are, for messages (``metric``, ``normalizer``).
        builtins: ``registry -> None``, registers the built-in entries; called once, on the
            first use of the registry (lookup, iteration or registration), never at import.
    """

    def __init__(self, kind: str, builtins: Callable[[Registry[T]], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtins = builtins

    @property
    def loaded(self) -> bool:
        """Whether the built-in entries are registered (they are on first use)."""
        return self._builtins is None

    def _load(self) -> None:
        if self._builtins is not None:
            builtins, self._builtins = self._builtins, None
            builtins(self)

    def register(self, name: str, obj: T) -> T:
        self._load()
        if name in self._items:
            raise KeyError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(sorted(self._items))
            raise KeyError(f"unknown {self.kind} '{name}'{hint}; known: {known}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)


# --- answer pipeline steps ----------------------------------------------------------------------


def register_builtin_normalizers(registry: Registry[Callable[[str], str]]) -> None:
    """The answer pipeline steps that benchmark configs name (``answer_pipeline``)."""
    for name, fn in {
        "strip": str.strip,
        "lowercase": str.lower,
        "evalai": nz.evalai_normalize,
        "vqa_lmms_eval_073": nz.vqa_normalize,
        "gqa_lmms_eval": nz.gqa_normalize_lmms_eval,
        "gqa_llava": nz.gqa_normalize_llava,
        "pope_llava": nz.parse_pope_llava,
        "pope_strict": lambda text: nz.parse_pope_strict(text) or "",
        "mme_lmms_eval": nz.parse_mme_lmms_eval,
        "mme_tool": nz.parse_mme_tool,
    }.items():
        registry.register(name, fn)


NORMALIZERS: Registry[Callable[[str], str]] = Registry("normalizer", register_builtin_normalizers)


def apply_pipeline(text: str, steps: Sequence[str]) -> str:
    """Run ``text`` through the named normaliser steps in order."""
    for step in steps:
        text = NORMALIZERS.get(step)(text)
    return text


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """A registered aggregate metric.

    Attributes:
        name: registry name (also the ``metrics`` entry in benchmark configs).
        fn: ``records -> {key: value}``; the scorer prefixes keys with ``benchmark/`` and appends
            ``_{variant}`` when the variant is not empty.
        variant: which implementation the numbers follow (``llava``, ``lmms_eval``,
            ``lmms_eval_073``, ``m4c``, ``mme_tool``); part of the result key.
        higher_is_better: for the score keys.
        neutral_keys: keys that are diagnostics, not scores (yes-ratio, unparseable rate, counts).
        per_sample: ``(prediction, record) -> float`` correctness of one answer in [0, 1], used by
            the loyalty metrics.
        description: one line for the docs and the result record.
    """

    name: str
    fn: Callable[[Sequence[Record]], dict[str, float]]
    variant: str
    per_sample: Callable[[str, Record], float]
    higher_is_better: bool = True
    neutral_keys: frozenset[str] = field(default_factory=frozenset)
    description: str = ""

    def key(self, benchmark: str, name: str) -> str:
        suffix = f"_{self.variant}" if self.variant else ""
        return f"{benchmark}/{name}{suffix}"


def _builtin_metrics(registry: Registry[MetricSpec]) -> None:
    from recomp_eval.metrics.scoring import register_builtin_metrics  # scoring imports this module

    register_builtin_metrics(registry)


METRICS: Registry[MetricSpec] = Registry("metric", _builtin_metrics)


def register_metric(spec: MetricSpec, registry: Registry[MetricSpec] = METRICS) -> MetricSpec:
    """Add a metric (the built-in ones are registered first, so that names cannot collide)."""
    return registry.register(spec.name, spec)
