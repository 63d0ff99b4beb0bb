"""Hub schemas of the five real benchmarks (``datasets.Features``) and their local layout.

Column names and Arrow types follow the lmms-lab dataset cards; ``recomp_eval/benchmarks/fixtures.py`` uses the
same definitions for the test fixtures, so that the synthetic parquet files are read by the
real loaders through ``data_dir`` unchanged.
"""

from __future__ import annotations

BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme")
SPLITS = {"gqa": "testdev", "vqav2": "validation", "textvqa": "validation", "pope": "test"}
SPLITS["mme"] = "test"
CONFIGS = {"gqa": "testdev_balanced_instructions"}  # others: "default"
GQA_IMAGE_CONFIG = "testdev_balanced_images"
POPE_CATEGORIES = ("adversarial", "popular", "random")


def hub_features(name: str):
    """``datasets.Features`` of benchmark ``name`` (``gqa_images`` for GQA's image table)."""
    from datasets import Features, Sequence, Value
    from datasets import Image as ImageFeature

    s = Value("string")
    if name == "gqa":
        return Features(
            {
                "id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s,
                "isBalanced": Value("bool"),
                "groups": {"global": s, "local": s},
                "entailed": s, "equivalent": s,
                "types": {"structural": s, "semantic": s, "detailed": s},
                "annotations": {"answer": s, "question": s, "fullAnswer": s},
                "semantic": [{"operation": s, "argument": s, "dependencies": Sequence(Value("int32"))}],
                "semanticStr": s,
            }
        )  # fmt: skip
    if name == "gqa_images":
        return Features({"id": s, "image": ImageFeature()})
    if name == "vqav2":
        return Features(
            {
                "question_type": s, "multiple_choice_answer": s,
                "answers": [{"answer": s, "answer_confidence": s, "answer_id": Value("int64")}],
                "image_id": Value("int64"), "answer_type": s, "question_id": Value("int64"),
                "question": s, "image": ImageFeature(),
            }
        )  # fmt: skip
    if name == "textvqa":
        return Features(
            {
                "image_id": s, "question_id": Value("int32"), "question": s,
                "question_tokens": Sequence(s), "image": ImageFeature(),
                "image_width": Value("int32"), "image_height": Value("int32"),
                "flickr_original_url": s, "flickr_300k_url": s, "answers": Sequence(s),
                "image_classes": Sequence(s), "set_name": s, "ocr_tokens": Sequence(s),
            }
        )  # fmt: skip
    if name == "pope":
        return Features(
            {
                "id": s, "question_id": s, "question": s, "answer": s, "image_source": s,
                "image": ImageFeature(), "category": s,
            }
        )  # fmt: skip
    if name == "mme":
        return Features(
            {"question_id": s, "image": ImageFeature(), "question": s, "answer": s, "category": s}
        )
    raise KeyError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)}")
