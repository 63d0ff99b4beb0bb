"""One batch through the real pipeline on the tiny LLaVA fixture (for a method's end-to-end
check: its signals captured by the adapter, its tokens reaching the LLM)."""

from __future__ import annotations

from typing import Any


def kept_on_tiny(
    method: Any, colours: tuple[str, ...] = ("red", "blue")
) -> tuple[list[float], int]:
    """Kept visual tokens per sample of a 2-image batch, and the model's patch count N."""
    from PIL import Image

    from recomp_eval.evaluate import load_model
    from recomp_eval.pipeline import generate

    bundle = load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})
    images = [Image.new("RGB", (64, 64), c) for c in colours]
    texts = [f"What is {c}?" for c in colours]
    results = generate(bundle, method, images, texts, texts, "llava15",
                       [f"s{i}" for i in range(len(images))], max_new_tokens=2)  # fmt: skip
    return [r.kept_tokens for r in results], bundle.adapter.shapes(bundle).patches
