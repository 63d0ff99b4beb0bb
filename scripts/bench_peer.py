"""lmms-eval's own ``llava_hf`` (batch 1, its only option) against our plugin at batch 1/8/16/32.

The same checkpoint, the same lmms-eval task YAML (POPE over local SynthVQA parquet by default)
and the same samples; ``method=none`` so both evaluate the uncompressed model. Reports
samples/s of each ``simple_evaluate`` call (models loaded beforehand) and whether the
predictions are identical to lmms-eval's own. Writes ``<out>/peer.json`` and ``<out>/peer.md``.

The shared benchmark method (``recomp_eval.efficiency.benchmark``) with whole evaluations as
cases: every model is loaded once, then ``--rounds`` rounds each evaluate every case in a
freshly shuffled order; min / median / p90 of the seconds per case, ratios from medians of the
same run. Two sanity checks: lmms-eval's ``llava_hf`` is timed as two cases (``llava_hf`` and
``llava_hf_repeat``) whose medians must agree within ``--tolerance``, and every evaluation of
ours must give lmms-eval's predictions.

    python scripts/bench_peer.py                                  # CPU: synth-llava, 256 questions
    python scripts/bench_peer.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 \\
        --data /data --limit 1000 --batch-sizes 1 8 16 32          # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


from recomp_eval.efficiency.benchmark import (  # noqa: E402 - the shared method and record
    agreement,
    machine_info,
    sanity_line,
    summarize,
    time_interleaved,
)

REFERENCE = "llava_hf"


def run(model, tasks_dir: Path, task: str, limit: int, batch: int) -> dict:
    """Predictions by doc id and the seconds of lmms-eval's evaluation (model already loaded)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    # lmms-eval's clean() after an evaluation deletes the model's modules; keep them for the
    # next evaluation of the same loaded model (an instance attribute, removed afterwards)
    model.clean = lambda: None
    try:
        started = time.perf_counter()
        result = simple_evaluate(model=model, tasks=[task], limit=limit, batch_size=batch,
                                 log_samples=True, bootstrap_iters=0, task_manager=manager)  # fmt: skip
        seconds = time.perf_counter() - started
    finally:
        del model.clean
    answers = {s["doc_id"]: s["filtered_resps"][0] for s in result["samples"][task]}
    return {"answers": answers, "seconds": seconds}


def summarize_cases(extra: dict[str, list[dict]], batches: dict[str, int],
                    tolerance: float) -> dict:  # fmt: skip
    """Rows per case (seconds min / median / p90, samples/s and speed-up from medians,
    predictions identical to the reference's in every evaluation) and the sanity verdict of
    the reference timed as two cases."""
    reference = extra[REFERENCE][0]["answers"]
    base = None
    rows = []
    for label, runs in extra.items():
        if label == f"{REFERENCE}_repeat":
            continue
        n = len(runs[0]["answers"])
        seconds = summarize([r["seconds"] for r in runs])
        same = min(sum(r["answers"][k] == reference.get(k) for k in r["answers"]) for r in runs)
        row = {"harness": "lmms-eval llava_hf" if label == REFERENCE else "recomp_llava (ours)",
               "case": label, "batch": batches[label], "samples": n, "evaluations": len(runs),
               "seconds": seconds, "samples_per_s": n / seconds["median"],
               "identical": same == n == len(reference), "identical_count": same}  # fmt: skip
        base = base or row["samples_per_s"]  # the reference comes first
        row["speedup"] = row["samples_per_s"] / base
        rows.append(row)
    sanity = agreement([r["seconds"] * 1e3 for r in extra[f"{REFERENCE}_repeat"]],
                       [r["seconds"] * 1e3 for r in extra[REFERENCE]], tolerance)  # fmt: skip
    return {"results": rows, "sanity": sanity,
            "predictions_identical": all(r["identical"] for r in rows)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "synth-llava"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--benchmark", default="pope", choices=["pope", "mme", "gqa"])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of benchmark folders (default: SynthVQA, written here)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds, each evaluating every case once in a shuffled order")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="sanity: llava_hf timed twice must agree within this")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "peer")
    args = parser.parse_args()
    if args.rounds < 1 or args.tolerance < 0:
        sys.exit(f"--rounds {args.rounds} --tolerance {args.tolerance}: expected at least 1 "
                 f"round and a tolerance >= 0 (e.g. --rounds 4 --tolerance 0.1)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    from lmms_eval.models import get_model

    from recomp_eval.lmms_plugin.model import RecompLlava
    from recomp_eval.lmms_plugin.tasks import write_tasks

    if args.data is None:
        from recomp_eval.synth.writers import write_benchmark

        args.data = args.out / "synth"
        if not (args.data / args.benchmark / "manifest.json").exists():
            write_benchmark(args.benchmark, args.data, n_images=args.limit // 6 + 1)
    tasks_dir = args.out / "tasks"
    (task,) = write_tasks(args.data, tasks_dir, (args.benchmark,))
    machine = machine_info(str(args.device), scripts=("scripts/bench_peer.py",))
    # every model is loaded before any timing; the device goes in once: lmms-eval passes the
    # extra config's `device` to the class too, so naming it in the argument string as well
    # is a duplicate keyword there
    models = {REFERENCE: get_model(REFERENCE).create_from_arg_string(
        f"pretrained={args.model},dtype={args.dtype},device_map={args.device}",
        {"batch_size": 1, "device": args.device})}  # fmt: skip
    batches = {REFERENCE: 1}
    for batch in args.batch_sizes:
        models[f"ours_b{batch}"] = RecompLlava(pretrained=args.model, method="none",
                                               dtype=args.dtype, device=args.device,
                                               batch_size=batch, requests_file="none")  # fmt: skip
        batches[f"ours_b{batch}"] = batch
    cases = {label: (lambda m=model, b=batches[label]: run(m, tasks_dir, task, args.limit, b))
             for label, model in models.items()}  # fmt: skip
    cases[f"{REFERENCE}_repeat"] = cases[REFERENCE]
    timed = time_interleaved(cases, warmup=0, reps=args.rounds, device=args.device,
                             seed=args.seed)  # fmt: skip
    summary = summarize_cases(timed["extra"], batches, args.tolerance)
    rows = summary["results"]
    raw = {label: [r["seconds"] for r in runs] for label, runs in timed["extra"].items()}
    report = {"setting": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
              "order": "shuffled per round (time_interleaved)", "orders": timed["orders"],
              "loadavg": timed["loadavg"], **summary, "raw_seconds": raw}  # fmt: skip
    (args.out / "peer.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"lmms-eval's llava_hf vs our plugin: {Path(args.model).name}, lmms-eval's "
        f"{args.benchmark} task, {args.limit} questions, {args.device} {args.dtype}, method none; "
        f"{args.rounds} round(s) in shuffled order, commit {machine.get('commit')}.",
        "",
        "| harness | batch | samples | seconds (min / median / p90) | samples/s (median) "
        "| vs llava_hf | predictions identical |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        t = r["seconds"]
        lines.append(f"| {r['harness']} | {r['batch']} | {r['samples']} | {t['min']:.1f} / "
                     f"{t['median']:.1f} / {t['p90']:.1f} | {r['samples_per_s']:.2f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{'yes' if r['identical'] else 'no (' + str(r['identical_count']) + ')'} |")  # fmt: skip
    lines += ["", f"Sanity (llava_hf timed as two cases): "
              f"{sanity_line(summary['sanity'], 'evaluation')}."]  # fmt: skip
    (args.out / "peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
