"""Loader, tiny fixture, prompt rendering and image preprocessing (offline)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval.benchmarks.specs import protocol_spec
from recomp_eval.models.llava.conversation import render_prompt
from recomp_eval.models.llava.images import expand_to_square, mean_colour, preprocess_images
from recomp_eval.models.llava.loader import (
    BadCheckpointError,
    ModelUnavailableError,
    check_checkpoint_folder,
    load_clip_text,
    load_llava,
)
from recomp_eval.models.llava.tiny import TinySpec, build_tiny


@pytest.fixture(scope="module")
def folder():
    return build_tiny()


@pytest.fixture(scope="module")
def bundle(folder):
    return load_llava(str(folder), dtype="float32")


def test_tiny_cached_build_is_fast_and_loads_like_a_checkpoint(folder, bundle):
    start = time.perf_counter()
    assert build_tiny() == folder
    assert time.perf_counter() - start < 1.0
    cfg = bundle.model.config
    assert type(bundle.model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.text_config._attn_implementation == "sdpa"
    assert bundle.tokenizer.padding_side == "left"
    assert bundle.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    side = TinySpec().image_size // TinySpec().patch_size
    assert cfg.image_seq_length == side * side
    assert bundle.clip_text_id == str(folder / "clip")


def test_dtype_and_attn_options(folder):
    b = load_llava(str(folder), dtype="bfloat16", attn_implementation="eager")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert b.model.config.text_config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        load_llava(str(folder), dtype="float8")


def test_missing_hub_id_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        load_llava("recomp-eval-test/does-not-exist-7b-hf")
    msg = str(info.value)
    assert "\n" not in msg
    assert "recomp-eval-test/does-not-exist-7b-hf" in msg and "local folder" in msg
    assert info.value.__cause__ is None


def test_missing_local_folder_and_clip(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_llava(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError, match="clip-missing"):
        load_clip_text("recomp-eval-test/clip-missing", "float32", "cpu")


def test_clip_text_loaded_once(bundle):
    a = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    assert load_clip_text(bundle.clip_text_id, torch.float32, torch.device("cpu")) is a
    assert a.visual_projection.bias is None
    assert a.visual_projection.in_features == bundle.model.config.vision_config.hidden_size


def _copy(folder: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _one_line_error(path: Path, *needles: str, load=load_llava) -> str:
    """``load(path)`` raises one line naming ``needles`` and no hub download advice."""
    with pytest.raises(ModelUnavailableError) as info:
        load(str(path), dtype="float32")
    msg = str(info.value)
    assert "\n" not in msg
    assert "huggingface-cli download" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize(
    "keep", [0.5, 0.999, 100, 4], ids=["half", "last-bytes", "inside-header", "no-length"]
)
def test_truncated_safetensors_is_one_line_error(folder, tmp_path, keep):
    ckpt = _copy(folder, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    msg = _one_line_error(ckpt, str(weights), "truncated", "re-download it (partial download?)")
    with pytest.raises(BadCheckpointError, match="truncated"):
        check_checkpoint_folder(ckpt)
    assert "re-download" in msg


def test_corrupt_safetensors_header_and_trailing_bytes(folder, tmp_path):
    ckpt = _copy(folder, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0" * 16)
    _one_line_error(ckpt, str(weights), "corrupt", "16 past its tensor data", "re-download it")
    weights.write_bytes(data[:8] + b"{bad" + data[12:])
    _one_line_error(ckpt, str(weights), "corrupt", "header is not valid")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_invalid_json_is_one_line_error(folder, tmp_path, name):
    ckpt = _copy(folder, tmp_path)
    (ckpt / name).write_text("{bad json")
    _one_line_error(ckpt, f"invalid JSON in {ckpt / name}", "line 1 column 2", "re-download")
    (ckpt / name).write_text("")
    _one_line_error(ckpt, str(ckpt / name), "empty file")


def test_folder_without_config_is_not_a_checkpoint(folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, f"not a checkpoint folder: no config.json in {empty}", "model.id")
    # one level too high: the checkpoint is a sub-folder
    _copy(folder, tmp_path / "parent", "llava")
    _one_line_error(tmp_path / "parent", "no config.json", "folder that holds config.json")
    # the same check guards the CLIP text tower, naming its own setting
    clip = _copy(folder / "clip", tmp_path, "clip")
    (clip / "config.json").unlink()
    _one_line_error(clip, str(clip), "model.clip_text_id", load=load_clip_text)


def test_folder_without_weights_is_one_line_error(folder, tmp_path):
    ckpt = _copy(folder, tmp_path)
    (ckpt / "model.safetensors").unlink()
    _one_line_error(ckpt, f"no weight files in {ckpt}", "re-download")


def _shard(ckpt: Path, parts: int = 2) -> list[str]:
    """Split ``model.safetensors`` into ``parts`` shards with a ``model.safetensors.index.json``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for i, name in enumerate(names):
        chunk = {k: tensors[k] for k in keys[i::parts]}
        save_file(chunk, ckpt / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


def test_sharded_index_with_missing_shard_is_one_line_error(folder, tmp_path):
    ckpt = _copy(folder, tmp_path)
    names = _shard(ckpt)
    check_checkpoint_folder(ckpt)
    intact = load_llava(str(ckpt), dtype="float32")
    assert sum(p.numel() for p in intact.model.parameters()) > 0
    (ckpt / names[1]).unlink()
    _one_line_error(
        ckpt,
        str(ckpt / "model.safetensors.index.json"),
        f"1 shard(s) missing from {ckpt}: {names[1]}",
        "re-download them (partial download?)",
    )


def test_nested_relative_path_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _one_line_error(Path("models/not-there/llava"), "does not exist")
    assert "models/not-there/llava" in msg


def test_load_errors_past_the_checks_are_one_line(folder, tmp_path, monkeypatch):
    """What the up-front checks miss is still one line, without hub advice, for local folders."""
    import recomp_eval.models.checkpoint_checks as checks

    monkeypatch.setattr(checks, "check_checkpoint_folder", lambda *a, **k: None)
    ckpt = _copy(folder, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(ckpt, f"could not load the checkpoint in {ckpt}", "SafetensorError")


def test_intact_folder_is_accepted(folder):
    check_checkpoint_folder(folder)
    check_checkpoint_folder(folder / "clip", setting="model.clip_text_id")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_prints_no_shard_or_load_reports(folder, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    ckpt = _copy(folder, tmp_path)  # a new path: load_clip_text's per-process cache misses
    names = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    levels = {name: logging.getLogger(name).level for name in names}
    bars = hf_logging.is_progress_bar_enabled()
    records = _Records()  # transformers' root logger does not propagate: listen on it directly
    logging.getLogger("transformers").addHandler(records)
    try:
        bundle = load_llava(str(ckpt), dtype="float32")
        load_clip_text(bundle.clip_text_id, "float32", "cpu")
    finally:
        logging.getLogger("transformers").removeHandler(records)
    out = capsys.readouterr()
    text = "\n".join([out.out, out.err, *records.messages])
    for noise in ("were not sharded", "TP rules were not applied", "LOAD REPORT"):
        assert noise not in text
    # scoped: levels and the progress-bar switch are back as they were
    assert {name: logging.getLogger(name).level for name in names} == levels
    assert hf_logging.is_progress_bar_enabled() == bars


def test_prompts(bundle):
    p = render_prompt("llava15", "What is it?", bundle.tokenizer, bundle.processor)
    system = protocol_spec("llava15").system_prompt
    assert p == f"{system} USER: <image>\nWhat is it? ASSISTANT:"
    q = render_prompt("lmms_eval", "What is it?", bundle.tokenizer, bundle.processor)
    assert q == "USER: <image>\nWhat is it? ASSISTANT:"
    ids = bundle.tokenizer(q)["input_ids"]
    assert ids[0] == bundle.tokenizer.bos_token_id and ids.count(bundle.image_token_id) == 1
    with pytest.raises(ValueError, match="unknown protocol"):
        render_prompt("nope", "x", bundle.tokenizer)


def _reference_pad_resize(image: Image.Image, proc) -> torch.Tensor:
    """LLaVA-1.5 reference: square canvas in the mean colour, bicubic resize, normalise."""
    w, h = image.size
    side = max(w, h)
    fill = tuple(int(m * 255) for m in proc.image_mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    size = proc.crop_size["height"]
    arr = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(proc.image_mean, np.float32)) / np.array(proc.image_std, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def test_pad_to_square_matches_reference(bundle):
    rng = np.random.default_rng(4)
    proc = bundle.image_processor
    images = [
        Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8))
        for s in [(60, 150, 3), (200, 90, 3), (112, 112, 3)]
    ]
    got = preprocess_images(images, proc, "llava15")
    ref = torch.stack([_reference_pad_resize(im, proc) for im in images])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    crop = preprocess_images(images, proc, "lmms_eval")
    direct = proc(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(crop, direct)
    assert not torch.allclose(crop[0], got[0])  # non-square: crop and pad differ
    assert torch.allclose(crop[2], got[2])  # square: identical


def test_expand_to_square_centres():
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = expand_to_square(im, (1, 2, 3))
    assert sq.size == (4, 4)
    arr = np.asarray(sq)
    assert (arr[0, 0] == (1, 2, 3)).all() and (arr[1, 0] == (255, 0, 0)).all()
    assert (arr[3, 3] == (1, 2, 3)).all()


def test_mean_colour_truncates():
    class P:
        image_mean = (0.48145466, 0.4578275, 0.40821073)

    assert mean_colour(P()) == (122, 116, 104)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_a_checkpoint_that_does_not_fill_the_model_is_one_line_error(folder, tmp_path, change):
    """A tensor missing from the weights (it would stay random) or one the model has no place
    for: one line naming the count and an example, before any result is computed."""
    from safetensors.torch import load_file, save_file

    from recomp_eval.models.checkpoint_checks import BadCheckpointError

    bad = tmp_path / "ckpt"
    shutil.copytree(folder, bad)
    weights = bad / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(k for k in state if "multi_modal_projector" in k)[0]
    if change == "drop":
        del state[name]
    else:
        state["multi_modal_projector.extra.weight"] = torch.zeros(2, 2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(BadCheckpointError) as err:
        load_llava(str(bad), dtype="float32")
    text = str(err.value)
    assert "\n" not in text and ("missing keys: 1" in text or "unexpected keys: 1" in text)
