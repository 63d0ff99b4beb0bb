"""The typed specs are the YAML: they load from ``configs/``, compose like Hydra, read every key,
and a changed YAML value changes what the prompt, scoring, loyalty and headline code do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recomp_eval.benchmarks import Sample, specs
from recomp_eval.benchmarks.prompts import generation_settings, user_prompt
from recomp_eval.benchmarks.specs import (
    benchmark_names,
    benchmark_spec,
    benchmark_spec_from_config,
    load_config,
    protocol_names,
    protocol_spec,
    protocol_spec_from_config,
)
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.metrics import loyalty_metrics, score
from recomp_eval.summary import primary_metric_key

BENCHMARK_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "benchmark").glob("[!_]*.yaml"))


def test_names_come_from_the_config_files() -> None:
    assert protocol_names() == ("llava15", "lmms_eval")
    assert benchmark_names() == ("gqa", "mme", "pope", "textvqa", "vqav2")
    assert benchmark_spec("vqav2_testdev").name == "vqav2"
    assert protocol_spec("llava15") is protocol_spec("llava15")  # cached
    assert benchmark_spec("pope") is benchmark_spec("pope")


@pytest.mark.parametrize("group", ["benchmark", "protocol"])
def test_loader_composes_like_hydra(group: str) -> None:
    names = BENCHMARK_CONFIGS if group == "benchmark" else list(protocol_names())
    with initialize_config_dir(config_dir=str(CONFIG_DIR / group), version_base=None):
        for name in names:
            hydra = OmegaConf.to_container(compose(config_name=name), resolve=True)
            assert load_config(group, name) == hydra, name


@pytest.mark.parametrize("protocol", ["llava15", "lmms_eval"])
@pytest.mark.parametrize("bench", BENCHMARK_CONFIGS)
def test_composed_configs_build_specs(bench: str, protocol: str) -> None:
    """The composed ``protocol`` and ``benchmark`` of a run (what the run key hashes) build the
    same specs as the files."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("eval", overrides=[f"benchmark={bench}", f"protocol={protocol}"])
    proto = OmegaConf.to_container(cfg.protocol, resolve=True)
    bench_cfg = OmegaConf.to_container(cfg.benchmark, resolve=True)
    assert protocol_spec_from_config(proto) == protocol_spec(protocol)
    assert benchmark_spec_from_config(bench_cfg) == benchmark_spec(bench)


def test_every_yaml_key_is_read() -> None:
    """The builders raise on a key that no code reads, so building every file proves that each
    key is read (by the spec builder, or as a constructor argument of the benchmark class)."""
    for name in protocol_names():
        cfg = load_config("protocol", name)
        protocol_spec_from_config(cfg)
        with pytest.raises(ValueError, match=r"keys that no code reads: \['bogus'\]"):
            protocol_spec_from_config({**cfg, "bogus": 1})
        nested = {**cfg, "benchmarks": {**cfg["benchmarks"], "gqa": {**cfg["benchmarks"]["gqa"]}}}
        nested["benchmarks"]["gqa"]["temperature"] = 0.0
        with pytest.raises(ValueError, match=r"benchmarks\.gqa: keys that no code reads"):
            protocol_spec_from_config(nested)
    for name in BENCHMARK_CONFIGS:
        cfg = load_config("benchmark", name)
        benchmark_spec_from_config(cfg)
        with pytest.raises(ValueError, match=r"keys that no code reads: \['bogus'\]"):
            benchmark_spec_from_config({**cfg, "bogus": 1})
    gqa_only = load_config("benchmark", "gqa")["image_config_name"]  # GQABenchmark's argument
    with pytest.raises(ValueError, match="image_config_name"):
        benchmark_spec_from_config(
            {**load_config("benchmark", "pope"), "image_config_name": gqa_only}
        )


