"""User prompt text and generation settings per benchmark and protocol.

The prompt returned here is the *user turn only*: no conversation template, no system prompt, no
``<image>`` token (the integration's conversation code adds them). The settings come from the
YAML, through :mod:`recomp_eval.benchmarks.specs`: the protocol's ``benchmarks.<name>`` entry
(suffix, question ops, OCR line, max_new_tokens, stop, ``do_sample``) and the benchmark's
``prompt_template``.

Sources: LLaVA-1.5 ``scripts/v1_5/eval/*`` question files (``llava15``) and the lmms-eval 0.7.3
task YAMLs and ``utils.py`` (``lmms_eval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import Sample
from recomp_eval.benchmarks.specs import (
    MME_BUILTIN_SUFFIX,
    QUESTION_OPS,
    BenchmarkPrompt,
    ProtocolSpec,
    benchmark_spec,
    protocol_spec,
)

__all__ = [
    "MME_BUILTIN_SUFFIX",
    "OCR_PREFIX",
    "OCR_SEPARATOR",
    "BenchmarkPrompt",
    "ProtocolSpec",
    "benchmark_prompt",
    "generation_settings",
    "get_protocol",
    "render_prompt",
    "user_prompt",
]

# How ``ocr: true`` renders (LLaVA's TextVQA question file): "\nReference OCR token: t1, t2".
OCR_PREFIX = "\nReference OCR token: "
OCR_SEPARATOR = ", "


def get_protocol(protocol: str | ProtocolSpec) -> ProtocolSpec:
    """A protocol name (``configs/protocol/<name>.yaml``) or an already built spec."""
    return protocol if isinstance(protocol, ProtocolSpec) else protocol_spec(protocol)


def benchmark_prompt(benchmark: str, protocol: str | ProtocolSpec) -> BenchmarkPrompt:
    return get_protocol(protocol).prompt(benchmark)


def render_prompt(
    benchmark: str,
    question: str,
    protocol: str | ProtocolSpec,
    meta: Mapping[str, Any] | None = None,
    template: str | None = None,
) -> str:
    """The user prompt for a raw question (see :func:`user_prompt`).

    Args:
        template: the benchmark config's ``prompt_template``; None reads it from
            ``configs/benchmark/<benchmark>.yaml``.
    """
    settings = benchmark_prompt(benchmark, protocol)
    for op in settings.question_ops:
        question = QUESTION_OPS[op](question)
    tokens = list((meta or {}).get("ocr_tokens") or [])
    ocr = OCR_PREFIX + OCR_SEPARATOR.join(tokens) if settings.ocr and tokens else ""
    if template is None:
        template = benchmark_spec(benchmark).prompt_template
    return template.format(question=question, ocr=ocr, suffix=settings.suffix)


def user_prompt(sample: Sample, protocol: str | ProtocolSpec, template: str | None = None) -> str:
    """Question + OCR line + suffix per protocol, without template, system prompt or ``<image>``."""
    return render_prompt(sample.benchmark, sample.question, protocol, sample.meta, template)


def generation_settings(benchmark: str, protocol: str | ProtocolSpec) -> dict[str, Any]:
    """``dict(max_new_tokens=..., do_sample=..., stop=[...])`` (greedy in both protocols)."""
    spec = get_protocol(protocol)
    settings = spec.prompt(benchmark)
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": spec.do_sample,
        "stop": list(settings.stop),
    }


def __getattr__(name: str) -> Any:
    # ``SHORT_ANSWER`` was a Python copy of the YAML suffix; it is now read from the YAML (the
    # LLaVA-1.5 GQA suffix; every benchmark of both protocols uses the same one).
    if name == "SHORT_ANSWER":
        return benchmark_prompt("gqa", "llava15").suffix
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
