"""MME: 2,374 yes/no questions, two per image, 14 categories (10 perception, 4 cognition)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import HubBenchmark, Sample


class MMEBenchmark(HubBenchmark):
    """``question_id`` names the image file and is shared by its two questions; the sample id
    appends the question's rank within the image (``<question_id>#0``, ``#1``). ``limit`` keeps
    whole images so that acc+ stays defined."""

    name = "mme"
    group_column = "question_id"

    def prepare(self) -> None:
        # Rank of every row among the rows of its image, in dataset order.
        seen: Counter[str] = Counter()
        self._rank: dict[int, int] = {}
        for i, qid in enumerate(self._text["question_id"]):
            self._rank[i] = seen[qid]
            seen[qid] += 1

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        qid = row["question_id"]
        return Sample(
            sample_id=f"{qid}#{self._rank[index]}",
            benchmark=self.name,
            question=row["question"] or "",
            answers=[row["answer"]] if row.get("answer") else [],
            meta={
                "split": self.split,
                "category": row["category"],
                "image_id": qid,
                "question_id": qid,
            },
            load_image=load_image,
        )
