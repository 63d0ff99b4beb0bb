"""GQA testdev-balanced (12,578 questions); images live in a second config keyed by ``imageId``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recomp_eval.benchmarks.base import HubBenchmark, Sample

IMAGE_CONFIG = "testdev_balanced_images"


class GQABenchmark(HubBenchmark):
    """Questions from ``testdev_balanced_instructions``, images from ``testdev_balanced_images``."""

    name = "gqa"

    def __init__(self, *args: Any, image_config_name: str = IMAGE_CONFIG, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_config_name = image_config_name
        self.image_source = None

    def prepare(self) -> None:
        self._images, self.image_source = self.load(self.image_config_name)
        # imageId -> row of the image table (only the id column is read here).
        self._image_row = {image_id: i for i, image_id in enumerate(self._images["id"])}

    def image_cell(self, index: int, row: Mapping[str, Any]) -> Any:
        position = self._image_row.get(row["imageId"])
        return None if position is None else self._images[position]["image"]

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        return Sample(
            sample_id=str(row["id"]),
            benchmark=self.name,
            question=row["question"] or "",
            answers=[row["answer"]] if row.get("answer") else [],
            meta={"split": self.split, "question_id": str(row["id"]), "image_id": row["imageId"]},
            load_image=load_image,
        )

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["image_source"] = self.image_source.to_dict() if self.image_source else None
        return out
