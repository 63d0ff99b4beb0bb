"""The same generate path on CUDA (fp16, tiny model); skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval.methods import build_method
from recomp_eval.models.llava.tiny import load_tiny
from recomp_eval.pipeline import generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("none", {}), ("fastervlm", {"retention": 0.25}), ("recomp", {}), ("fastv", {})],
)
def test_generate_on_cuda(name, kwargs):
    bundle = load_tiny(dtype="float16", device="cuda")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(2)]
    qs = ["What is in the image?", "Is there a dog?"]
    res = generate(bundle, build_method(name, **kwargs), images, qs, qs, "llava15", ["a", "b"], 4)
    cpu = generate(
        load_tiny(dtype="float32"),
        build_method(name, **kwargs),
        images,
        qs,
        qs,
        "llava15",
        ["a", "b"],
        4,
    )
    for r, c in zip(res, cpu):
        assert len(r.new_token_ids) > 0
        assert r.timings["vision"] > 0 and r.timings["prefill"] > 0
        if name in ("none", "fastv"):
            assert r.kept_tokens == c.kept_tokens
    assert torch.cuda.memory_allocated() > 0
