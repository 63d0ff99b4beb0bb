"""Host memory of a long run: resident memory must not grow with the number of samples.

Writes a POPE-schema parquet of ``--rows`` generated rows (small images), runs the real runner on
the tiny model over all of them in one process, samples the resident set size (RSS) every 0.2 s,
and reports the growth between the end of warm-up (``--warmup-share`` of the samples done) and
the end. Target: under 200 MB.

    python scripts/bench_memory.py --rows 3000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from recomp_eval.efficiency.benchmark import machine_info


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_rows(root: Path, n: int) -> Path:
    """A POPE-schema split of ``n`` rows with distinct 64 px images, in the prefetch layout."""
    import io

    from datasets import Dataset

    from recomp_eval.synth.schemas import hub_features

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        rows.append({
            "id": str(i), "question_id": str(i), "question": f"Is there a cat number {i}?",
            "answer": "yes" if i % 2 else "no", "image_source": f"img{i}",
            "image": {"bytes": buf.getvalue(), "path": None},
            "category": ("adversarial", "popular", "random")[i % 3],
        })  # fmt: skip
    data_dir = root / "pope"
    folder = data_dir / "default" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=hub_features("pope")).to_parquet(str(folder / "0.parquet"))
    manifest = {"dataset_id": "bench/pope", "revision": "bench", "resolved_revision": "bench"}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--warmup-share", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate

    work = Path(tempfile.mkdtemp(prefix="recomp-mem-"))
    data_dir = write_rows(work, args.rows)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name="eval",
            overrides=[
                "benchmark=pope", f"benchmark.data_dir={data_dir}", f"paths.root={work}",
                "method=fastervlm", "runner.max_new_tokens=1", "runner.batch_size=16",
            ],
        )  # fmt: skip
    samples: list[tuple[float, float, int]] = []  # (time, rss MB, samples done)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            files = list((work / "raw").rglob("samples.jsonl")) if (work / "raw").exists() else []
            n = files[0].read_bytes().count(b"\n") if files else 0
            samples.append((time.time(), rss_mb(), n))
            time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.time()
    evaluate(cfg)
    done.set()
    thread.join()
    samples.append((time.time(), rss_mb(), args.rows))
    after_warmup = next(s for s in samples if s[2] >= args.warmup_share * args.rows)
    peak_after = max(s[1] for s in samples if s[0] >= after_warmup[0])
    result = {
        "machine": machine_info("cpu", scripts=("scripts/bench_memory.py",)),
        "rows": args.rows,
        "seconds": time.time() - start,
        "rss_after_warmup_mb": after_warmup[1],
        "rss_end_mb": samples[-1][1],
        "rss_peak_after_warmup_mb": peak_after,
        "growth_mb": peak_after - after_warmup[1],
        "target_mb": 200,
        "met": peak_after - after_warmup[1] < 200,
        "timeline": [{"t": round(t - start, 2), "rss_mb": round(m, 1), "done": n}
                     for t, m, n in samples[:: max(1, len(samples) // 50)]],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1))
    table = (
        "| rows | RSS after warm-up (MB) | peak after warm-up (MB) | growth (MB) | target |\n"
        "|---|---|---|---|---|\n"
        f"| {args.rows} | {result['rss_after_warmup_mb']:.0f} | {peak_after:.0f} | "
        f"{result['growth_mb']:.0f} | < 200 MB: {'met' if result['met'] else 'NOT met'} |\n"
    )
    (args.out / "memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
