"""Metric tests on hand-written edge cases and hand-computed aggregates.

Parity with lmms-eval 0.7.3's own functions on generated cases is in ``test_lmms_parity.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from recomp_eval.metrics import (
    METRICS,
    NORMALIZERS,
    apply_pipeline,
    evalai_normalize,
    gqa_accuracy,
    loyalty_metrics,
    mme_scores,
    paired_bootstrap_ci,
    parse_mme_lmms_eval,
    parse_mme_tool,
    parse_pope_llava,
    parse_pope_strict,
    pope_metrics,
    pope_metrics_by_split,
    pope_metrics_lmms_eval,
    score,
    submission_entries,
    textvqa_accuracy,
    vqa_accuracy,
    write_configured_submission,
    write_vqav2_submission,
)
from recomp_eval.metrics.normalize import vqa_normalize
from recomp_eval.metrics.registry import MetricSpec, Registry, register_metric
from recomp_eval.metrics.scoring import builtin_metrics, register_builtin_metrics


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),
        ("The dog", "dog"),
        ("3,000", "3000"),
        ("dont", "don't"),
        ("Yes.", "yes"),
        ("", ""),
        ("an apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("1.5", "1.5"),
        ("hello, world!", "hello world"),
        ("U.S.A.", "usa"),
        ("isnt it", "isn't it"),
        ("red/white", "red white"),  # no space next to "/": replaced by a space
        ("red / white", "red white"),  # space next to "/": deleted, spaces collapse on re-join
        ("What?", "what"),
        ("dog's bone", "dog 's bone"),  # m4c word_tokenize splits 's
        ("  A  Cat \n", "cat"),
    ],
)
def test_evalai_normalize_edge_cases(raw: str, expected: str) -> None:
    assert evalai_normalize(raw) == expected


def test_evalai_period_count_quirk() -> None:
    """re.UNICODE (32) passed as count: only the first 32 periods go."""
    assert evalai_normalize("x" + "." * 40) == "x" + "." * 8


def test_vqa_normalize_skips_word_tokenize() -> None:
    """lmms-eval's vqav2 path does not run word_tokenize: 's stays attached, ? becomes a space."""
    assert vqa_normalize("dog's") == "dog's"
    assert evalai_normalize("dog's") == "dog 's"


def _soft(pred: str, answers: list[str]) -> float:
    """Independent oracle: mean over annotators of min(1, matches among the other nine / 3)."""
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        accs.append(min(1.0, sum(o == pred for o in others) / 3))
    return float(np.mean(accs))


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("2", ["2"] * 3 + ["3"] * 7, 0.9),  # exactly 3 matches
        ("2", ["2"] * 4 + ["3"] * 6, 1.0),
        ("two", ["2"] * 2 + ["3"] * 8, 0.6),  # number word -> digit; 2 matches
        ("The cat.", ["cat"] * 1 + ["dog"] * 9, 0.3),
        ("", ["yes"] * 10, 0.0),
    ],
)
def test_vqa_accuracy_hand(pred: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)
    assert _soft(evalai_normalize(pred), [evalai_normalize(a) for a in answers]) == pytest.approx(
        expected
    )


def test_vqa_variants_differ_where_documented() -> None:
    # All ten answers agree: the legacy variant compares the raw prediction.
    assert vqa_accuracy("Yes", ["yes"] * 10, variant="lmms_eval_073") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, variant="lmms_eval_legacy") == 0.0
    # Answers disagree: both normalise.
    answers = ["yes"] * 9 + ["no"]
    assert vqa_accuracy("Yes", answers, variant="lmms_eval_legacy") == vqa_accuracy("Yes", answers)
    with pytest.raises(ValueError, match="unknown VQA variant"):
        vqa_accuracy("a", ["a"], variant="nope")  # type: ignore[arg-type]


def test_textvqa_accuracy() -> None:
    answers = ["dakota"] * 8 + ["dakota digital"] * 2
    assert textvqa_accuracy("Dakota.", answers) == 1.0
    assert textvqa_accuracy("dakota digital", answers) == pytest.approx(
        _soft("dakota digital", answers)
    )
    assert textvqa_accuracy("", answers) == 0.0


@pytest.mark.parametrize(
    ("pred", "gold", "lmms", "llava"),
    [
        ("Yes", "yes", 1.0, 1.0),
        ("yes.", "yes", 1.0, 1.0),
        ("Yes!", "yes", 1.0, 0.0),  # lmms-eval drops all punctuation, LLaVA only trailing periods
        ("t-shirt", "t-shirt", 1.0, 1.0),
        (" left ", "left", 1.0, 1.0),
        ("the left", "left", 0.0, 0.0),  # no article removal in GQA
        ("", "no", 0.0, 0.0),
    ],
)
def test_gqa_accuracy(pred: str, gold: str, lmms: float, llava: float) -> None:
    assert gqa_accuracy(pred, gold, variant="lmms_eval") == lmms
    assert gqa_accuracy(pred, gold, variant="llava") == llava


@pytest.mark.parametrize(
    ("text", "llava", "strict"),
    [
        ("Yes.", "yes", None),
        ("yes", "yes", "yes"),
        (" No ", "no", "no"),  # LLaVA splits on single spaces: ["", "No", ""]
        ("No, there is not.", "no", None),
        ("There is no dog in the image.", "no", None),
        ("Yes. No.", "yes", None),  # first sentence only
        ("NO", "yes", "no"),  # LLaVA's word test is case-sensitive; strict lower-cases
        ("Not", "yes", None),
        ("", "yes", None),
        ("yes, but not clearly", "no", None),
    ],
)
def test_pope_parsers(text: str, llava: str, strict: str | None) -> None:
    assert parse_pope_llava(text) == llava
    assert parse_pope_strict(text) == strict


def test_pope_metrics_hand_computed() -> None:
    preds = ["Yes.", "No", "yes", "Yes", "No, there is not.", "no"]
    labels = ["yes", "yes", "no", "yes", "no", "no"]
    # parsed: yes no yes yes no no -> TP=2 FN=1 FP=1 TN=2
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["unparseable_rate"] == 0.0
    # lmms-eval: "Yes." and "No, there is not." are unparseable -> out of P/R, wrong in accuracy.
    s = pope_metrics_lmms_eval(preds, labels)
    # strict: None no yes yes None no -> TP=1 FP=1 FN=1 TN=1
    assert s["accuracy"] == pytest.approx(2 / 6)
    assert s["precision"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["unparseable_rate"] == pytest.approx(2 / 6)
    assert s["yes_ratio"] == pytest.approx(2 / 6)  # predicted yes share (our fix)
    assert s["gt_yes_ratio"] == pytest.approx(3 / 6)  # lmms-eval's pope_yes_ratio


def test_pope_by_split_mean_f1() -> None:
    preds = ["yes", "no", "yes", "yes"]
    labels = ["yes", "no", "no", "yes"]
    splits = ["adversarial", "adversarial", "random", "random"]
    out = pope_metrics_by_split(preds, labels, splits)
    assert out["adversarial/f1"] == 1.0
    # random: TP=1 FP=1 -> P=1/2 R=1 F1=2/3
    assert out["random/f1"] == pytest.approx(2 / 3)
    assert out["f1_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="yes/no"):
        pope_metrics(["yes"], ["maybe"])


@pytest.mark.parametrize(
    ("text", "lmms", "tool"),
    [
        ("Yes", "yes", "yes"),
        ("No.", "no", "no"),
        ("y", "yes", "other"),
        ("n", "no", "other"),
        ("Yes, it is.", "yes", "yes"),
        ("The answer is yes", "other", "other"),
        ("nope", "no", "no"),
        ("", "other", "other"),
        ("  yes", "yes", "other"),  # the tool does not strip: "  ye" holds neither yes nor no
    ],
)
def test_mme_parsers(text: str, lmms: str, tool: str) -> None:
    assert parse_mme_lmms_eval(text) == lmms
    assert parse_mme_tool(text) == tool


def test_mme_scores_hand_computed() -> None:
    rows = [
        # existence: image a both right, image b one right -> acc (100+50)/2=75, acc+ (100+0)/2=50
        {"category": "existence", "image_id": "a", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image_id": "a", "prediction": "No", "answer": "No"},
        {"category": "existence", "image_id": "b", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image_id": "b", "prediction": "Yes", "answer": "No"},
        # code_reasoning: one image both wrong -> 0
        {"category": "code_reasoning", "image_id": "c", "prediction": "No", "answer": "Yes"},
        {"category": "code_reasoning", "image_id": "c", "prediction": "maybe", "answer": "No"},
    ]
    out = mme_scores(rows)
    assert out["existence/acc"] == 75.0
    assert out["existence/acc_plus"] == 50.0
    assert out["existence"] == 125.0
    assert out["perception"] == 125.0
    assert out["cognition"] == 0.0
    assert out["other_rate"] == pytest.approx(1 / 6)
    assert out["unpaired_images"] == 0.0
    with pytest.raises(ValueError, match="unknown MME category"):
        mme_scores([{"category": "x", "image_id": "a", "prediction": "y", "answer": "Yes"}])


def _records(preds, answers, meta=None):
    return [
        {"sample_id": str(i), "prediction": p, "answers": a, "meta": dict(meta or {})}
        for i, (p, a) in enumerate(zip(preds, answers, strict=True))
    ]


def test_score_keys_name_variants() -> None:
    recs = _records(["Yes!", "no"], [["yes"], ["no"]])
    assert score("gqa", recs, "lmms_eval")["gqa/accuracy_lmms_eval"] == 1.0
    assert score("gqa", recs, "llava15")["gqa/accuracy_llava"] == 0.5
    vqa = score("vqav2", _records(["2"], [["two"] * 10]), "llava15")
    assert vqa["vqav2/accuracy_lmms_eval_073"] == 1.0
    test_split = score("vqav2", _records(["2"], [[]]), "lmms_eval")
    assert test_split == {"vqav2/n_scored": 0.0, "vqav2/n_unscored": 1.0}
    pope = _records(["Yes.", "No"], [["yes"], ["no"]], {"category": "random"})
    assert score("pope", pope, "llava15")["pope/f1_mean_llava"] == 1.0
    assert score("pope", pope, "lmms_eval")["pope/accuracy_lmms_eval"] == 0.5
    with pytest.raises(KeyError, match="did you mean 'pope_llava'"):
        score("pope", pope, "llava15", metrics=["pope_lava"])
    with pytest.raises(KeyError, match="unknown protocol"):
        score("pope", pope, "llava")


def test_registry_metadata_and_pipelines() -> None:
    for name in METRICS:
        spec = METRICS.get(name)
        assert spec.variant and spec.description and spec.higher_is_better
    assert apply_pipeline(" Yes. ", ["strip", "pope_llava"]) == "yes"
    assert apply_pipeline("Two dogs!", ["evalai"]) == "2 dogs"
    with pytest.raises(KeyError, match="already registered"):
        NORMALIZERS.register("strip", str.strip)


def test_loyalty_binary_hand_computed() -> None:
    answers = [["yes"], ["no"], ["yes"], ["no"]]
    ref = _records(
        ["yes", "no", "no", "yes"], answers, {"category": "random"}
    )  # right right wrong wrong
    cmp_ = _records(
        ["Yes.", "yes", "yes", "yes"], answers, {"category": "random"}
    )  # right wrong right wrong
    out = loyalty_metrics(cmp_, ref, "pope", "llava15", n_boot=200)
    assert out["pope/loyalty/agreement"] == pytest.approx(2 / 4)  # "Yes." agrees with "yes"
    assert out["pope/loyalty/correct_to_wrong"] == pytest.approx(1 / 4)
    assert out["pope/loyalty/wrong_to_correct"] == pytest.approx(1 / 4)
    assert out["pope/loyalty/accuracy_diff"] == 0.0
    assert out["pope/loyalty/accuracy_diff_low"] <= 0.0 <= out["pope/loyalty/accuracy_diff_high"]
    assert out["pope/loyalty/n_paired"] == 4.0


def test_loyalty_soft_scores_and_unpaired() -> None:
    answers = [["2"] * 3 + ["3"] * 7, ["cat"] * 10]
    ref = _records(["2", "dog"], answers)
    extra = {"sample_id": "extra", "prediction": "x", "answers": ["x"]}
    cmp_ = [*_records(["3", "cat"], answers), extra]
    out = loyalty_metrics(cmp_, ref, "vqav2", "lmms_eval", n_boot=100)
    s_ref = np.array([0.9, 0.0])
    s_cmp = np.array([vqa_accuracy("3", answers[0]), 1.0])
    diff = s_cmp - s_ref
    assert out["vqav2/loyalty/accuracy_diff"] == pytest.approx(diff.mean())
    c2w, w2c = out["vqav2/loyalty/correct_to_wrong"], out["vqav2/loyalty/wrong_to_correct"]
    assert w2c - c2w == pytest.approx(diff.mean())
    assert out["vqav2/loyalty/n_unpaired"] == 1.0


def test_paired_bootstrap_ci_is_deterministic_and_covers_mean() -> None:
    rng = np.random.default_rng(1)
    diffs = rng.choice([-1.0, 0.0, 1.0], size=500, p=[0.2, 0.5, 0.3])
    low, high = paired_bootstrap_ci(diffs, n_boot=500, seed=3)
    assert (low, high) == paired_bootstrap_ci(diffs, n_boot=500, seed=3)
    assert low < diffs.mean() < high
    # Normal approximation as an independent check of the width (loose tolerance).
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(diffs.size)
    assert (high - low) == pytest.approx(2 * half, rel=0.2)
    assert paired_bootstrap_ci(np.zeros(0)) == (0.0, 0.0)


def test_submission_entries_and_file(tmp_path) -> None:
    recs = [
        {"sample_id": "b", "prediction": "Two dogs.", "meta": {"question_id": 7}},
        {"sample_id": "a", "prediction": "Yes", "meta": {"question_id": 3}},
    ]
    assert submission_entries(recs) == [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 7, "answer": "2 dogs"},
    ]
    path = write_vqav2_submission(tmp_path / "sub" / "vqav2.json", recs, all_question_ids=[3, 5, 7])
    assert json.loads(path.read_text()) == [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 5, "answer": ""},
        {"question_id": 7, "answer": "2 dogs"},
    ]
    with pytest.raises(ValueError, match="unknown question ids"):
        submission_entries(recs, all_question_ids=[3])
    with pytest.raises(ValueError, match="duplicate"):
        submission_entries(recs + recs)


def test_metrics_are_registered_on_first_use_not_at_import() -> None:
    import subprocess
    import sys

    code = (
        "import recomp_eval.metrics as m, recomp_eval.metrics.bootstrap\n"
        "import recomp_eval.benchmarks.prompts, recomp_eval.report.tables\n"
        "assert not m.METRICS.loaded and not m.NORMALIZERS.loaded\n"
        "assert m.METRICS.get('pope_llava').variant == 'llava' and m.METRICS.loaded\n"
        "assert not m.NORMALIZERS.loaded and 'strip' in m.NORMALIZERS\n"
        "print(len(m.METRICS))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(builtin_metrics()) == 8


def test_explicit_registration_into_a_registry() -> None:
    registry: Registry[MetricSpec] = Registry("metric", register_builtin_metrics)
    assert not registry.loaded
    assert "gqa_exact_match_llava" in registry and registry.loaded
    assert list(registry) == sorted(spec.name for spec in builtin_metrics())
    extra = MetricSpec("my_metric", lambda rs: {"accuracy": 1.0}, "mine", lambda p, r: 1.0)
    register_metric(extra, registry)
    assert registry.get("my_metric") is extra
    with pytest.raises(KeyError, match="already registered"):  # built-ins first, then collide
        register_metric(builtin_metrics()[0], Registry("metric", register_builtin_metrics))
    manual: Registry[MetricSpec] = Registry("metric")
    register_builtin_metrics(manual)
    assert list(manual) == sorted(spec.name for spec in builtin_metrics())


def runner_rows(split: str) -> list[dict]:
    """Per-sample rows as the runner writes them (samples.jsonl), for a test split."""
    return [
        {
            "sample_id": str(qid),
            "question": "How many?",
            "answers": [],
            "meta": {"split": split, "question_id": qid, "image_id": 9},
            "prediction": prediction,
            "kept_tokens": 576,
            "text_tokens": 12,
            "new_tokens": 2,
            "timings_ms": {"prefill": 1.0},
            "batch_size": 2,
            "warmup": False,
            "keep_map": None,
            "prompt": None,
        }
        for qid, prediction in ((11, "Two."), (4, "Yes"))
    ]


@pytest.mark.parametrize(
    ("config", "name"), [("vqav2_testdev", "vqav2"), ("textvqa_test", "textvqa")]
)
def test_write_configured_submission(config: str, name: str, tmp_path) -> None:
    from recomp_eval.benchmarks.specs import load_config

    bench_cfg = load_config("benchmark", config)
    assert bench_cfg["submission"] == name
    path = write_configured_submission(bench_cfg, runner_rows(bench_cfg["split"]), tmp_path)
    assert path == tmp_path / f"submission_{name}.json"
    assert json.loads(path.read_text()) == [
        {"question_id": 4, "answer": "yes"},
        {"question_id": 11, "answer": "2"},
    ]
    full = write_configured_submission(bench_cfg, runner_rows("test"), tmp_path, [4, 5, 11])
    assert [e["question_id"] for e in json.loads(full.read_text())] == [4, 5, 11]


def test_configured_submission_absent_or_unknown(tmp_path) -> None:
    from recomp_eval.benchmarks.specs import load_config

    assert write_configured_submission(load_config("benchmark", "gqa"), [], tmp_path) is None
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyError, match=r"unknown submission 'vqa2' \(did you mean 'vqav2'\?\)"):
        write_configured_submission({"name": "vqav2", "submission": "vqa2"}, [], tmp_path)
