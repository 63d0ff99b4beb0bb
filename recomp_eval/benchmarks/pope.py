"""POPE: 3 x 3,000 yes/no questions; ``category`` is the split (adversarial, popular, random)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import HubBenchmark, Sample


class POPEBenchmark(HubBenchmark):
    """``question_id`` restarts in every category, so the sample id is ``category/question_id``."""

    name = "pope"

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        category = row["category"]
        return Sample(
            sample_id=f"{category}/{row['question_id']}",
            benchmark=self.name,
            question=row["question"] or "",
            answers=[row["answer"]] if row.get("answer") else [],
            meta={
                "split": self.split,
                "category": category,
                "question_id": row["question_id"],
                "image_source": row.get("image_source"),
            },
            load_image=load_image,
        )
