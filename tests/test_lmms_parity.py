"""Cross-check against lmms-eval 0.7.3's own scoring functions on generated cases.

lmms-eval strips every generation before ``process_results``; the oracle calls receive
``pred.strip()`` accordingly. Every intentional difference is asserted explicitly at the end.
Importing lmms-eval takes ~8 s (its package ``__init__``), hence one module for all checks.
"""

from __future__ import annotations

import copy
import random

import pytest

from recomp_eval.metrics import (
    gqa_accuracy,
    mme_scores,
    parse_mme_lmms_eval,
    parse_mme_tool,
    pope_metrics,
    pope_metrics_lmms_eval,
    textvqa_accuracy,
    vqa_accuracy,
)
from recomp_eval.metrics.normalize import evalai_normalize

lmms_metrics = pytest.importorskip("lmms_eval.api.metrics")
vqav2_utils = pytest.importorskip("lmms_eval.tasks.vqav2.utils")
textvqa_utils = pytest.importorskip("lmms_eval.tasks.textvqa.utils")
pope_utils = pytest.importorskip("lmms_eval.tasks.pope.utils")
mme_utils = pytest.importorskip("lmms_eval.tasks.mme.utils")
vqa_eval_metric = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")

N_CASES = 400
# Tokens chosen to hit every normalisation branch: articles, number words, contractions,
# punctuation next to / away from spaces, digit,digit commas, periods around digits, case, \n/\t.
TOKENS = [
    "yes", "Yes", "yes.", "No", "no,", "not", "two", "Two.", "2", "10", "ten", "none", "zero",
    "the", "a", "An", "dog", "dog's", "dogs", "3,000", "1.5", "1.", ".5", "dont", "isnt",
    "can't", "cant", "t-shirt", "red/white", "(left)", "left", "right!", "what?", "U.S.",
    "e-mail", '"quoted"', "a;b", "x=y", "@home", "<b>", "1,2", "\n", "\t", " ", "Im", "yall",
]  # fmt: skip


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 3)))


def _answer_pool(rng: random.Random) -> list[str]:
    return [_phrase(rng) for _ in range(3)]


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, list[str]]]:
    rng = random.Random(1234)
    out = []
    for _ in range(N_CASES):
        pool = _answer_pool(rng)
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice([*pool, _phrase(rng)])
        out.append((pred, answers))
    return out


def test_evalai_processor_parity(cases) -> None:
    oracle = vqa_eval_metric.EvalAIAnswerProcessor()
    for pred, answers in cases:
        for text in [pred, *answers]:
            assert evalai_normalize(text) == oracle(text), repr(text)


def test_vqav2_val_parity(cases) -> None:
    for pred, answers in cases:
        doc = {
            "question_id": 1,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(answers)
            ],
        }
        expected = vqav2_utils.vqav2_process_results_val(doc, [pred.strip()])["exact_match"]
        assert vqa_accuracy(pred, answers) == pytest.approx(expected), (pred, answers)


def test_textvqa_parity(cases) -> None:
    for pred, answers in cases:
        doc = {"question_id": 1, "answers": list(answers)}
        expected = textvqa_utils.textvqa_process_results(doc, [pred.strip()])["exact_match"]
        assert textvqa_accuracy(pred, answers) == pytest.approx(expected), (pred, answers)


def test_gqa_parity(cases) -> None:
    for pred, answers in cases:
        gold = answers[0]
        expected = lmms_metrics.exact_match_hf_evaluate(
            predictions=[pred.strip()], references=[gold], ignore_case=True, ignore_punctuation=True
        )["exact_match"]
        assert gqa_accuracy(pred, gold, variant="lmms_eval") == expected, (pred, gold)


YES_NO_OUTPUTS = [
    "yes", "no", "Yes", "No", "Yes.", "No.", " yes ", "NO", "y", "n", "Yes, there is.",
    "No, there is not.", "There is a dog.", "not sure", "nope", "yes no", "", "Y", "N.", "yess",
]  # fmt: skip


