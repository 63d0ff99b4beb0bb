"""Time every registered pre-LLM compression method at LLaVA-1.5 shapes.

Compares against the loop oracle of the released RC code (``recomp_eval/rc_oracle.py``, one image at a
time) and one CLIP ViT-L/14-336 forward pass with random weights (the "RC costs <= 5 % of a ViT
pass" target). CPU runs use one thread; CUDA runs are added when a GPU is present.

    python scripts/bench_compression.py [--quick] [--out results/bench] [--methods cdpruner trim]

Writes ``compression.json`` (every timing, environment) and ``compression.md`` (table: method,
device, B, median ms, x faster than the oracle, % of one ViT pass at the same B and device);
with ``--methods``, ``compression_<methods>.json`` / ``.md`` beside them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from recomp_eval.efficiency.benchmark import (  # noqa: E402
    agreement,
    machine_info,
    pin_threads,
    summarize,
    time_interleaved,
)
from recomp_eval.methods import METHODS, VisionSignals, build_method  # noqa: E402
from recomp_eval.rc_oracle import make_inputs, rc_single  # noqa: E402

N_PATCHES, WIDTH, BATCHES = 576, 1024, (1, 8)
JOINT = 768  # CLIP ViT-L/14 joint embedding width
# extra RC configurations timed next to each registered method's defaults
RC_VARIANTS = {
    "recomp[official]": dict(variant="official"),
    "recomp[official,lof=torch]": dict(variant="official", lof_backend="torch"),
    "recomp[paper]": dict(variant="paper"),
    "recomp[paper,r=0.1]": dict(variant="paper", retention=0.1),
}


def make_signals(batch: int, device: str, dtype: torch.dtype, key_width: int) -> VisionSignals:
    x = make_inputs(seed=0, batch=batch, n=N_PATCHES, width=WIDTH)
    keys = x["keys"][..., :key_width]
    return VisionSignals(
        features=x["features"].to(device, dtype),
        cls_attn=x["attn"].to(device, dtype),
        keys=keys.to(device, dtype),
        text_sim=x["text_sim"].to(device, dtype),
        cls_feature=x["features"][:, 0].to(device, dtype),
        seeds=torch.arange(batch, device=device),
        # what a 7B projector outputs per patch ([B,N,4096]; DivPrune compares these): a fixed
        # random linear map, so the cost is the method's, not the projector's
        projected=(
            x["features"]
            @ torch.randn(WIDTH, 4096, generator=torch.Generator().manual_seed(1))
            / WIDTH**0.5
        ).to(device, dtype),
        # CLIP joint space (D = 768, fp32 as the adapter gives it) and one text segment
        patch_embeds=(
            x["features"]
            @ torch.randn(WIDTH, JOINT, generator=torch.Generator().manual_seed(2))
            / WIDTH**0.5
        ).to(device),
        text_embeds=torch.randn(batch, 1, JOINT, generator=torch.Generator().manual_seed(3)).to(
            device, dtype
        ),
    )


def build_all(only: list[str] | None = None) -> tuple[dict[str, object], list[str]]:
    """Configured methods by label (``only``: these method names), and notes for the skipped."""
    built, notes = {}, []
    for name in METHODS:
        if only and name not in only:
            continue
        if name == "recomp":
            for label, kwargs in RC_VARIANTS.items():
                built[label] = build_method("recomp", **kwargs)
            continue
        try:
            method = build_method(name)
        except ModuleNotFoundError as err:
            notes.append(f"{name}: module not there yet ({err.name})")
            continue
        if method.llm is not None:
            notes.append(f"{name}: acts inside the LLM, not timed here")
            continue
        built[name] = method
    return built, notes


def vit_forward(
    batch: int, device: str, dtype: torch.dtype, layers: int = 24
) -> Callable[[], object]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    model = CLIPVisionModel(config).to(device, dtype).eval()
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)

    def run() -> object:
        with torch.no_grad():
            return model(pixel_values=pixels, output_hidden_states=True)

    return run


def oracle_call(signals: VisionSignals) -> Callable[[], object]:
    f, a, k, s = (
        t.float().cpu()
        for t in (signals.features, signals.cls_attn, signals.keys, signals.text_sim)
    )

    def run() -> object:
        return [rc_single(f[i], a[i], k[i], s[i]) for i in range(f.shape[0])]

    return run


def summary(times: list[float]) -> dict[str, float]:
    stats = summarize(times)
    return {"ms": stats["median"], "ms_min": stats["min"], "ms_p90": stats["p90"], "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 2-3 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--methods", nargs="+", default=None, help="time only these methods")
    parser.add_argument("--tolerance", type=float, default=0.10, help="sanity check tolerance")
    parser.add_argument("--smoke", action="store_true", help="tiny run of every code path (tests)")
    args = parser.parse_args()
    # (warm-up calls, timed calls); one ViT-L pass at B=8 takes about a minute on one CPU thread
    warmup, repeats = (1, 5) if args.quick else (2, 15)
    batches, vit_layers = BATCHES, 24
    if args.smoke:  # every code path in seconds (tests): B = 1 and 2, a 1-layer ViT, 2 reps
        warmup, repeats, batches, vit_layers = 1, 2, (1, 2), 1
    tolerance = args.tolerance
    vit_runs = {1: (1, 1), 8: (0, 1)} if args.quick else {1: (1, 3), 8: (0, 2)}
    vit_runs = {b: vit_runs.get(b, (0, 1)) for b in batches}
    oracle_reps = 3 if args.quick else 5

    threads = pin_threads(1)
    methods, notes = build_all(args.methods)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, sanity, raw = [], [], {}
    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.float16
        for batch in batches:
            sig_full = make_signals(batch, device, dtype, WIDTH)
            sig_heads = make_signals(batch, device, dtype, WIDTH // 16)
            cases = {}
            for label, method in methods.items():
                sig = sig_heads if method.spec.keys == "mean_heads" else sig_full
                cases[label] = lambda m=method, s=sig: m(s)
            for label in list(cases):  # a baseline under construction must not stop the bench
                try:
                    cases[label]()
                except Exception as err:
                    notes.append(
                        f"{label} on {device} B={batch}: failed ({type(err).__name__}: {err})"
                    )
                    del cases[label]
            oracle = oracle_call(sig_full)
            if device == "cpu":  # the release loop runs on the CPU: interleaved with the methods
                cases["oracle"], cases["oracle_repeat"] = oracle, oracle
                timed = time_interleaved(cases, warmup, repeats, device)["ms"]
            else:  # methods on the GPU (CUDA events), the loop on the CPU (wall clock)
                timed = time_interleaved(cases, warmup, repeats, device)["ms"]
                timed.update(time_interleaved({"oracle": oracle, "oracle_repeat": oracle},
                                              1, oracle_reps, "cpu")["ms"])  # fmt: skip
            vit_warm, vit_reps = vit_runs[batch] if device == "cpu" else (2, 5)
            vit_ms = time_interleaved({"vit": vit_forward(batch, device, dtype, vit_layers)}, vit_warm,
                                      vit_reps, device)["ms"]["vit"]  # fmt: skip
            check = agreement(timed["oracle_repeat"], timed["oracle"], tolerance)
            sanity.append({"device": device, "batch": batch, "cases": "oracle vs oracle_repeat",
                           **check})  # fmt: skip
            raw[f"{device}/B={batch}"] = {**timed, "vit": vit_ms}
            print(f"{device} B={batch}: {check['message']}", flush=True)
            ref = summary(timed["oracle"] + timed.pop("oracle_repeat"))
            vit = summary(vit_ms)
            rows.append(
                dict(method="oracle (release loop, B=1 each)", device="cpu", batch=batch, **ref)
            )
            rows.append(dict(method="CLIP ViT-L/14-336 forward", device=device, batch=batch, **vit))
            for label, times in timed.items():
                if label == "oracle":
                    continue
                t = summary(times)
                rows.append(
                    dict(
                        method=label, device=device, batch=batch, **t,
                        x_faster_than_oracle=ref["ms"] / t["ms"],
                        x_faster_than_oracle_min=ref["ms_min"] / t["ms_min"],
                        pct_of_vit=100 * t["ms"] / vit["ms"],
                    )
                )  # fmt: skip
            print(f"done {device} B={batch}", flush=True)

    env = dict(
        machine=machine_info(devices[-1], scripts=("scripts/bench_compression.py",)),
        threads=threads, quick=args.quick, smoke=args.smoke, warmup=warmup, repeats=repeats,
        vit_layers=vit_layers,
        vit_runs_cpu={str(k): v for k, v in vit_runs.items()}, oracle_reps=2 * oracle_reps,
        shapes=dict(N=N_PATCHES, C=WIDTH), tolerance=tolerance,
        method="cases interleaved in a shuffled order per round after warm-up rounds "
               "(recomp_eval.efficiency.benchmark); sanity: the oracle timed as two cases",
        note="CPU fp32 on one thread; CUDA fp16",
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "rows": rows, "sanity": sanity, "raw_ms": raw, "notes": notes}
    # a subset run (--methods) writes beside the full table instead of replacing it
    stem = "compression" if not args.methods else "compression_" + "_".join(args.methods)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "| method | device | B | ms (median) | ms (min) | x faster than oracle (median / min) "
        "| % of ViT pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fast = ""
        if "x_faster_than_oracle" in r:
            fast = f"{r['x_faster_than_oracle']:.1f} / {r['x_faster_than_oracle_min']:.1f}"
        pct = f"{r['pct_of_vit']:.3f}" if "pct_of_vit" in r else ""
        lines.append(
            f"| {r['method']} | {r['device']} | {r['batch']} | {r['ms']:.2f} | {r['ms_min']:.2f} "
            f"| {fast} | {pct} |"
        )
    machine = env["machine"]
    lines += [
        "",
        f"torch {machine['torch']}, {env['note']}, {machine['cpu']}, commit "
        f"{machine['commit'][:10]}; cases interleaved, shuffled per round; medians",
        "",
    ]
    lines += [
        f"- sanity {c['device']} B={c['batch']} ({c['cases']}): {c['message']}" for c in sanity
    ]
    lines += [f"- {n}" for n in notes]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
