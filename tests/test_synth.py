"""SynthVQA: questions checked against an independent parser of scenes, and the five synthetic
benchmarks checked against the real loaders, metrics and the fixtures' hub schemas."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.metrics import score
from recomp_eval.metrics.mme import PERCEPTION
from recomp_eval.synth.questions import (
    FAMILIES,
    MME_SUFFIX,
    absent_pairs,
    mme_pairs,
    pair_ranking,
    questions_for_scene,
    yes_no_questions,
)
from recomp_eval.synth.scenes import COLOURS, SHAPES, make_scene
from recomp_eval.synth.schemas import BENCHMARKS, CONFIGS, GQA_IMAGE_CONFIG, SPLITS
from recomp_eval.synth.writers import read_tags, write_all

REPO = Path(__file__).resolve().parents[1]
SEED, OTHER_SEED, N_IMAGES = 1_000_003, 7, 6
N_SCENES = 60  # scenes for the question oracles
MID, BAND, NEAR = 96, 16, 16  # image midline, its no-side band, "next to" distance (px)


# --- an independent oracle over scene objects ---------------------------------------------------


def _matches(objs, words):
    """Objects carrying every attribute word (``object`` is a placeholder noun)."""
    words = [w for w in words.split() if w != "object"]
    return [o for o in objs if all(w in (o.size, o.colour, o.shape) for w in words)]


def _near(a, b) -> bool:
    """Boxes within NEAR px (Chebyshev), via pixel masks rather than interval arithmetic."""
    mask = np.zeros((192 + 2 * NEAR, 192 + 2 * NEAR), bool)
    x0, y0, x1, y1 = b.box
    mask[y0 - 1 : y1 + 2 * NEAR + 1, x0 - 1 : x1 + 2 * NEAR + 1] = True  # b grown by NEAR px
    x0, y0, x1, y1 = a.box
    return bool(mask[y0 + NEAR : y1 + NEAR, x0 + NEAR : x1 + NEAR].any())


def _one(found):
    assert len(found) == 1, f"referent not unique: {found}"
    return found[0]


def _oracle_answer(q, objs) -> str:
    """Parse the question, find its referent (asserting it is unique) and answer it."""
    text = q.question
    if m := re.fullmatch(
        r"What (color|shape) is the small (\w+) (?:object )?next to the large (\w+ \w+)\?", text
    ):
        anchor = _one(_matches(objs, m[3]))
        near = [o for o in _matches(objs, f"small {m[2]}") if _near(o, anchor)]
        obj = _one(near)
        return obj.colour if m[1] == "color" else obj.shape
    if m := re.fullmatch(
        r"What (color|shape) (?:is the shape with|has) the \w+ (\w) on it\?", text
    ):
        obj = _one([o for o in objs if o.char == m[2]])
        return obj.colour if m[1] == "color" else obj.shape
    if m := re.fullmatch(r"What (color|shape) is the (.+)\?", text):
        obj = _one(_matches(objs, m[2]))
        assert m[1] not in ("color",) or obj.colour not in m[2]
        return obj.colour if m[1] == "color" else obj.shape
    if m := re.fullmatch(r"Is the (\w+ \w+) small or large\?", text):
        return _one(_matches(objs, m[1])).size
    if m := re.fullmatch(r"Is the (\w+ \w+) on the left or right side of the image\?", text):
        cx = sum(_one(_matches(objs, m[1])).box[::2]) / 2
        assert abs(cx - MID) > BAND
        return "left" if cx < MID else "right"
    if m := re.fullmatch(r"Is the (\w+ \w+) at the top or bottom of the image\?", text):
        cy = sum(_one(_matches(objs, m[1])).box[1::2]) / 2
        assert abs(cy - MID) > BAND
        return "top" if cy < MID else "bottom"
    if m := re.fullmatch(
        r"Is the (\w+ \w+) (to the left or to the right of|above or below) the (\w+ \w+)\?", text
    ):
        a, b = _one(_matches(objs, m[1])), _one(_matches(objs, m[3]))
        if m[2].startswith("to"):
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0]
            return "left" if a.box[2] <= b.box[0] else "right"
        assert a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        return "above" if a.box[3] <= b.box[1] else "below"
    if m := re.fullmatch(r"What (letter|number) is written on the (.+)\?", text):
        obj = _one(_matches(objs, m[2]))
        assert obj.char.isdigit() == (m[1] == "number")
        return obj.char.lower()
    if m := re.fullmatch(r"How many (\w+)s are there\?", text):
        return str(sum(o.shape == m[1] or o.shape + "e" == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return str(sum(m[1] in (o.colour, o.size) for o in objs))
    if m := re.fullmatch(
        r"Is there a (\w+) (\w+) in (?:the|this) image\?", text.replace(MME_SUFFIX, "")
    ):
        return "yes" if _matches(objs, f"{m[1]} {m[2]}") else "no"
    raise AssertionError(f"unparsed question {text!r}")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(SEED, i) for i in range(N_SCENES)]


def test_open_questions_are_correct_unique_and_tagged(scenes) -> None:
    families, near_small = Counter(), 0
    for i, scene in enumerate(scenes):
        for q in questions_for_scene(scene, np.random.default_rng(i)):
            assert q.answer == _oracle_answer(q, scene.objects), q
            assert q.family in FAMILIES and q.size in ("small", "large", "none")
            assert q.answer not in q.variants and q.answer == q.answer.lower()
            if q.target is not None:
                assert q.size == _one(_matches(scene.objects, q.target)).size
            families[q.family] += 1
            near_small += q.near_large
    assert set(families) == set(FAMILIES)  # every family occurs
    assert near_small / sum(families.values()) > 0.15  # small objects next to large ones


def test_questions_are_deterministic(scenes) -> None:
    a = questions_for_scene(scenes[3], np.random.default_rng(5))
    assert a == questions_for_scene(scenes[3], np.random.default_rng(5))


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_yes_no_balanced_and_negatives_follow_strategy(strategy, scenes) -> None:
    ranking = pair_ranking(scenes)
    for i, scene in enumerate(scenes):
        qs = yes_no_questions(scene, np.random.default_rng(i), strategy, 6, ranking)
        answers = [_oracle_answer(q, scene.objects) for q in qs]
        assert answers == [q.answer for q in qs] and answers.count("yes") == answers.count("no")
        assert len(qs) == 2 * min(3, len(scene.objects))
        assert len({q.question for q in qs}) == len(qs)
        negatives = [tuple(q.question.split()[3:5]) for q in qs if q.answer == "no"]
        absent = absent_pairs(scene)
        if strategy == "popular":
            assert negatives == [p for p in ranking if p in absent][: len(negatives)]
        if strategy == "adversarial":

            def shared(p, objs=scene.objects):
                return sum(o.colour == p[0] or o.shape == p[1] for o in objs)

            rest = [p for p in absent if p not in negatives]
            assert min(map(shared, negatives)) >= max(map(shared, rest), default=0)


def test_pair_ranking_counts_frequencies(scenes) -> None:
    counts = Counter((o.colour, o.shape) for s in scenes for o in s.objects)
    ranking = pair_ranking(scenes)
    assert sorted(ranking) == sorted((c, s) for c in COLOURS for s in SHAPES)
    assert [counts[p] for p in ranking] == sorted((counts[p] for p in ranking), reverse=True)


def test_mme_pairs_one_yes_one_no_per_category(scenes) -> None:
    seen = Counter()
    for i, scene in enumerate(scenes):
        for category, (yes, no) in mme_pairs(scene, np.random.default_rng(i)).items():
            assert category in PERCEPTION
            assert (yes.answer, no.answer) == ("yes", "no") and yes.question != no.question
            assert yes.question.endswith(MME_SUFFIX) and no.question.endswith(MME_SUFFIX)
            if category == "existence":
                assert [_oracle_answer(q, scene.objects) for q in (yes, no)] == ["yes", "no"]
            if category == "count":
                plural, n_yes = re.search(
                    r"number of (\w+) in this image (\d+)", yes.question
                ).groups()
                true = sum(plural in (o.shape + "s", o.shape + "es") for o in scene.objects)
                assert int(n_yes) == true and f"image {true}?" not in no.question
            seen[category] += 1
    assert set(seen) == {"existence", "count", "position", "color", "OCR"}


# --- the written benchmarks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_all(root / "a", SEED, N_IMAGES)
    write_all(root / "b", SEED, N_IMAGES)
    write_all(root / "c", OTHER_SEED, N_IMAGES)
    for name in BENCHMARKS:
        write_fixture(name, root / "fixture")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(written) -> None:
    a, b, c = (_files(written / k) for k in "abc")
    assert a == b and len(a) == 5 * 3 + 1  # parquet + manifest + tags each, GQA images
    assert set(a) == set(c)
    assert all(a[k] != c[k] for k in a if k.endswith("00001.parquet"))


def _main_table(root: Path, name: str, config: str | None = None) -> Path:
    folder = root / name / (config or CONFIGS.get(name, "default")) / SPLITS[name]
    return _one(sorted(folder.glob("*.parquet")))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_schema_equals_fixture(name, written) -> None:
    from datasets import Features

    configs = [None] + ([GQA_IMAGE_CONFIG] if name == "gqa" else [])
    for config in configs:
        ours = pq.read_schema(_main_table(written / "a", name, config))
        theirs = pq.read_schema(_main_table(written / "fixture", name, config))
        assert ours.remove_metadata().equals(theirs.remove_metadata())
        assert Features.from_arrow_schema(ours) == Features.from_arrow_schema(theirs)


def _load(name: str, data_dir: Path):
    """The real benchmark config, composed and instantiated as ``benchmark=<name>`` would be."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs" / "benchmark"), version_base=None):
        cfg = compose(config_name=name, overrides=[f"data_dir={data_dir}"])
    return instantiate(cfg)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_loaders_and_metrics_accept_synth(name, written) -> None:
    data_dir = written / "a" / name
    bench = _load(name, data_dir)
    samples = list(bench)
    report = bench.report()
    assert report["n_skipped"] == 0 and report["n_converted"] == 0
    assert report["source"]["dataset_id"] == f"synthvqa/{name}"
    assert report["source"]["revision"] == f"synthvqa-1-seed{SEED}"
    tags = read_tags(data_dir)
    assert sorted(tags) == sorted(s.sample_id for s in samples)
    for s in samples:
        assert s.image.size == (192, 192)
        assert tags[s.sample_id]["question"] in (s.question, s.question[0].upper() + s.question[1:])
    records = [
        {"sample_id": s.sample_id, "prediction": max(s.answers, key=s.answers.count),
         "answers": s.answers, "meta": s.meta}
        for s in samples
    ]  # fmt: skip
    for protocol in ("llava15", "lmms_eval"):
        out = score(name, records, protocol)
        perfect = {k: v for k, v in out.items() if re.search(r"/(accuracy|f1_mean|f1)_", k)}
        if name == "mme":
            n_categories = len({s.meta["category"] for s in samples})
            perfect = {k: v / (200 * n_categories) for k, v in out.items() if "/perception" in k}
        assert perfect and all(v == pytest.approx(1.0) for v in perfect.values()), out
    if name == "textvqa":
        for s in samples:
            chars = [c for c in s.meta["ocr_tokens"]]
            assert chars and all(len(c) == 1 for c in chars)
            if tags[s.sample_id]["family"] == "ocr":
                assert s.answers[0] in {c.lower() for c in chars}


