"""The shipped ``synth-llava`` model: offline loading, size, every method, quality gates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import scripts_module

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "synth-llava"
MAX_BYTES = 30 * 2**20
GATE_ATTR, GATE_POPE = 150, 150  # the fixed 300-question subset
EVERY_METHOD = ("none", "recomp", "prumerge", "prumerge_plus", "visionzip", "fastervlm", "fastv",
                "random", "pool")  # fmt: skip
QUESTION = "What color is the triangle?"


@pytest.fixture(scope="module")
def bundle():
    from recomp_eval.models.llava.loader import load_llava

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
    from recomp_eval.models.llava.loader import load_clip_text

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


@pytest.mark.slow  # ~25 s on 2 cores; the shipped model only changes with scripts/train_tiny.py
def test_quality_gates_on_fixed_subset():
    gates = scripts_module("check_synth_model")
    ATTRIBUTE_GATE, POPE_F1_GATE, run_gates = (
        gates.ATTRIBUTE_GATE,
        gates.POPE_F1_GATE,
        gates.run_gates,
    )

    torch.manual_seed(0)
    result = run_gates(str(MODEL), GATE_ATTR, GATE_POPE)
    attr, pope = result["attribute"], result["pope"]
    assert attr["n"] == GATE_ATTR and pope["n"] == GATE_POPE
    assert pope["true_yes_ratio"] == 0.5
    assert attr["accuracy"] >= ATTRIBUTE_GATE, attr
    assert pope["f1"] >= POPE_F1_GATE, pope
    assert abs(pope["yes_ratio"] - 0.5) <= 0.15, pope


@pytest.mark.slow
def test_readme_demo_matches_a_fresh_make_eval(tmp_path):
    """``make eval`` from a clone of the committed tree, exactly as a new user runs it: the tree
    stays clean, the accuracy table has every run of the demo and every benchmark, and the
    README's demo tables and ``docs/demo/`` equal what it wrote (``make demo-docs`` updates them).
    """
    import csv
    import subprocess

    from hydra import compose, initialize_config_dir

    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.runs import expand_runs

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = ROOT / ".venv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    made = subprocess.run(  # -o: the shared .venv counts as installed (no reinstall from the clone)
        ["make", "-o", f"{venv}/.installed", "eval", f"VENV={venv}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert status == "", f"make eval changed tracked files:\n{status}"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        demo = compose(config_name="eval", overrides=["experiment=synth_demo"])
    expected = {(s.label, "adaptive" if s.retention is None else f"{s.retention:g}")
                for s in expand_runs(demo)}  # fmt: skip
    with open(clone / "results/demo/tables/accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["retention"]) for r in rows} == expected
    for bench in ("GQA", "VQAv2", "TextVQA", "POPE", "MME"):
        column = next(c for c in rows[0] if c.startswith(bench))
        assert all(r[column] for r in rows), bench
    check = subprocess.run(
        [str(venv / "bin/python"), "scripts/update_demo_docs.py", "--check"],
        cwd=clone, capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, (
        f"README/docs/demo differ from a fresh make eval (run `make eval && make demo-docs`):\n"
        f"{check.stderr}"
    )
