"""Data-parallel throughput: samples/s of 1 vs N torchrun processes on the same evaluation.

Each world size runs the same command in a fresh results folder (nothing resumes) through
``torchrun --nproc-per-node N -m recomp_eval``. Throughput is the run's samples over the span
from the first process starting its generation loop to the last one ending it (from the shard
markers, so model loading is not counted; the end-to-end wall time is reported next to it). On
CPU every process gets one thread (``OMP_NUM_THREADS=1``, ``runner.torch_threads=1``), so N
processes use N cores. Default: the demo setting (synth-llava on SynthVQA-GQA, the first 150
questions, no compression and RC at 10%). Target on a 2-core CPU: 2 processes >= 1.7x one.

The shared benchmark method (``recomp_eval.efficiency.benchmark``) with whole launches as
cases: ``--rounds`` rounds, each launching every world size in a freshly shuffled order;
min / median / p90 of the generation span per world size; speed-ups from medians of the same
run. Sanity check: the first world size is launched twice per round as two cases
(``world1`` and ``world1_repeat``); their median generation spans must agree within
``--tolerance``, else the report says the measurement is not valid.

    python scripts/bench_scaling.py                      # CPU: 1 vs 2 processes
    python scripts/bench_scaling.py --nprocs 1 2 4 8 --device cuda --model llava15_7b \\
        --data /data/gqa --limit 2000                    # a GPU node: one GPU per process

Writes ``<out>/scaling.json`` and ``<out>/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = "runs=[{method: none},{method: recomp, retention: 0.1, options: {variant: official}}]"


from recomp_eval.efficiency.benchmark import (  # noqa: E402 - the shared method and record
    agreement,
    machine_info,
    sanity_line,
    summarize,
    time_interleaved,
)


def run_world(nproc: int, args: argparse.Namespace, work: Path, label: str) -> dict:
    """One launch at world size ``nproc`` in a fresh folder; its throughput from the markers."""
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--nproc-per-node", str(nproc), "-m", "recomp_eval",
        f"model={args.model}", f"model.device={args.device}", f"benchmark={args.benchmark}",
        f"benchmark.data_dir={args.data}", f"benchmark.limit={args.limit}",
        "benchmark.limit_seed=0", f"runner.batch_size={args.batch_size}", f"paths.root={out}",
        RUNS,
    ]  # fmt: skip
    if args.device == "cpu":
        command.append(f"runner.torch_threads={args.threads}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"world size {nproc} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    markers = [json.loads(p.read_text()) for p in (out / "raw").rglob("shard-*-of-*.json")]
    if len(markers) != 2 * nproc:
        sys.exit(f"world size {nproc}: expected {2 * nproc} shard markers, found {len(markers)}")
    samples = sum(m["generated"] for m in markers)
    span = max(m["loop_ended"] for m in markers) - min(m["loop_started"] for m in markers)
    shutil.rmtree(out, ignore_errors=True)  # nothing of a launch is reused by the next
    return {
        "nproc": nproc,
        "samples": samples,
        "generation_s": span,
        "samples_per_s": samples / span,
        "wall_s": wall,
        "devices": sorted({m["device"] for m in markers}),
    }


def case_labels(nprocs: list[int]) -> dict[str, int]:
    """Case label -> world size: one case per world size and a repeat of the first one."""
    labels = {f"world{n}": n for n in nprocs}
    labels[f"world{nprocs[0]}_repeat"] = nprocs[0]
    return labels


def aggregate(nprocs: list[int], launches: dict[str, list[dict]], tolerance: float) -> dict:
    """Per world size the statistics over its launches; speed-ups from median samples/s;
    the sanity verdict from the first world size timed as two cases."""
    first = f"world{nprocs[0]}"
    rows = []
    for n in nprocs:
        runs = launches[f"world{n}"]
        rows.append({
            "nproc": n,
            "launches": len(runs),
            "samples": runs[0]["samples"],
            "generation_s": summarize([r["generation_s"] for r in runs]),
            "samples_per_s": summarize([r["samples_per_s"] for r in runs]),
            "wall_s": summarize([r["wall_s"] for r in runs]),
            "devices": sorted({d for r in runs for d in r["devices"]}),
        })  # fmt: skip
    base = rows[0]["samples_per_s"]["median"]
    for row in rows:
        row["speedup"] = row["samples_per_s"]["median"] / base
    sanity = agreement([r["generation_s"] * 1e3 for r in launches[f"{first}_repeat"]],
                       [r["generation_s"] * 1e3 for r in launches[first]], tolerance)  # fmt: skip
    return {"results": rows, "sanity": sanity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="synth_llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--benchmark", default="gqa")
    parser.add_argument("--data", type=Path, default=None,
                        help="benchmark data folder (default: SynthVQA, written when missing)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of launches, each world size once per round, shuffled")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="sanity: the repeated first world size must agree within this")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "scaling")
    args = parser.parse_args()
    if args.rounds < 1 or args.tolerance < 0:
        sys.exit(f"--rounds {args.rounds} --tolerance {args.tolerance}: expected at least 1 "
                 f"round and a tolerance >= 0 (e.g. --rounds 2 --tolerance 0.1)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        from recomp_eval.synth.writers import write_benchmark

        synth = args.out / "synth"
        args.data = synth / args.benchmark
        if not (args.data / "manifest.json").exists():
            write_benchmark(args.benchmark, synth)
    machine = machine_info(str(args.device), scripts=("scripts/bench_scaling.py",))
    labels = case_labels(args.nprocs)
    cases = {lab: (lambda lab=lab, n=n: run_world(n, args, args.out, lab))
             for lab, n in labels.items()}  # fmt: skip
    timed = time_interleaved(cases, warmup=0, reps=args.rounds, device="cpu", seed=args.seed)
    summary = aggregate(args.nprocs, timed["extra"], args.tolerance)
    report = {
        "setting": {k: str(v) for k, v in vars(args).items()},
        "machine": machine,
        "order": "shuffled per round (time_interleaved); launch wall ms in raw",
        "orders": timed["orders"],
        "loadavg": timed["loadavg"],
        **summary,
        "raw": timed["extra"],
    }
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Data-parallel throughput, {args.model} on {args.benchmark} ({args.limit} questions x "
        f"2 runs: none and RC official at 10%), batch {args.batch_size}, device {args.device}"
        + (f", {args.threads} thread(s) per process" if args.device == "cpu" else "")
        + f"; {args.rounds} round(s) of launches in shuffled order, commit {machine.get('commit')}.",
        "",
        "| processes | launches | samples | generation s (min / median / p90) | samples/s "
        "(median) | speed-up | end-to-end s (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        g = r["generation_s"]
        lines.append(f"| {r['nproc']} | {r['launches']} | {r['samples']} | {g['min']:.1f} / "
                     f"{g['median']:.1f} / {g['p90']:.1f} | {r['samples_per_s']['median']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['wall_s']['median']:.1f} |")  # fmt: skip
    lines += ["", f"Sanity ({args.nprocs[0]} process(es) launched as two cases): "
              f"{sanity_line(summary['sanity'], 'generation')}."]  # fmt: skip
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