def test_pope_splits_exactly_balanced(written) -> None:
    samples = list(_load("pope", written / "a" / "pope"))
    by_split = Counter((s.meta["category"], s.answers[0]) for s in samples)
    assert {c for c, _ in by_split} == {"adversarial", "popular", "random"}
    for category in ("adversarial", "popular", "random"):
        assert by_split[(category, "yes")] == by_split[(category, "no")] > 0


def test_mme_pairs_complete(written) -> None:
    samples = list(_load("mme", written / "a" / "mme"))
    per_image = {}
    for s in samples:
        per_image.setdefault(s.meta["image_id"], []).append(s.answers[0])
        assert s.meta["category"] in PERCEPTION
    assert len(per_image) == N_IMAGES
    assert all(sorted(v) == ["No", "Yes"] for v in per_image.values())


def test_make_synth_script(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synth", REPO / "scripts" / "make_synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["mme", "--out", str(tmp_path), "--n-images", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mme"]
    assert len(read_tags(tmp_path / "mme")) == 4
    with pytest.raises(SystemExit):
        module.main(["nope", "--out", str(tmp_path)])


def test_pick_balanced_prefers_unused_and_distinct_families() -> None:
    from recomp_eval.synth.builders import pick_balanced
    from recomp_eval.synth.questions import SynthQuestion

    qs = [SynthQuestion(f"q{i}", "x", fam, "none", None) for i, fam in enumerate("aabbc")]
    used = Counter({"a": 5})
    picked = pick_balanced(qs, 2, used, {"a": 1, "b": 1, "c": 1}, np.random.default_rng(0))
    assert sorted(q.family for q in picked) == ["b", "c"]
    picked = pick_balanced(qs[:2], 2, Counter(), {"a": 1}, np.random.default_rng(0))
    assert len(picked) == 2  # repeats a family only when the scene offers no other


def test_written_gqa_has_small_objects_next_to_large_ones(written) -> None:
    tags = list(read_tags(written / "a" / "gqa").values())
    assert sum(t["size"] == "small" for t in tags) >= len(tags) / 3
    assert any(t["near_large"] for t in tags)