def _yes_no_rows(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    preds = [rng.choice(YES_NO_OUTPUTS) for _ in range(n)]
    labels = [rng.choice(["yes", "no"]) for _ in range(n)]
    return preds, labels


def test_pope_parity() -> None:
    rng = random.Random(7)
    for _ in range(20):
        preds, labels = _yes_no_rows(rng, rng.randint(5, 60))
        results = [
            pope_utils.pope_process_results({"question_id": str(i), "answer": g}, [p.strip()])
            for i, (p, g) in enumerate(zip(preds, labels, strict=True))
        ]
        ours = pope_metrics_lmms_eval(preds, labels)
        acc = [r["pope_accuracy"] for r in results]
        assert ours["accuracy"] == pytest.approx(pope_utils.pope_aggregate_accuracy(acc))
        assert ours["precision"] == pytest.approx(pope_utils.pope_aggregate_precision(acc))
        assert ours["recall"] == pytest.approx(pope_utils.pope_aggregate_recall(acc))
        assert ours["f1"] == pytest.approx(pope_utils.pope_aggregate_f1_score(acc))
        # lmms-eval's yes-ratio counts ground truth: reproduced only under gt_yes_ratio.
        assert ours["gt_yes_ratio"] == pytest.approx(pope_utils.pope_aggregate_yes_ratio(acc))
        predicted_yes = sum(p.strip().lower() == "yes" for p in preds) / len(preds)
        assert ours["yes_ratio"] == pytest.approx(predicted_yes)


def _mme_rows(rng: random.Random) -> list[dict]:
    rows = []
    for category in [
        *mme_utils.eval_type_dict["Perception"],
        *mme_utils.eval_type_dict["Cognition"],
    ]:
        for k in range(rng.randint(1, 4)):
            for answer in ("Yes", "No"):
                rows.append(
                    {
                        "question_id": f"{category}/{k}.png",
                        "image_id": f"{category}/{k}.png",
                        "category": category,
                        "answer": answer,
                        "prediction": rng.choice(YES_NO_OUTPUTS),
                    }
                )
    return rows


def test_mme_parity() -> None:
    rng = random.Random(11)
    for text in YES_NO_OUTPUTS:
        assert parse_mme_lmms_eval(text) == mme_utils.parse_pred_ans(text.strip())
    for _ in range(10):
        rows = _mme_rows(rng)
        by_key: dict[str, list] = {"mme_perception_score": [], "mme_cognition_score": []}
        for row in rows:
            out = mme_utils.mme_process_results(row, [row["prediction"].strip()])
            for key, value in out.items():
                by_key[key].append(value)
        ours = mme_scores(rows, parser="lmms_eval")
        perception = mme_utils.mme_aggregate_results(by_key["mme_perception_score"])
        cognition = mme_utils.mme_aggregate_results(by_key["mme_cognition_score"])
        assert ours["perception"] == pytest.approx(perception)
        assert ours["cognition"] == pytest.approx(cognition)


def test_intentional_differences_are_explicit() -> None:
    """Where LLaVA-1.5 conventions (llava15 protocol) differ from lmms-eval 0.7.3."""
    # GQA: LLaVA strips only trailing periods.
    assert gqa_accuracy("yes!", "yes", variant="llava") == 0.0
    assert gqa_accuracy("yes!", "yes", variant="lmms_eval") == 1.0
    # POPE: LLaVA parses sentences; lmms-eval needs an exact yes/no.
    preds, labels = ["No, there is not.", "Yes, a dog."], ["no", "yes"]
    assert pope_metrics(preds, labels)["accuracy"] == 1.0
    assert pope_metrics_lmms_eval(preds, labels)["accuracy"] == 0.0
    # POPE yes-ratio: predicted share (LLaVA, ours) vs ground-truth share (lmms-eval bug).
    preds, labels = ["yes", "yes", "yes", "yes"], ["yes", "no", "yes", "no"]
    results = [
        pope_utils.pope_process_results({"question_id": str(i), "answer": g}, [p])
        for i, (p, g) in enumerate(zip(preds, labels, strict=True))
    ]
    assert pope_utils.pope_aggregate_yes_ratio([r["pope_yes_ratio"] for r in results]) == 0.5
    assert pope_metrics(preds, labels)["yes_ratio"] == 1.0
    # MME: the MME tool (LLaVA) maps single letters to "other", lmms-eval maps y/n.
    assert (parse_mme_tool("y"), mme_utils.parse_pred_ans("y")) == ("other", "yes")
    # VQAv2: the pre-Aug-2025 lmms-eval shape does not normalise when all answers agree.
    assert vqa_accuracy("Yes", ["yes"] * 10, variant="lmms_eval_legacy") == 0.0
    doc = {"question_id": 1, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]}
    assert vqav2_utils.vqav2_process_results_val(copy.deepcopy(doc), ["Yes"])["exact_match"] == 1.0
