"""Tiny local copies of the five benchmarks in the hub schema (parquet + manifest.json).

``write_fixture(name, root)`` writes ``root/<name>/`` in the layout ``scripts/prefetch.py``
produces, so loaders run through the same ``data_dir`` code path as prefetched hub data. Images
come from ``skimage.data`` (downscaled) or are drawn in code. ``bad=True`` adds one record of each
kind the loaders must survive: undecodable bytes, empty question, grayscale, RGBA and huge image.
Column names and types follow the lmms-lab dataset cards; GQA's nested annotation columns are
included in a simplified form (the loader reads only id, imageId, question, answer).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FIXTURE_SIDE = 48  # pixels: small enough to keep the tests fast
HUGE_SIDE = 1200  # with max_image_pixels=HUGE_LIMIT in tests this image is "huge"
HUGE_LIMIT = 1_000_000


def _png(img: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def sample_images() -> list[Image.Image]:
    """A few real RGB photos from scikit-image, downscaled; drawn gradients if unavailable."""
    try:
        from skimage import data

        arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except ImportError:  # scikit-image is a dev extra; fall back to drawn images
        ramp = np.linspace(0, 255, FIXTURE_SIDE, dtype=np.uint8)
        arrays = [
            np.stack([np.roll(ramp, k)[None, :].repeat(FIXTURE_SIDE, 0)] * 3, -1) for k in range(4)
        ]
    return [Image.fromarray(a).resize((FIXTURE_SIDE, FIXTURE_SIDE)) for a in arrays]


def bad_images() -> dict[str, dict[str, Any]]:
    base = sample_images()[0]
    return {
        "undecodable": {"bytes": b"\x89PNG\r\n\x1a\nthis is not an image", "path": None},
        "gray": _png(base.convert("L")),
        "rgba": _png(base.convert("RGBA")),
        "huge": _png(Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), (10, 20, 30))),
    }


def _features(name: str):
    """Hub ``Features`` of a benchmark: one definition, shared with the SynthVQA writers."""
    from recomp_eval.synth.schemas import hub_features

    return hub_features(name)


def _gqa_rows(images):
    rows, image_rows = [], []
    qa = [
        ("Is the cat on the left?", "no"),
        ("What color is the mug?", "white"),
        ("Who is it?", "astronaut"),
    ]
    for i, (q, a) in enumerate(qa):
        image_id = f"n{1000 + i % 2}"
        rows.append(
            {
                "id": f"2010{i:04d}", "imageId": image_id, "question": q, "answer": a,
                "fullAnswer": f"The answer is {a}.", "isBalanced": True,
                "groups": {"global": None, "local": "10c-color"}, "entailed": "", "equivalent": "",
                "types": {"structural": "query", "semantic": "attr", "detailed": "color"},
                "annotations": {"answer": "", "question": "", "fullAnswer": ""},
                "semantic": [{"operation": "select", "argument": "mug", "dependencies": []}],
                "semanticStr": "select: mug",
            }
        )  # fmt: skip
    image_rows = [{"id": f"n{1000 + k}", "image": _png(images[k])} for k in range(2)]
    return rows, image_rows


def _vqav2_rows(images):
    def answers(values):
        return [
            {"answer": v, "answer_confidence": "yes", "answer_id": k + 1}
            for k, v in enumerate(values)
        ]

    spec = [
        ("What is the man holding?", ["umbrella"] * 6 + ["an umbrella"] * 2 + ["stick", "cane"]),
        ("How many cats?", ["2"] * 4 + ["two"] * 4 + ["3", "1"]),
        ("Is it raining?", ["yes"] * 10),
    ]
    return [
        {
            "question_type": "what", "multiple_choice_answer": a[0], "answers": answers(a),
            "image_id": 100 + i, "answer_type": "other", "question_id": 1000 + i, "question": q,
            "image": _png(images[i % len(images)]),
        }
        for i, (q, a) in enumerate(spec)
    ]  # fmt: skip


def _textvqa_rows(images):
    spec = [
        (
            "what is the brand of this camera?",
            ["dakota"] * 8 + ["dakota digital"] * 2,
            ["dakota", "digital"],
        ),
        ("what does the sign say?", ["stop"] * 10, []),
        ("what number is on the shirt?", ["23"] * 7 + ["twenty three"] * 3, ["23", "bulls"]),
    ]
    return [
        {
            "image_id": f"img{i}", "question_id": 34602 + i, "question": q,
            "question_tokens": q.rstrip("?").split(), "image": _png(images[i % len(images)]),
            "image_width": 48, "image_height": 48, "flickr_original_url": "", "flickr_300k_url": "",
            "answers": a, "image_classes": ["Camera"], "set_name": "val", "ocr_tokens": ocr,
        }
        for i, (q, a, ocr) in enumerate(spec)
    ]  # fmt: skip


def _pope_rows(images):
    rows = []
    for c, category in enumerate(("adversarial", "popular", "random")):
        for k, (obj, ans) in enumerate((("dog", "yes"), ("car", "no"))):
            rows.append(
                {
                    "id": str(len(rows)), "question_id": str(k + 1),
                    "question": f"Is there a {obj} in the image?", "answer": ans,
                    "image_source": f"COCO_val2014_{c:03d}{k}", "image": _png(images[(c + k) % len(images)]),
                    "category": category,
                }
            )  # fmt: skip
    return rows


def _mme_rows(images):
    spec = [
        ("existence", "Is there a cat"),
        ("OCR", "Is the word 'stop'"),
        ("code_reasoning", "Does the code print 3"),
    ]
    rows = []
    for i, (category, stem) in enumerate(spec):
        qid = f"{category}/{i:04d}.png"
        for ans, suffix in (("Yes", "in the image?"), ("No", "visible in the picture?")):
            rows.append(
                {
                    "question_id": qid, "image": _png(images[i % len(images)]),
                    "question": f"{stem} {suffix} Please answer yes or no.", "answer": ans,
                    "category": category,
                }
            )  # fmt: skip
    return rows


_BAD_KINDS = ("undecodable", "gray", "rgba", "huge", "empty_question")


def _add_bad(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the first row with a bad image / empty question (ids made unique)."""
    bad = bad_images()
    out = list(rows)
    for k, kind in enumerate(_BAD_KINDS):
        row = dict(rows[0])
        if kind == "empty_question":
            row["question"] = ""
        elif name != "gqa":
            row["image"] = bad[kind]
        key = {"gqa": "id", "vqav2": "question_id", "textvqa": "question_id", "pope": "question_id"}
        if name == "mme":
            row["question_id"] = f"existence/bad{k}.png"
        elif name in ("vqav2", "textvqa"):
            row[key[name]] = 900_000 + k
        else:
            row[key[name]] = f"bad{k}"
        out.append(row)
    return out


