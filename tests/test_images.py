"""The pinned image-processor class: same class and same pixels whatever the checkpoint or machine."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, CLIPImageProcessorPil

from recomp_eval.benchmarks.specs import protocol_names
from recomp_eval.models.llava.images import (
    PINNED_IMAGE_PROCESSOR,
    check_pinnable,
    image_processor_family,
    preprocess_images,
)
from recomp_eval.models.llava.loader import load_image_processor, load_llava
from recomp_eval.models.llava.tiny import build_tiny

# Byte copy of llava-hf/llava-1.5-7b-hf's preprocessor_config.json (= shared/checkpoints' file).
REAL = Path(__file__).parent / "data" / "checkpoints" / "llava-1.5-7b-hf"
PROTOCOLS = protocol_names()
SIZES = ((640, 480), (480, 640), (336, 336), (90, 120), (1000, 250))  # (width, height)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return build_tiny()


@pytest.fixture(scope="module")
def bundle(tiny):
    return load_llava(str(tiny), dtype="float32")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in SIZES]


def _with_image_processor_type(src: Path, dst: Path, type_name: str, **extra) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` with its image-processor config edited (of the
    real layout only the JSON files: it has no weights anyway)."""
    shutil.copytree(src, dst, ignore=None if src != REAL else shutil.ignore_patterns("tokenizer*"))
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = dst / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        cfg = data.get("image_processor", data) if name == "processor_config.json" else data
        if "image_processor_type" in cfg:
            cfg["image_processor_type"] = type_name
            cfg.update(extra)
        file.write_text(json.dumps(data, indent=1))
    return dst


def _pixels(images, processor) -> dict[str, torch.Tensor]:
    return {p: preprocess_images(images, processor, p) for p in PROTOCOLS}  # p -> [B,3,S,S]


def _assert_same_pixels(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for protocol in PROTOCOLS:
        assert torch.equal(a[protocol], b[protocol]), protocol


def test_load_llava_pins_the_pil_class(bundle):
    assert PINNED_IMAGE_PROCESSOR == "CLIPImageProcessorPil"
    assert bundle.image_processor_class == PINNED_IMAGE_PROCESSOR
    assert type(bundle.processor.image_processor) is CLIPImageProcessorPil
    assert bundle.image_processor.backend == "pil"
    # what AutoProcessor chose here, before pinning (this machine has no torchvision)
    assert bundle.auto_image_processor_class in ("CLIPImageProcessor", "CLIPImageProcessorPil")
    # the tokenizer the processor renders prompts with is untouched (no ``backend=`` passed)
    assert bundle.processor.tokenizer.backend == "tokenizers"


def test_pixels_unchanged_versus_the_auto_path(tiny, bundle, images):
    """Both protocols: the pinned processor gives today's pixels (tiny and the real config).

    Today's path is ``AutoProcessor``'s pick on a machine without torchvision, i.e. the PIL
    backend; ``backend="pil"`` asks for it explicitly so the test means the same beside torchvision.
    """
    auto_tiny = AutoImageProcessor.from_pretrained(str(tiny), backend="pil")
    if importlib.util.find_spec("torchvision") is None:
        assert type(AutoProcessor.from_pretrained(str(tiny)).image_processor) is type(auto_tiny)
    _assert_same_pixels(_pixels(images, bundle.image_processor), _pixels(images, auto_tiny))
    pinned_real = load_image_processor(str(REAL))
    assert type(pinned_real) is CLIPImageProcessorPil
    auto_real = AutoImageProcessor.from_pretrained(str(REAL), backend="pil")
    _assert_same_pixels(_pixels(images, pinned_real), _pixels(images, auto_real))


def _llava15_reference(image: Image.Image, ip) -> torch.Tensor:
    """LLaVA-1.5's recipe by hand: expand2square (mean colour), PIL bicubic resize, centre crop,
    CLIP normalisation. Returns [3,S,S]."""
    side = max(image.size)
    background = tuple(int(x * 255) for x in ip.image_mean)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    size = ip.crop_size["height"]
    arr = np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    mean, std = np.asarray(ip.image_mean, np.float32), np.asarray(ip.image_std, np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1))  # [H,W,3] -> [3,H,W]


