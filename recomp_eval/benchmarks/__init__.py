"""Benchmarks: lazy loaders for GQA, VQAv2, TextVQA, POPE and MME, prompts per protocol, and the
typed specs (:mod:`recomp_eval.benchmarks.specs`) that ``configs/protocol`` and
``configs/benchmark`` are read into."""

from recomp_eval.benchmarks.base import BadSample, Benchmark, HubBenchmark, Sample
from recomp_eval.benchmarks.gqa import GQABenchmark
from recomp_eval.benchmarks.loading import DatasetUnavailableError, load_split
from recomp_eval.benchmarks.mme import MMEBenchmark
from recomp_eval.benchmarks.pope import POPEBenchmark
from recomp_eval.benchmarks.textvqa import TextVQABenchmark
from recomp_eval.benchmarks.vqav2 import VQAv2Benchmark

BENCHMARK_CLASSES: dict[str, type[HubBenchmark]] = {
    cls.name: cls
    for cls in (GQABenchmark, VQAv2Benchmark, TextVQABenchmark, POPEBenchmark, MMEBenchmark)
}

__all__ = [
    "BENCHMARK_CLASSES",
    "BadSample",
    "Benchmark",
    "DatasetUnavailableError",
    "GQABenchmark",
    "HubBenchmark",
    "MMEBenchmark",
    "POPEBenchmark",
    "Sample",
    "TextVQABenchmark",
    "VQAv2Benchmark",
    "load_split",
]
