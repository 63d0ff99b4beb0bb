"""User prompt text and generation settings per benchmark and protocol.

The prompt returned here is the *user turn only*: no conversation template, no system prompt, no
``<image>`` token (the integration's conversation code adds them). ``configs/protocol/*.yaml``
and ``configs/benchmark/*.yaml`` mirror these tables; ``tests/test_benchmarks.py`` keeps them equal.

Sources: LLaVA-1.5 ``scripts/v1_5/eval/*`` question files (``llava15``) and the lmms-eval 0.7.3
task YAMLs and ``utils.py`` (``lmms_eval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recomp_eval.benchmarks.base import Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_BUILTIN_SUFFIX = " Please answer yes or no."  # in every MME question; replaced by the suffix
OCR_PREFIX = "\nReference OCR token: "
OCR_SEPARATOR = ", "

# Per-benchmark prompt templates (protocol-independent; the protocol fills the slots).
PROMPT_TEMPLATES: dict[str, str] = {
    "gqa": "{question}{suffix}",
    "vqav2": "{question}{suffix}",
    "textvqa": "{question}{ocr}{suffix}",
    "pope": "{question}{suffix}",
    "mme": "{question}{suffix}",
}


@dataclass(frozen=True)
class BenchmarkPrompt:
    """How one protocol asks one benchmark.

    Attributes:
        suffix: appended after the question (and OCR line).
        question_ops: applied to the dataset question in order: ``strip``, ``capitalize``
            (Python's ``str.capitalize``: first letter upper, *rest lower*), ``drop_mme_suffix``.
        ocr: add ``\\nReference OCR token: t1, t2, ...`` (omitted when a sample has no tokens, as
            in LLaVA's question file).
        max_new_tokens: always explicit.
        stop: stop strings the task declares (lmms-eval ``until``).
    """

    suffix: str = SHORT_ANSWER
    question_ops: tuple[str, ...] = ()
    ocr: bool = False
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ProtocolSpec:
    """A protocol preset: conversation style, image mode and per-benchmark prompt settings."""

    name: str
    conversation: str  # llava15: vicuna_v1 with system prompt; lmms_eval: chat template, no system
    system_prompt: str | None
    image_mode: str  # pad (to square with the CLIP mean colour) or crop (processor centre crop)
    benchmarks: Mapping[str, BenchmarkPrompt] = field(default_factory=dict)


# lmms-eval's default llava_hf wrapper (the chat class) passes no stop strings to `generate`: it
# ignores the task's `until` and stops at EOS or max_new_tokens (1024 when the task sets none).
LMMS_DEFAULT_STOP: tuple[str, ...] = ()

PROTOCOLS: dict[str, ProtocolSpec] = {
    "llava15": ProtocolSpec(
        name="llava15",
        conversation="llava15",
        system_prompt=VICUNA_V1_SYSTEM,
        image_mode="pad",
        benchmarks={
            "gqa": BenchmarkPrompt(),
            "vqav2": BenchmarkPrompt(),
            "textvqa": BenchmarkPrompt(ocr=True),
            "pope": BenchmarkPrompt(),
            "mme": BenchmarkPrompt(question_ops=("strip", "drop_mme_suffix")),
        },
    ),
    "lmms_eval": ProtocolSpec(
        name="lmms_eval",
        conversation="lmms_eval",
        system_prompt=None,
        image_mode="crop",
        benchmarks={
            "gqa": BenchmarkPrompt(max_new_tokens=16, stop=LMMS_DEFAULT_STOP),
            "vqav2": BenchmarkPrompt(max_new_tokens=16, stop=LMMS_DEFAULT_STOP),
            # max_new_tokens unset in the task: the llava_hf wrapper's default is 1024.
            "textvqa": BenchmarkPrompt(
                question_ops=("capitalize",), max_new_tokens=1024, stop=LMMS_DEFAULT_STOP
            ),
            "pope": BenchmarkPrompt(
                question_ops=("strip",), max_new_tokens=128, stop=LMMS_DEFAULT_STOP
            ),
            "mme": BenchmarkPrompt(
                question_ops=("strip", "drop_mme_suffix"), max_new_tokens=16, stop=LMMS_DEFAULT_STOP
            ),
        },
    ),
}

_QUESTION_OPS = {
    "strip": str.strip,
    "capitalize": str.capitalize,
    "drop_mme_suffix": lambda q: q.replace(MME_BUILTIN_SUFFIX, ""),
}


def get_protocol(protocol: str | ProtocolSpec) -> ProtocolSpec:
    if isinstance(protocol, ProtocolSpec):
        return protocol
    if protocol not in PROTOCOLS:
        raise KeyError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def benchmark_prompt(benchmark: str, protocol: str | ProtocolSpec) -> BenchmarkPrompt:
    spec = get_protocol(protocol)
    if benchmark not in spec.benchmarks:
        raise KeyError(f"protocol '{spec.name}' has no settings for benchmark '{benchmark}'")
    return spec.benchmarks[benchmark]


def render_prompt(
    benchmark: str,
    question: str,
    protocol: str | ProtocolSpec,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The user prompt for a raw question (see :func:`user_prompt`)."""
    settings = benchmark_prompt(benchmark, protocol)
    for op in settings.question_ops:
        question = _QUESTION_OPS[op](question)
    tokens = list((meta or {}).get("ocr_tokens") or [])
    ocr = OCR_PREFIX + OCR_SEPARATOR.join(tokens) if settings.ocr and tokens else ""
    return PROMPT_TEMPLATES[benchmark].format(question=question, ocr=ocr, suffix=settings.suffix)


def user_prompt(sample: Sample, protocol: str | ProtocolSpec) -> str:
    """Question + OCR line + suffix per protocol, without template, system prompt or ``<image>``."""
    return render_prompt(sample.benchmark, sample.question, protocol, sample.meta)


def generation_settings(benchmark: str, protocol: str | ProtocolSpec) -> dict[str, Any]:
    """``dict(max_new_tokens=..., do_sample=False, stop=[...])`` (greedy in both protocols)."""
    settings = benchmark_prompt(benchmark, protocol)
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": False,
        "stop": list(settings.stop),
    }
