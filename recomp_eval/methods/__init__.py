"""Compression methods: pure tensor functions, one file each, no transformers import.

``build_method(name, **kwargs)`` returns a :class:`BuiltMethod`: call it on
:class:`~recomp_eval.methods.base.VisionSignals` to get
:class:`~recomp_eval.methods.base.Compressed`; its ``spec`` tells the model adapter which signals
to capture.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    TextSpec,
    VisionSignals,
    budget_from_ratio,
    check_retention,
)

__all__ = [
    "METHODS",
    "BuiltMethod",
    "Compressed",
    "Role",
    "SignalSpec",
    "TextSpec",
    "VisionSignals",
    "budget_from_ratio",
    "build_method",
    "check_retention",
]


@dataclass
class BuiltMethod:
    """A configured method: ``method(signals) -> Compressed``.

    ``llm`` carries in-LLM pruning settings (FastV) for the adapter; pre-LLM methods leave it None.
    """

    name: str
    spec: SignalSpec
    fn: Callable[[VisionSignals], Compressed]
    config: dict[str, Any] = field(default_factory=dict)
    llm: Any = None

    def __call__(self, signals: VisionSignals) -> Compressed:
        return self.fn(signals)


# name -> module under recomp_eval.methods exposing ``build(**kwargs) -> BuiltMethod``.
# Modules are imported on demand so that importing the package stays cheap.
METHODS: dict[str, str] = {
    "none": "identity",
    "recomp": "rc",
    "prumerge": "prumerge",
    "prumerge_plus": "prumerge",
    "visionzip": "visionzip",
    "fastervlm": "fastervlm",
    "random": "random_keep",
    "pool": "pool",
    "fastv": "fastv",
    "divprune": "divprune",
    "vispruner": "vispruner",
    "cdpruner": "cdpruner",
    "trim": "trim",
    "dart": "dart",
    "pdrop": "pdrop",
}


def build_method(name: str, **kwargs: Any) -> BuiltMethod:
    """Build a compression method by name; unknown names list the known ones."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown method '{name}'{hint}; known methods: {', '.join(sorted(METHODS))}"
        )
    module = importlib.import_module(f"recomp_eval.methods.{METHODS[name]}")
    return module.build(name=name, **kwargs)
