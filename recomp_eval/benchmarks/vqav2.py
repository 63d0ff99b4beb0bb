"""VQAv2: ``validation`` scored locally (214,354 questions); ``testdev``/``test`` for EvalAI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import HubBenchmark, Sample


class VQAv2Benchmark(HubBenchmark):
    """Rows carry 10 answers as ``{answer, answer_confidence, answer_id}``; test splits none."""

    name = "vqav2"
    answered_splits_optional = frozenset({"testdev", "test"})

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        answers = [a["answer"] for a in (row.get("answers") or [])]
        meta = {
            "split": self.split,
            "question_id": int(row["question_id"]),
            "image_id": row.get("image_id"),
            "question_type": row.get("question_type"),
            "answer_type": row.get("answer_type"),
        }
        return Sample(
            sample_id=str(row["question_id"]),
            benchmark=self.name,
            question=row["question"] or "",
            answers=answers,
            meta=meta,
            load_image=load_image,
        )