def test_specs_validate_their_values() -> None:
    proto = load_config("protocol", "llava15")
    with pytest.raises(ValueError, match="image_mode"):
        protocol_spec_from_config({**proto, "image_mode": "stretch"})
    bad_op = {**proto["benchmarks"]["mme"], "question_ops": ["strip", "lower"]}
    with pytest.raises(ValueError, match="unknown question op 'lower'"):
        protocol_spec_from_config({**proto, "benchmarks": {"mme": bad_op}})
    with pytest.raises(KeyError, match="missing key 'do_sample'"):
        protocol_spec_from_config({k: v for k, v in proto.items() if k != "do_sample"})
    bench = load_config("benchmark", "pope")
    with pytest.raises(ValueError, match="prompt_template"):
        benchmark_spec_from_config({**bench, "prompt_template": "{question}{answer}"})
    with pytest.raises(ValueError, match=r"primary: needs one entry per protocol"):
        benchmark_spec_from_config({**bench, "primary": {"llava15": "f1_mean"}})
    with pytest.raises(KeyError, match="missing key 'primary'"):
        benchmark_spec_from_config({k: v for k, v in bench.items() if k != "primary"})
    with pytest.raises(KeyError, match=r"unknown protocol 'llava' \(did you mean 'llava15'\?\)"):
        generation_settings("gqa", "llava")
    with pytest.raises(KeyError, match="unknown benchmark 'popee'"):
        score("popee", [], "llava15")


def test_primary_from_yaml_picks_the_headline() -> None:
    pope = [
        {"sample_id": str(i), "prediction": p, "answers": [a], "meta": {"category": "random"}}
        for i, (p, a) in enumerate([("Yes.", "yes"), ("No", "no"), ("yes", "no")])
    ]
    assert primary_metric_key(score("pope", pope, "llava15"), "pope", "llava15") == (
        "pope/f1_mean_llava"
    )
    assert primary_metric_key(score("pope", pope, "lmms_eval"), "pope", "lmms_eval") == (
        "pope/f1_lmms_eval"
    )
    # A test split: no metrics, nothing scored; its config's primary names the count.
    testdev = benchmark_spec("vqav2_testdev").scoring
    rows = [{"sample_id": "1", "prediction": "2", "answers": [], "meta": {"question_id": 1}}]
    out = score("vqav2", rows, "llava15", metrics=testdev.metrics_for("llava15"))
    key = primary_metric_key(
        out,
        "vqav2",
        "llava15",
        primary=testdev.primary_for("llava15"),
        metric_names=list(testdev.metrics_for("llava15")),
    )
    assert key == "vqav2/n_unscored" and out[key] == 1.0


@pytest.fixture()
def edited_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of ``configs/`` with changed values, made the configs the specs load from."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR / "protocol", root / "protocol")
    shutil.copytree(CONFIG_DIR / "benchmark", root / "benchmark")

    def edit(group: str, name: str, change) -> None:
        path = root / group / f"{name}.yaml"
        cfg = yaml.safe_load(path.read_text())
        change(cfg)
        path.write_text(yaml.safe_dump(cfg))

    def protocol(cfg: dict) -> None:
        cfg["benchmarks"]["gqa"].update(suffix="\nOne word.", max_new_tokens=7, stop=["\n"])
        cfg["benchmarks"]["gqa"]["question_ops"] = ["strip"]
        cfg["do_sample"] = True

    def gqa(cfg: dict) -> None:
        cfg["prompt_template"] = "Q: {question}{suffix}"

    def pope(cfg: dict) -> None:
        cfg["metrics"]["llava15"] = ["pope_lmms_eval"]
        cfg["answer_pipeline"]["llava15"] = ["strip", "pope_strict"]
        cfg["primary"]["llava15"] = "f1"

    edit("protocol", "llava15", protocol)
    edit("benchmark", "gqa", gqa)
    edit("benchmark", "pope", pope)
    monkeypatch.setattr(specs, "CONFIG_DIR", root)
    return root


POPE_PAIRS = [("Yes.", "yes", "yes"), ("No", "no", "no"), ("There is a dog.", "yes", "no")]


def pope_rows(column: int) -> list[dict]:
    return [
        {
            "sample_id": str(i),
            "prediction": row[column],
            "answers": [row[1]],
            "meta": {"category": "random"},
        }
        for i, row in enumerate(POPE_PAIRS)
    ]


