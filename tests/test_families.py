"""Model families plug in through the registry and the bundle; the pipeline knows none of them.

A fake second family is registered here: it reuses the tiny LLaVA weights but renders its own
prompt and supplies fewer signals (like a CLS-free tower), and the unchanged pipeline, runner
and evaluation drive it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recomp_eval import models
from recomp_eval.benchmarks.fixtures import sample_images, write_fixture
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import evaluate
from recomp_eval.methods import build_method
from recomp_eval.models.base import ModelAdapter, check_signals
from recomp_eval.models.llava.adapter import LlavaAdapter
from recomp_eval.pipeline import generate

PACKAGE = Path(__file__).resolve().parents[1] / "recomp_eval"


class FakeAdapter(LlavaAdapter):
    """A second family: its own prompt format, no CLS attention, no keys, no text signal."""

    family = "fake"
    supported_signals = frozenset({"features", "seeds"})

    def load(self, model_id, dtype, device, attn_implementation, clip_text_id):
        bundle = super().load(model_id, dtype, device, attn_implementation, clip_text_id)
        bundle.adapter = self  # what the family's own loader would set
        return bundle

    def render_prompt(self, bundle, protocol, user_text):
        return f"IMG {bundle.image_token} Q: {user_text} A:"

    def template_source(self, bundle, protocol):
        return "fake:built-in"


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "fake", f"{__name__}:FakeAdapter")
    return models.get_adapter("fake")


def test_adapters_implement_the_interface(fake_family) -> None:
    assert isinstance(models.get_adapter("llava"), ModelAdapter)
    assert isinstance(fake_family, ModelAdapter) and fake_family.family == "fake"


def test_unknown_family_has_a_did_you_mean() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'lava' \(did you mean 'llava'\?\)"):
        models.get_adapter("lava")


def test_pipeline_drives_a_registered_family(fake_family) -> None:
    bundle = models.load_model({"family": "fake", "id": "tiny", "dtype": "float32"})
    assert type(bundle.adapter) is type(fake_family)
    images, texts = sample_images()[:2], ["What is it?", "Is it red?"]
    res = generate(bundle, build_method("random", retention=0.25), images, texts, texts,
                   "llava15", ["a", "b"], max_new_tokens=3)  # fmt: skip
    assert [r.prompt for r in res] == [f"IMG <image> Q: {t} A:" for t in texts]
    assert [r.kept_tokens for r in res] == [16.0, 16.0]


def test_a_method_needing_an_unsupported_signal_is_one_line(fake_family) -> None:
    check_signals(build_method("random"), fake_family)  # features + seeds: fine
    with pytest.raises(ValueError) as err:
        check_signals(build_method("fastervlm"), fake_family)
    text = str(err.value)
    assert "\n" not in text
    assert "method 'fastervlm' needs cls_attn, which the fake family cannot supply" in text
    working = text.split("methods that work with fake: ")[1].split(", ")
    assert {"none", "random", "pool", "fastv"} <= set(working) and "recomp" not in working


def test_evaluation_runs_a_family_from_the_config(fake_family, tmp_path: Path) -> None:
    data = write_fixture("pope", tmp_path / "data")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "model.family=fake", "benchmark=pope", f"benchmark.data_dir={data}",
            f"paths.root={tmp_path / 'out'}", "runner.max_new_tokens=2", "method=pool",
        ])  # fmt: skip
        bad = compose(config_name="eval", overrides=[
            "model.family=fake", "benchmark=pope", f"benchmark.data_dir={data}",
            f"paths.root={tmp_path / 'out'}", "method=visionzip",
        ])  # fmt: skip
    (record,) = evaluate(cfg)
    assert record.protocol_details["family"] == "fake"
    assert record.protocol_details["template_source"] == "fake:built-in"
    assert record.samples["first_prompt"].startswith("IMG <image> Q: ")
    with pytest.raises(
        ValueError, match="needs cls_attn, cls_feature, keys, which the fake family"
    ):
        evaluate(bad)


def test_nothing_outside_a_family_package_imports_it() -> None:
    """The pipeline, runner, evaluation and reports reach families through the registry."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("models/llava/"):
            continue
        for line in path.read_text().splitlines():
            if re.search(r"^\s*(from|import)\s+recomp_eval\.models\.llava\b", line):
                offenders.append(f"{rel}: {line.strip()}")
    assert offenders == []