_BUILDERS: dict[str, Callable] = {
    "vqav2": _vqav2_rows, "textvqa": _textvqa_rows, "pope": _pope_rows, "mme": _mme_rows,
}  # fmt: skip
SPLITS = {
    "gqa": "testdev",
    "vqav2": "validation",
    "textvqa": "validation",
    "pope": "test",
    "mme": "test",
}
CONFIGS = {"gqa": "testdev_balanced_instructions"}


def _write(rows, features, folder: Path, split: str) -> None:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(
        str(folder / f"{split}-00000-of-00001.parquet")
    )


def write_fixture(name: str, root: str | Path, bad: bool = False) -> Path:
    """Write benchmark ``name`` under ``root/name`` and return that ``data_dir``."""
    data_dir = Path(root) / name
    split = SPLITS[name]
    images = sample_images()
    if name == "gqa":
        rows, image_rows = _gqa_rows(images)
        if bad:
            rows = _add_bad("gqa", rows)
            rows[-2]["imageId"] = "n_missing"  # a question whose image is absent
            image_rows.append({"id": "n_bad", "image": bad_images()["undecodable"]})
            rows[-3]["imageId"] = "n_bad"
        _write(
            image_rows, _features("gqa_images"), data_dir / "testdev_balanced_images" / split, split
        )
    else:
        rows = _BUILDERS[name](images)
        if bad:
            rows = _add_bad(name, rows)
    _write(rows, _features(name), data_dir / CONFIGS.get(name, "default") / split, split)
    manifest = {
        "dataset_id": f"lmms-lab/{name}",
        "revision": "main",
        "resolved_revision": "fixture",
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir
