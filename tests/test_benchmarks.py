"""Loaders on hub-schema parquet fixtures (same code path as prefetched data), bad records, limit,
offline errors, prompts per protocol, and the typed specs against the YAML they load from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from recomp_eval.benchmarks import BENCHMARK_CLASSES, DatasetUnavailableError, Sample
from recomp_eval.benchmarks.fixtures import CONFIGS, HUGE_LIMIT, SPLITS, write_fixture
from recomp_eval.benchmarks.prompts import generation_settings, render_prompt, user_prompt
from recomp_eval.benchmarks.specs import (
    BenchmarkPrompt,
    benchmark_names,
    benchmark_spec,
    protocol_names,
    protocol_spec,
)
from recomp_eval.metrics import METRICS, NORMALIZERS, SUBMISSION_WRITERS, score

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
GOOD_ROWS = {"gqa": 3, "vqav2": 3, "textvqa": 3, "pope": 6, "mme": 6}
SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    for name in SPLITS:
        write_fixture(name, root / "clean")
        write_fixture(name, root / "bad", bad=True)
    return root


def make(name: str, data_dir: Path, **kwargs):
    return BENCHMARK_CLASSES[name](
        dataset_id=f"lmms-lab/{name}",
        split=SPLITS[name],
        config_name=CONFIGS.get(name),
        data_dir=str(data_dir / name),
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_loader_reads_fixture(name: str, data_root: Path) -> None:
    bench = make(name, data_root / "clean")
    samples = list(bench)
    assert len(samples) == len(bench) == GOOD_ROWS[name]
    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == len(ids)
    for s in samples:
        assert isinstance(s, Sample) and s.benchmark == name
        assert isinstance(s.image, Image.Image) and s.image.mode == "RGB"
        assert s.question and s.answers and all(isinstance(a, str) for a in s.answers)
        assert s.meta["split"] == SPLITS[name]
    report = bench.report()
    assert report["n_skipped"] == 0 and report["n_converted"] == 0
    assert report["source"]["resolved_revision"] == "fixture"  # from manifest.json
    assert report["source"]["num_rows"] >= GOOD_ROWS[name]


def test_sample_fields_per_benchmark(data_root: Path) -> None:
    clean = data_root / "clean"
    vqa = next(iter(make("vqav2", clean)))
    assert vqa.question == "What is the man holding?" and len(vqa.answers) == 10
    assert vqa.meta["question_id"] == 1000 and vqa.sample_id == "1000"
    text = next(iter(make("textvqa", clean)))
    assert text.meta["ocr_tokens"] == ["dakota", "digital"]
    pope = list(make("pope", clean))
    assert {s.meta["category"] for s in pope} == {"adversarial", "popular", "random"}
    mme = list(make("mme", clean))
    assert mme[0].sample_id == "existence/0000.png#0" and mme[1].sample_id == "existence/0000.png#1"
    assert mme[0].meta["image_id"] == mme[1].meta["image_id"]
    assert mme[0].question.endswith("Please answer yes or no.")  # raw question, no suffix
    gqa = list(make("gqa", clean))
    assert gqa[0].meta["image_id"] == "n1000" and gqa[0].answers == ["no"]


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_bad_records_are_skipped_and_counted(name: str, data_root: Path) -> None:
    bench = make(name, data_root / "bad", max_image_pixels=HUGE_LIMIT)
    samples = list(bench)  # never raises
    report = bench.report()
    reasons = sorted(b["reason"] for b in report["skipped"])
    if name == "gqa":  # images live in another config: one undecodable, one missing
        assert reasons == ["empty_question", "missing_image", "undecodable_image"]
        assert len(samples) == GOOD_ROWS[name] + 2
    else:
        assert reasons == ["empty_question", "huge_image", "undecodable_image"]
        assert sorted(report["converted"].values()) == ["L->RGB", "RGBA->RGB"]
        assert len(samples) == GOOD_ROWS[name] + 2  # gray and RGBA converted, kept
        assert all(s.image.mode == "RGB" for s in samples)
    skipped_ids = {b["sample_id"] for b in report["skipped"]}
    assert skipped_ids.isdisjoint(s.sample_id for s in samples)


def test_images_decode_lazily(data_root: Path) -> None:
    bench = make("vqav2", data_root / "bad", check_images=False)
    samples = list(bench)
    assert len(samples) == 7  # only the empty question is screened without decoding
    assert all(s._image is None for s in samples)
    assert samples[0].image.size == (48, 48) and samples[0]._image is not None


def test_limit_is_deterministic(data_root: Path) -> None:
    clean = data_root / "clean"
    first = [s.sample_id for s in make("pope", clean, limit=2)]
    assert first == ["adversarial/1", "adversarial/2"]
    seeded = [s.sample_id for s in make("pope", clean, limit=3, limit_seed=5)]
    assert seeded == [s.sample_id for s in make("pope", clean, limit=3, limit_seed=5)]
    assert len(seeded) == 3 and seeded != first
    order = [s.sample_id for s in make("pope", clean)]
    assert seeded == sorted(seeded, key=order.index)  # dataset order kept
    mme = [s.sample_id for s in make("mme", clean, limit=3)]  # whole images only
    assert mme == ["existence/0000.png#0", "existence/0000.png#1"]
    with pytest.raises(ValueError, match="limit"):
        make("pope", clean, limit=0)


def test_filters_select_pope_splits(data_root: Path) -> None:
    bench = make("pope", data_root / "clean", filters={"category": ["random"]})
    assert {s.meta["category"] for s in bench} == {"random"} and len(bench) == 2
    with pytest.raises(KeyError, match="filter column"):
        len(make("pope", data_root / "clean", filters={"nope": [1]}))


def test_offline_hub_error_is_one_line() -> None:
    bench = BENCHMARK_CLASSES["gqa"](
        dataset_id="lmms-lab/GQA",
        alt_dataset_id="lmms-lab-encoder/GQA",
        split="testdev",
        config_name="testdev_balanced_instructions",
        revision="abc123",
    )
    with pytest.raises(DatasetUnavailableError) as info:
        len(bench)
    message = str(info.value)
    assert "\n" not in message
    for part in (
        "lmms-lab/GQA",
        "abc123",
        "lmms-lab-encoder/GQA",
        "scripts/prefetch.py gqa",
        "data_dir",
    ):
        assert part in message
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is None


def test_missing_data_dir_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetUnavailableError, match=r"no parquet files .*prefetch\.py mme"
    ) as info:
        len(make("mme", tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "question", "meta", "llava15", "lmms_eval"),
    [
        ("gqa", "Is the cat left?", {}, "Is the cat left?" + SHORT, "Is the cat left?" + SHORT),
        ("vqav2", "What is it? ", {}, "What is it? " + SHORT, "What is it? " + SHORT),
        (
            "textvqa",
            "what does the SIGN say?",
            {"ocr_tokens": ["stop", "AHEAD"]},
            "what does the SIGN say?\nReference OCR token: stop, AHEAD" + SHORT,
            "What does the sign say?" + SHORT,
        ),
        (
            "textvqa",
            "what is it?",
            {"ocr_tokens": []},
            "what is it?" + SHORT,
            "What is it?" + SHORT,
        ),
        ("pope", " Is there a dog? ", {}, " Is there a dog? " + SHORT, "Is there a dog?" + SHORT),
        (
            "mme",
            "Is there a cat? Please answer yes or no.",
            {},
            "Is there a cat?" + SHORT,
            "Is there a cat?" + SHORT,
        ),
    ],
)
def test_user_prompts(name, question, meta, llava15, lmms_eval) -> None:
    assert render_prompt(name, question, "llava15", meta) == llava15
    assert render_prompt(name, question, "lmms_eval", meta) == lmms_eval
    sample = Sample("x", name, question, ["a"], dict(meta), load_image=lambda: None)
    assert user_prompt(sample, "llava15") == llava15
    assert "<image>" not in llava15 and "USER" not in llava15


def test_generation_settings() -> None:
    assert generation_settings("textvqa", "llava15") == {
        "max_new_tokens": 128,
        "do_sample": False,
        "stop": [],
    }
    assert generation_settings("gqa", "lmms_eval")["max_new_tokens"] == 16
    assert generation_settings("pope", "lmms_eval")["max_new_tokens"] == 128
    # lmms-eval's default llava_hf wrapper ignores the task's `until`: no stop strings at all
    for bench in ("gqa", "vqav2", "textvqa", "pope", "mme"):
        assert generation_settings(bench, "lmms_eval")["stop"] == []
    assert generation_settings("textvqa", "lmms_eval")["max_new_tokens"] == 1024
    with pytest.raises(KeyError, match="unknown protocol"):
        generation_settings("gqa", "llava")


def raw_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())


@pytest.mark.parametrize("protocol", protocol_names())
def test_protocol_spec_loads_from_yaml(protocol: str) -> None:
    raw = raw_yaml("protocol", protocol)
    spec = protocol_spec(protocol)
    assert (spec.name, spec.conversation, spec.system_prompt, spec.image_mode, spec.do_sample) == (
        raw["name"],
        raw["conversation"],
        raw["system_prompt"],
        raw["image_mode"],
        raw["do_sample"],
    )
    assert spec.pad_color == (None if raw["pad_color"] is None else tuple(raw["pad_color"]))
    assert set(spec.benchmarks) == set(raw["benchmarks"]) == set(benchmark_names())
    for bench, got in raw["benchmarks"].items():
        assert spec.benchmarks[bench] == BenchmarkPrompt(
            suffix=got["suffix"],
            question_ops=tuple(got["question_ops"]),
            ocr=got["ocr"],
            max_new_tokens=got["max_new_tokens"],
            stop=tuple(got["stop"]),
        )
        assert generation_settings(bench, protocol) == {
            "max_new_tokens": got["max_new_tokens"],
            "do_sample": raw["do_sample"],
            "stop": got["stop"],
        }


@pytest.mark.parametrize(
    "config", sorted(p.stem for p in (CONFIG_DIR / "benchmark").glob("[!_]*.yaml"))
)
def test_benchmark_spec_loads_from_yaml(config: str) -> None:
    raw = raw_yaml("benchmark", config)
    spec = benchmark_spec(config)
    assert raw["_target_"].endswith(BENCHMARK_CLASSES[spec.name].__name__)
    assert (spec.name, spec.prompt_template, spec.version) == (
        raw["name"],
        raw["prompt_template"],
        raw["version"],
    )
    assert raw["revision"] == "main"
    assert spec.submission == raw.get("submission")
    assert spec.submission is None or spec.submission in SUBMISSION_WRITERS
    for protocol in protocol_names():
        assert spec.scoring.metrics_for(protocol) == tuple(raw["metrics"][protocol])
        assert spec.scoring.pipeline_for(protocol) == tuple(raw["answer_pipeline"][protocol])
        assert spec.scoring.primary_for(protocol) == raw["primary"][protocol]
        assert all(m in METRICS for m in spec.scoring.metrics_for(protocol))
        assert all(step in NORMALIZERS for step in spec.scoring.pipeline_for(protocol))


def test_hydra_composes_and_instantiates(data_root: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIG_DIR / "benchmark"), version_base=None):
        cfg = compose(
            config_name="pope", overrides=[f"data_dir={data_root / 'clean' / 'pope'}", "limit=4"]
        )
    assert cfg.split == "test" and cfg.check_images is True  # from _base.yaml
    bench = instantiate(cfg)
    assert [s.sample_id for s in bench] == [
        "adversarial/1",
        "adversarial/2",
        "popular/1",
        "popular/2",
    ]


@pytest.mark.parametrize("name", sorted(SPLITS))
@pytest.mark.parametrize("protocol", protocol_names())
def test_end_to_end_gold_predictions_score_perfectly(name, protocol, data_root: Path) -> None:
    samples = list(make(name, data_root / "clean"))
    majority = {s.sample_id: max(set(s.answers), key=s.answers.count) for s in samples}
    records = [
        {
            "sample_id": s.sample_id,
            "prediction": majority[s.sample_id],
            "answers": s.answers,
            "meta": s.meta,
        }
        for s in samples
    ]
    out = score(name, records, protocol)
    headline = {
        "gqa": "accuracy", "vqav2": "accuracy", "textvqa": "accuracy", "pope": "accuracy", "mme": "perception",
    }[name]  # fmt: skip
    key = next(k for k in out if k.split("/")[-1].startswith(headline))
    best = {"mme": 200.0 * 2}.get(name, 1.0)  # MME fixture: existence + OCR perception images
    assert out[key] == pytest.approx(best)


def test_prefetch_reads_benchmark_configs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prefetch", REPO / "scripts" / "prefetch.py")
    prefetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prefetch)
    gqa = prefetch.read_benchmark_config("gqa")
    assert gqa["image_config_name"] == "testdev_balanced_images" and gqa["data_dir"] is None
    assert prefetch.read_benchmark_config("vqav2")["split"] == "validation"
    with pytest.raises(SystemExit, match="unknown benchmark"):
        prefetch.read_benchmark_config("vqa")