def test_real_config_pixels_follow_llavas_pil_recipe(images):
    ip = load_image_processor(str(REAL))
    assert ip.crop_size == {"height": 336, "width": 336} and ip.resample == 3
    got = preprocess_images(images, ip, "llava15")  # [B,3,336,336]
    for i, image in enumerate(images):
        torch.testing.assert_close(got[i], _llava15_reference(image, ip), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "type_name",
    [
        "CLIPImageProcessor",
        "CLIPImageProcessorFast",
        "CLIPImageProcessorPil",
        "LlavaImageProcessor",
    ],
)
def test_pinned_class_whatever_the_config_names(tmp_path, images, type_name):
    folder = _with_image_processor_type(REAL, tmp_path / "ckpt", type_name)
    ip = load_image_processor(str(folder))
    assert type(ip).__name__ == PINNED_IMAGE_PROCESSOR
    _assert_same_pixels(_pixels(images, ip), _pixels(images, load_image_processor(str(REAL))))


def test_load_llava_pins_a_checkpoint_saved_with_another_class(tiny, bundle, tmp_path, images):
    folder = _with_image_processor_type(tiny, tmp_path / "tiny", "LlavaImageProcessor")
    other = load_llava(str(folder), dtype="float32")
    # AutoProcessor's pick: LlavaImageProcessorPil here, LlavaImageProcessor beside torchvision
    assert image_processor_family(other.auto_image_processor_class) == "LlavaImageProcessor"
    assert other.image_processor_class == PINNED_IMAGE_PROCESSOR
    _assert_same_pixels(
        _pixels(images, other.image_processor), _pixels(images, bundle.image_processor)
    )


def test_load_llava_overrides_a_torchvision_choice(tiny, bundle, monkeypatch, images):
    """As on a machine with torchvision: AutoProcessor hands back another class (here a stand-in
    named like the torchvision one, resizing differently); the bundle still has the pinned one."""

    class CLIPImageProcessor(CLIPImageProcessorPil):  # the name of the TorchvisionBackend class
        pass

    original = transformers.AutoProcessor.from_pretrained

    def from_pretrained(path, **kwargs):
        processor = original(path, **kwargs)
        settings = processor.image_processor.to_dict()
        processor.image_processor = CLIPImageProcessor(**{**settings, "resample": 0})  # NEAREST
        return processor

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", from_pretrained)
    loaded = load_llava(str(tiny), dtype="float32")
    monkeypatch.undo()
    stand_in = CLIPImageProcessor(**{**bundle.image_processor.to_dict(), "resample": 0})
    assert not torch.equal(
        *(preprocess_images(images, p, "lmms_eval") for p in (stand_in, bundle.image_processor))
    )
    assert loaded.auto_image_processor_class == "CLIPImageProcessor"
    assert loaded.image_processor_class == PINNED_IMAGE_PROCESSOR
    _assert_same_pixels(
        _pixels(images, loaded.image_processor), _pixels(images, bundle.image_processor)
    )


def test_non_clip_processors_are_refused(tmp_path):
    siglip = _with_image_processor_type(REAL, tmp_path / "siglip", "SiglipImageProcessor")
    with pytest.raises(ValueError, match=r"SiglipImageProcessor.*not CLIP-style"):
        load_image_processor(str(siglip))
    padded = _with_image_processor_type(REAL, tmp_path / "pad", "LlavaImageProcessor", do_pad=True)
    with pytest.raises(ValueError, match="do_pad"):
        load_image_processor(str(padded))
    check_pinnable({"image_processor_type": "LlavaImageProcessorFast", "do_pad": False}, "x")
    check_pinnable({"feature_extractor_type": "CLIPFeatureExtractor"}, "x")
    check_pinnable({}, "x")  # no type: AutoProcessor would take the model type's (llava) default


def test_image_processor_family():
    assert image_processor_family("CLIPImageProcessorPil") == "CLIPImageProcessor"
    assert image_processor_family("CLIPImageProcessorFast") == "CLIPImageProcessor"
    assert image_processor_family("CLIPImageProcessor") == "CLIPImageProcessor"
