"""The CLIP pairing check: the CLIP checkpoint whose ``visual_projection`` RC uses holds LLaVA's tower."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from recomp_eval.models.llava.loader import (
    PAIRING_RTOL,
    clip_pairing_check,
    load_clip_text,
    load_llava,
    pairing_tensor_names,
)
from recomp_eval.models.llava.tiny import TinySpec, build_tiny

LOGGER = "recomp_eval.models.clip_text"  # the CLIP text tower is shared by the CLIP families


@pytest.fixture(scope="module")
def tiny() -> Path:
    return build_tiny()


@pytest.fixture(scope="module")
def bundle(tiny):
    return load_llava(str(tiny), dtype="float32")


def _last_fc1() -> str:
    return f"encoder.layers.{TinySpec().vision_layers - 1}.mlp.fc1.weight"


@pytest.fixture(scope="module")
def perturbed_clip(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny clip/ folder with the last vision layer's fc1 weight scaled by 1.1."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip") / "clip-perturbed"
    shutil.copytree(tiny / "clip", folder)  # tokenizer files stay
    clip = CLIPModel.from_pretrained(str(tiny / "clip"))
    with torch.no_grad():
        clip.vision_model.encoder.layers[-1].mlp.fc1.weight.mul_(1.1)
    clip.save_pretrained(folder)
    return folder


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
    ]


def test_tiny_clip_folder_holds_llavas_tower(bundle, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clip = load_clip_text(bundle.clip_text_id, "float32", "cpu", llava_model=bundle.model)
    pairing = clip.pairing
    assert pairing["matches"] is True
    assert pairing["max_rel_diff"] == 0.0 and pairing["missing"] == []
    layers = bundle.model.config.vision_config.num_hidden_layers
    assert pairing["checked"] == list(pairing_tensor_names(layers))
    assert {"embeddings.patch_embedding.weight", "pre_layrnorm.weight", _last_fc1()} <= set(
        pairing["checked"]
    )
    assert _warnings(caplog) == []


def test_backwards_compatible_without_llava_model(bundle):
    plain = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    assert plain.pairing is None
    assert load_clip_text(bundle.clip_text_id, "float32", "cpu") is plain  # still cached
    paired = load_clip_text(bundle.clip_text_id, "float32", "cpu", llava_model=bundle.model)
    # the paired result shares the loaded towers and is itself reused for the same LLaVA model
    assert paired.model is plain.model and paired.visual_projection is plain.visual_projection
    assert load_clip_text(bundle.clip_text_id, "float32", "cpu", llava_model=bundle.model) is paired


def test_perturbed_clip_tower_is_a_mismatch_with_one_warning(bundle, perturbed_clip, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = load_clip_text(str(perturbed_clip), "float32", "cpu", llava_model=bundle.model)
        again = load_clip_text(str(perturbed_clip), "float32", "cpu", llava_model=bundle.model)
    assert again is first
    pairing = first.pairing
    assert pairing["matches"] is False
    assert pairing["worst"] == _last_fc1()
    assert pairing["max_rel_diff"] == pytest.approx(0.1, rel=1e-3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    (line,) = warnings
    assert "\n" not in line
    assert str(perturbed_clip) in line and str(bundle.model.config._name_or_path) in line
    assert _last_fc1() in line and "0.1" in line


def test_check_on_modules_and_dtypes(bundle, tiny):
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny / "clip"))
    assert clip_pairing_check(bundle.model, vision)["matches"]
    # up to dtype: a bfloat16 copy of the same weights still matches, with a small difference
    tower = vision.vision_model
    names = pairing_tensor_names(tower.config.num_hidden_layers)
    params = dict(tower.named_parameters())
    bf16 = {name: params[name].detach().to(torch.bfloat16) for name in names}
    result = clip_pairing_check(bundle.model, bf16)
    assert result["matches"] and 0.0 < result["max_rel_diff"] <= PAIRING_RTOL


def test_missing_or_misshapen_tensors_do_not_match(bundle, tiny):
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny / "clip"))
    result = clip_pairing_check(bundle.model, vision, names=["pre_layrnorm.weight", "no.such"])
    assert result["missing"] == ["no.such"] and result["matches"] is False
    params = dict(vision.vision_model.named_parameters())
    shapes = {"pre_layrnorm.weight": params["pre_layrnorm.weight"][:-1]}
    result = clip_pairing_check(bundle.model, shapes, names=list(shapes))
    assert result["max_rel_diff"] == float("inf") and result["matches"] is False
