"""TextVQA ``validation`` (5,000 questions, with OCR tokens); ``test`` for EvalAI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import HubBenchmark, Sample


class TextVQABenchmark(HubBenchmark):
    """``ocr_tokens`` go to ``meta`` (the ``llava15`` prompt lists them)."""

    name = "textvqa"
    answered_splits_optional = frozenset({"test"})

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        meta = {
            "split": self.split,
            "question_id": int(row["question_id"]),
            "image_id": row.get("image_id"),
            "ocr_tokens": list(row.get("ocr_tokens") or []),
            "image_classes": list(row.get("image_classes") or []),
        }
        return Sample(
            sample_id=str(row["question_id"]),
            benchmark=self.name,
            question=row["question"] or "",
            answers=list(row.get("answers") or []),
            meta=meta,
            load_image=load_image,
        )
