"""EvalAI submission files for VQAv2 test-dev and TextVQA test.

Both servers take a JSON list of ``{"question_id": int, "answer": str}``. Answers go through the
EvalAI processor first (LLaVA's ``convert_vqav2_for_submission`` and lmms-eval's
``textvqa_process_results`` do the same). The VQAv2 server scores test-dev from a file covering
the whole ``test`` split: pass ``all_question_ids`` to fill questions without a prediction with an
empty answer, as LLaVA does. :func:`write_configured_submission` writes the file that a benchmark
config's ``submission:`` names (``vqav2_testdev.yaml``, ``textvqa_test.yaml``) next to a run's
results.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from recomp_eval.metrics.normalize import evalai_normalize


def _question_id(record: Mapping[str, Any]) -> int:
    meta = record.get("meta") or {}
    qid = meta.get("question_id", record.get("question_id"))
    if qid is None:
        raise KeyError(f"record {record.get('sample_id')!r} has no question_id")
    return int(qid)


def submission_entries(
    records: Iterable[Mapping[str, Any]], all_question_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """``[{"question_id", "answer"}]`` sorted by question id.

    Args:
        records: per-sample records with ``prediction`` and ``meta["question_id"]``.
        all_question_ids: when given, every id gets an entry (missing ones answer ``""``) and
            predictions for ids outside it raise.
    """
    answers: dict[int, str] = {}
    for record in records:
        qid = _question_id(record)
        if qid in answers:
            raise ValueError(f"duplicate prediction for question_id {qid}")
        answers[qid] = evalai_normalize(str(record.get("prediction") or ""))
    if all_question_ids is not None:
        known = {int(q) for q in all_question_ids}
        extra = sorted(set(answers) - known)
        if extra:
            raise ValueError(f"{len(extra)} predictions for unknown question ids, e.g. {extra[:3]}")
        answers = {q: answers.get(q, "") for q in known}
    return [{"question_id": q, "answer": answers[q]} for q in sorted(answers)]


def write_submission(
    path: str | Path,
    records: Iterable[Mapping[str, Any]],
    all_question_ids: Sequence[int] | None = None,
) -> Path:
    """Write an EvalAI JSON submission (VQAv2 test-dev or TextVQA test); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(submission_entries(records, all_question_ids)))
    return path


def write_vqav2_submission(path, records, all_question_ids=None) -> Path:
    """VQAv2 test-dev / test submission (EvalAI challenge format)."""
    return write_submission(path, records, all_question_ids)


def write_textvqa_submission(path, records, all_question_ids=None) -> Path:
    """TextVQA test submission (EvalAI challenge format)."""
    return write_submission(path, records, all_question_ids)


# ``submission:`` of a benchmark config -> its writer ``(path, records, all_question_ids)``.
SUBMISSION_WRITERS: Mapping[str, Callable[..., Path]] = MappingProxyType(
    {"vqav2": write_vqav2_submission, "textvqa": write_textvqa_submission}
)
SUBMISSION_FILE = "submission_{name}.json"  # in the run folder, next to results.json


def write_configured_submission(
    bench_cfg: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    all_question_ids: Sequence[int] | None = None,
) -> Path | None:
    """Write the EvalAI file that the benchmark config's ``submission:`` names, if any.

    Args:
        bench_cfg: the (composed) benchmark config; ``submission`` is ``vqav2``, ``textvqa`` or
            absent/null (nothing is written).
        rows: the run's per-sample rows (``prediction``, ``meta["question_id"]``).
        out_dir: the run folder; the file is ``submission_<name>.json`` there.
        all_question_ids: every question id the server expects (VQAv2: the whole ``test``
            split); ids without a row answer ``""``. None: the rows' questions only.

    Returns:
        The path written, or None when the config names no submission.
    """
    name = bench_cfg.get("submission")
    if name is None:
        return None
    if name not in SUBMISSION_WRITERS:
        close = difflib.get_close_matches(str(name), SUBMISSION_WRITERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(
            f"unknown submission '{name}'{hint} in benchmark '{bench_cfg.get('name')}'; known: "
            f"{', '.join(SUBMISSION_WRITERS)}"
        )
    path = Path(out_dir) / SUBMISSION_FILE.format(name=name)
    return SUBMISSION_WRITERS[name](path, rows, all_question_ids)