def test_a_yaml_change_changes_prompts_scores_and_loyalty(edited_configs: Path) -> None:
    sample = Sample("x", "gqa", "  Is it red? ", ["yes"], {}, load_image=lambda: None)
    assert user_prompt(sample, "llava15") == "Q: Is it red?\nOne word."
    assert generation_settings("gqa", "llava15") == {
        "max_new_tokens": 7,
        "do_sample": True,
        "stop": ["\n"],
    }
    assert user_prompt(sample, "lmms_eval").startswith("Q:   Is it red? \nAnswer the question")
    out = score("pope", pope_rows(0), "llava15")
    assert "pope/f1_lmms_eval" in out and "pope/f1_mean_llava" not in out
    assert primary_metric_key(out, "pope", "llava15") == "pope/f1_lmms_eval"
    # pope_strict reads "Yes." and "There is a dog." as unparseable: they agree with nothing.
    loyal = loyalty_metrics(pope_rows(0), pope_rows(2), "pope", "llava15", n_boot=10)
    assert loyal["pope/loyalty/agreement"] == pytest.approx(1 / 3)


def test_the_shipped_yaml_gives_the_frozen_behaviour() -> None:
    sample = Sample("x", "gqa", "  Is it red? ", ["yes"], {}, load_image=lambda: None)
    short = "\nAnswer the question using a single word or phrase."
    assert user_prompt(sample, "llava15") == "  Is it red? " + short
    assert generation_settings("gqa", "llava15") == {
        "max_new_tokens": 128,
        "do_sample": False,
        "stop": [],
    }
    out = score("pope", pope_rows(0), "llava15")
    assert primary_metric_key(out, "pope", "llava15") == "pope/f1_mean_llava"
    loyal = loyalty_metrics(pope_rows(0), pope_rows(2), "pope", "llava15", n_boot=10)
    assert loyal["pope/loyalty/agreement"] == pytest.approx(2 / 3)  # LLaVA: "There is" -> yes


def test_callers_can_hand_the_config_values() -> None:
    """The composed config's values win over the files (as the runner hands them)."""
    proto = load_config("protocol", "llava15")
    proto["benchmarks"]["pope"] = {**proto["benchmarks"]["pope"], "suffix": " (yes/no)"}
    sample = Sample("x", "pope", "Is there a dog?", ["yes"], {}, load_image=lambda: None)
    spec = protocol_spec_from_config(proto)
    assert (
        user_prompt(sample, spec, template="[{question}]{suffix}") == "[Is there a dog?] (yes/no)"
    )
    loyal = loyalty_metrics(
        pope_rows(0), pope_rows(2), "pope", "llava15", n_boot=10,
        answer_pipeline=["strip", "pope_strict"], metrics=["pope_lmms_eval"],
    )  # fmt: skip
    assert loyal["pope/loyalty/agreement"] == pytest.approx(1 / 3)


def test_model_side_reads_the_protocol_yaml(monkeypatch) -> None:
    """The llava family renders and pads from the protocol spec, not from its own copies."""
    from dataclasses import replace

    import recomp_eval.benchmarks.specs as specs
    from recomp_eval.models.llava.conversation import render_prompt
    from recomp_eval.models.llava.images import image_mode, pad_colour

    real = specs.protocol_spec
    system = real("llava15").system_prompt
    assert render_prompt("llava15", "Q?", None) == f"{system} USER: <image>\nQ? ASSISTANT:"
    assert image_mode("llava15") == "pad" and image_mode("lmms_eval") == "crop"
    assert pad_colour("llava15", None) == (122, 116, 104)
    changed = replace(real("llava15"), system_prompt="Be brief.", pad_color=(1, 2, 3),
                      image_mode="crop")  # fmt: skip
    monkeypatch.setattr(specs, "protocol_spec", lambda name, *a: changed)
    assert render_prompt("llava15", "Q?", None) == "Be brief. USER: <image>\nQ? ASSISTANT:"
    assert pad_colour("llava15", None) == (1, 2, 3) and image_mode("llava15") == "crop"
