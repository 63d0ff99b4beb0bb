"""The shipped ``synth-llava`` model: offline loading, size, every method, quality gates."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "synth-llava"
MAX_BYTES = 30 * 2**20
GATE_ATTR, GATE_POPE = 150, 150  # the fixed 300-question subset
EVERY_METHOD = ("none", "recomp", "prumerge", "prumerge_plus", "visionzip", "fastervlm", "fastv",
                "random", "pool")  # fmt: skip
QUESTION = "What color is the triangle?"

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def bundle():
    from recomp_eval.models.loader import load_llava

    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_llava(str(MODEL), dtype="float32")


def test_folder_layout_and_size():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    names = {str(p.relative_to(MODEL)) for p in files}
    for required in ("config.json", "model.safetensors", "tokenizer.json",
                     "processor_config.json", "clip/config.json", "clip/model.safetensors"):  # fmt: skip
        assert required in names, required


def test_loads_offline_with_harness_shapes(bundle):
    cfg = bundle.model.config
    vision = cfg.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    ids = bundle.tokenizer("USER: <image>\nWhat color?")["input_ids"]
    assert ids.count(bundle.image_token_id) == 1
    assert bundle.clip_text_id.endswith("clip")
    from recomp_eval.models.loader import load_clip_text

    clip = load_clip_text(bundle.clip_text_id, dtype="float32")
    assert clip.visual_projection.in_features == vision.hidden_size
    emb = clip.model(**clip.tokenizer(["small red triangle"], return_tensors="pt")).text_embeds
    assert emb.shape == (1, clip.visual_projection.out_features)


@pytest.mark.parametrize("name", EVERY_METHOD)
def test_every_method_runs(bundle, name):
    from recomp_eval.benchmarks.prompts import SHORT_ANSWER
    from recomp_eval.methods import build_method
    from recomp_eval.pipeline import generate
    from recomp_eval.synth.scenes import make_scene

    scenes = [make_scene(1_000_003, i) for i in range(2)]
    kwargs = {} if name == "none" else {"retention": 0.1}
    out = generate(
        bundle,
        build_method(name, **kwargs),
        images=[s.image for s in scenes],
        user_texts=[QUESTION + SHORT_ANSWER] * 2,
        questions=[QUESTION] * 2,
        protocol="llava15",
        sample_ids=["a", "b"],
        max_new_tokens=3,
    )
    assert len(out) == 2 and all(isinstance(r.text, str) for r in out)
    assert all(r.kept_tokens <= 576 for r in out)


def test_quality_gates_on_fixed_subset():
    from check_synth_model import ATTRIBUTE_GATE, POPE_F1_GATE, run_gates

    torch.manual_seed(0)
    result = run_gates(str(MODEL), GATE_ATTR, GATE_POPE)
    attr, pope = result["attribute"], result["pope"]
    assert attr["n"] == GATE_ATTR and pope["n"] == GATE_POPE
    assert pope["true_yes_ratio"] == 0.5
    assert attr["accuracy"] >= ATTRIBUTE_GATE, attr
    assert pope["f1"] >= POPE_F1_GATE, pope
    assert abs(pope["yes_ratio"] - 0.5) <= 0.15, pope


@pytest.mark.slow
def test_make_eval_in_a_clean_clone(tmp_path):
    """``make eval`` from a clone of the committed tree (a few questions per benchmark): the
    accuracy table has a row for every run of the demo and a column for every benchmark."""
    import csv
    import subprocess

    import yaml

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = ROOT / ".venv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(  # -o: the shared .venv counts as installed (no reinstall from the clone)
        ["make", "-o", f"{venv}/.installed", "eval", f"VENV={venv}", "DEMO_ROOT=results/check",
         "ARGS=benchmark.limit=4"],
        cwd=clone, check=True, env=env, capture_output=True, timeout=1200,
    )  # fmt: skip
    demo = yaml.safe_load((ROOT / "configs/experiment/synth_demo.yaml").read_text())
    expected = {
        (r["method"] + (f"[{r['options']['variant']}]" if "options" in r else ""),
         str(r.get("retention", "adaptive")))
        for r in demo["runs"]
    }  # fmt: skip
    with open(clone / "results/check/tables/accuracy.csv") as f:  # not the committed demo tables
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["retention"]) for r in rows} == expected
    for bench in ("gqa", "vqav2", "textvqa", "pope", "mme"):
        assert all(r[bench] not in ("", None) for r in rows), bench
