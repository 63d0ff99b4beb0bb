"""lmms-eval's own ``llava_hf`` (batch 1, its only option) against our plugin at batch 1/8/32.

The same checkpoint, the same lmms-eval task YAML (POPE over local SynthVQA parquet by default)
and the same samples; ``method=none`` so both evaluate the uncompressed model. Reports
samples/s of each ``generate_until`` pass and whether the predictions are identical to
lmms-eval's own. Writes ``<out>/peer.json`` and ``<out>/peer.md``.

    python scripts/bench_peer.py                                  # CPU: synth-llava, 256 questions
    python scripts/bench_peer.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 \\
        --data /data --limit 1000 --batch-sizes 1 8 16 32          # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


from recomp_eval.efficiency.benchmark import machine_info  # noqa: E402 - the shared record


def run(model, model_args: str | None, tasks_dir: Path, task: str, limit: int, batch: int,
        device: str) -> tuple[dict[int, str], float]:  # fmt: skip
    """Predictions by doc id and the seconds of lmms-eval's evaluation (model load excluded)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    if isinstance(model, str):  # lmms-eval builds it; load it first so timing excludes loading
        from lmms_eval.models import get_model

        model = get_model(model).create_from_arg_string(model_args, {"batch_size": batch,
                                                                     "device": device})  # fmt: skip
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    started = time.perf_counter()
    result = simple_evaluate(model=model, tasks=[task], limit=limit, batch_size=batch,
                             log_samples=True, bootstrap_iters=0, task_manager=manager)  # fmt: skip
    seconds = time.perf_counter() - started
    answers = {s["doc_id"]: s["filtered_resps"][0] for s in result["samples"][task]}
    return answers, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "synth-llava"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--benchmark", default="pope", choices=["pope", "mme", "gqa"])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of benchmark folders (default: SynthVQA, written here)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "peer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from recomp_eval.lmms_plugin.model import RecompLlava
    from recomp_eval.lmms_plugin.tasks import write_tasks

    if args.data is None:
        from recomp_eval.synth.writers import write_benchmark

        args.data = args.out / "synth"
        if not (args.data / args.benchmark / "manifest.json").exists():
            write_benchmark(args.benchmark, args.data, n_images=args.limit // 6 + 1)
    tasks_dir = args.out / "tasks"
    (task,) = write_tasks(args.data, tasks_dir, (args.benchmark,))
    # the device goes in once: lmms-eval passes the extra config's `device` to the class too,
    # so naming it in the argument string as well is a duplicate keyword there
    reference, ref_s = run("llava_hf", f"pretrained={args.model},dtype={args.dtype},"
                           f"device_map={args.device}", tasks_dir, task, args.limit, 1,
                           args.device)  # fmt: skip
    rows = [{"harness": "lmms-eval llava_hf", "batch": 1, "samples": len(reference),
             "seconds": ref_s, "samples_per_s": len(reference) / ref_s, "identical": True}]  # fmt: skip
    for batch in args.batch_sizes:
        ours = RecompLlava(pretrained=args.model, method="none", dtype=args.dtype,
                           device=args.device, batch_size=batch, requests_file="none")  # fmt: skip
        answers, seconds = run(ours, None, tasks_dir, task, args.limit, batch, args.device)
        same = sum(answers[k] == reference.get(k) for k in answers)
        rows.append({"harness": "recomp_llava (ours)", "batch": batch, "samples": len(answers),
                     "seconds": seconds, "samples_per_s": len(answers) / seconds,
                     "identical": same == len(answers) == len(reference),
                     "identical_count": same})  # fmt: skip
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
    report = {"setting": {k: str(v) for k, v in vars(args).items()},
              "machine": machine_info(str(args.device), scripts=("scripts/bench_peer.py",)),
              "results": rows}  # fmt: skip
    (args.out / "peer.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"lmms-eval's llava_hf vs our plugin: {Path(args.model).name}, lmms-eval's "
        f"{args.benchmark} task, {args.limit} questions, {args.device} {args.dtype}, method none.",
        "",
        "| harness | batch | samples | seconds | samples/s | vs llava_hf | predictions identical |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['harness']} | {r['batch']} | {r['samples']} | {r['seconds']:.1f} | "
                     f"{r['samples_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['identical'] else 'no (' + str(r['identical_count']) + ')'} |")  # fmt: skip
    (args.out / "peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
