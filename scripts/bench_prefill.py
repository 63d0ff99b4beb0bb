"""Prefill latency against kept visual tokens, compared with the analytic FLOPs ratio.

A Llama decoder with LLaVA-1.5-7B's layer shape (hidden 4096, FFN 11008, 32 heads; vocabulary
32000) and random weights runs the prefill of ``text + K`` tokens through ``inputs_embeds`` with
``logits_to_keep=1``, as the harness's two-phase path does. On CPU only a few of the 32 layers are
built (the ratio per layer is what matters); on a GPU the full 32 layers.

    python scripts/bench_prefill.py                    # CPU, fp32, 2 layers, B in {1, 8}
    python scripts/bench_prefill.py --device cuda --layers 32 --dtype float16

Writes ``results/bench/prefill_<device>.json`` and ``.md``. Target: at retention 0.1 the measured
speed-up over K = 576 is at least 0.8x the analytic (SwiGLU-aware) FLOPs ratio.

``--in-llm``: the in-LLM methods (FastV, DART, PyramidDrop) at about 10 % instead, through the
real pruning path (:func:`recomp_eval.inject.llm_attention.llm_pruning` on a
``LlavaForConditionalGeneration`` whose decoder has the 7B layer shape; the image features are
given as ``mm_encoder_outputs``, 576 per sample). The analytic ratio comes from each method's
per-layer visual counts. On CPU the decoder has 4 layers and every stage layer is scaled from
32 to 4 (FastV/DART keep 58 tokens from layer 1; PyramidDrop its released ratios at [1, 2, 3]);
on a GPU 32 layers (FastV/DART from layer 2; PyramidDrop at [2, 6, 12], retention 0.1 as the
mean over layers). The cases are timed in a shuffled order in every round.

    python scripts/bench_prefill.py --in-llm --batch-sizes 8 --reps 2

``--next``: LLaVA-NeXT (anyres) token counts, same 7B layer shape. A 672 x 672 image packs
into ``pack_layout``'s 2,928 rows on the real pinpoints (base crop 576 + a 2 x 2 grid of 48 x 48
patches + 48 newlines); per-crop compression at 64 tokens per crop keeps 5 x 64 = 320 rows plus
the newlines of the grid rows that keep a patch (``packed_keep(newlines="row")``: at most 48,
all 48 when every grid row keeps a patch). ``rc_per_crop`` times 320 + 48 (the target case),
``rc_per_crop_no_newlines`` 320, ``rc_per_crop_repeat`` the first again (the sanity check: the
same computation timed as two cases must agree within ``--tolerance``). The cases run in a
shuffled order in every round after warm-up rounds of every case, on the same input embeddings
(each case a prefix of one tensor). Target: at least 0.8x the analytic speed-up at B = 8.
Writes ``results/bench/prefill_next_<device>.json`` and ``.md``.

    python scripts/bench_prefill.py --next --batch-sizes 1 8 --reps 2   # CPU, 2 layers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recomp_eval.efficiency.flops import DecoderShape, prefill_flops
from recomp_eval.methods.base import budget_from_ratio

RETENTIONS = (1.0, 0.5, 0.25, 0.1, 0.05)
N_PATCHES = 576
TEXT_TOKENS = 40  # system prompt + question + answer format, as in LLaVA-1.5 prompts


def llama_config(layers: int) -> LlamaConfig:
    """LLaVA-1.5-7B's decoder shape with ``layers`` layers, sdpa attention."""
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build(layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    cfg = llama_config(layers)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


# the measurement method every bench shares (interleaved rounds, sanity, machine record)
from recomp_eval.efficiency.benchmark import (  # noqa: E402 - re-exported for the benches
    agreement,
    machine_info,
    pin_threads,
    quiet_reps,
    summarize,
    time_interleaved,
)

IMAGE_OFFSET = 35  # the vicuna_v1 system prompt up to <image>: text before the image rows
VOCAB = 32000


def scaled(layer: int, depth: int) -> int:
    """A stage layer of the 32-layer 7B decoder placed at the same depth fraction (>= 1)."""
    return max(1, round(layer * depth / 32))


def in_llm_cases(depth: int) -> dict[str, tuple[str, float | None, dict]]:
    """label -> (method, retention, options), stage layers scaled to ``depth``.

    FastV and DART keep ``round(0.1 N)`` image tokens from their layer on. PyramidDrop's retention
    is the mean over all layers, which its first stage bounds from below (``layer_list[0] / D``):
    on 32 layers a non-released ``[2, 6, 12]`` reaches 0.1; on fewer layers the released ratios
    run at the scaled layers.
    """
    if depth == 32:
        pdrop = ("pdrop", 0.1, {"layer_list": [2, 6, 12]})
    else:
        pdrop = ("pdrop", None, {"layer_list": [scaled(x, depth) for x in (8, 16, 24)]})
    return {
        "none": ("none", None, {}),
        "fastv": ("fastv", 0.1, {"k_layer": scaled(2, depth)}),
        "dart": ("dart", 0.1, {"k_layer": scaled(2, depth)}),
        "pdrop": pdrop,
    }


def build_llava(layers: int, dtype: torch.dtype, device: str):
    """LLaVA with a 7B-shape decoder of ``layers`` layers (the tiny tower is never run)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=56, patch_size=14)  # fmt: skip
    text = llama_config(layers)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB - 1)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model.eval()


@torch.inference_mode()
def time_in_llm(model, batch: int, reps: int, device: str, depth: int,
                tolerance: float = 0.10) -> list[dict]:  # fmt: skip
    """Median prefill seconds of each in-LLM case at retention 0.1, shuffled per round; each row
    carries the sanity verdict of FastV timed as two cases."""
    from recomp_eval.inject.llm_attention import llm_pruning
    from recomp_eval.methods import build_method
    from recomp_eval.models.llm_inputs import image_features_arg

    image_id, hidden = model.config.image_token_id, model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 2, (batch, TEXT_TOKENS + N_PATCHES), generator=g)
    ids[:, IMAGE_OFFSET : IMAGE_OFFSET + N_PATCHES] = image_id
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    feats = image_features_arg(
        list((torch.randn(batch, N_PATCHES, hidden, generator=g) * 0.02).to(device, model.dtype))
    )
    cases = in_llm_cases(depth)
    methods = {label: build_method(name, retention=r, **opts)
               for label, (name, r, opts) in cases.items()}  # fmt: skip
    counts: dict[str, list[int]] = {}

    def case(label: str):
        method = methods[label]

        def run():
            if method.llm is None:
                model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats,
                      logits_to_keep=1)  # fmt: skip
                return
            with llm_pruning(model, method.llm, image_id) as probe:
                model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats,
                      logits_to_keep=1)  # fmt: skip
            counts[label] = probe.per_layer_counts[:, 0].tolist()

        return torch.inference_mode()(run)

    timers = {label: case(label) for label in methods}
    timers["fastv#repeat"] = case("fastv")  # the sanity check: one case timed twice
    # round 0 of every case is a warm-up; shuffled interleaved rounds (the shared method)
    ms = time_interleaved(timers, 1, reps, device)["ms"]
    times = {label: [t / 1e3 for t in v] for label, v in ms.items()}
    check = agreement(ms["fastv#repeat"], ms["fastv"], tolerance)
    print(f"B = {batch}: sanity {check['message']}", flush=True)
    shape = DecoderShape(hidden=hidden, intermediate=model.config.text_config.intermediate_size,
                         layers=depth, kv_hidden=hidden)  # fmt: skip
    full = prefill_flops(TEXT_TOKENS + N_PATCHES, shape)
    base = statistics.median(times["none"])
    rows = []
    for label, (_name, retention, opts) in cases.items():
        per_layer = counts.get(label, [N_PATCHES] * depth)
        analytic = full / prefill_flops([TEXT_TOKENS + c for c in per_layer], shape)
        seconds = statistics.median(times[label])
        rows.append({
            "batch": batch, "method": label, "options": opts, "retention": retention,
            "mean_visual_tokens": statistics.fmean(per_layer), "per_layer": per_layer,
            "prefill_ms": seconds * 1e3, "prefill_ms_min": min(times[label]) * 1e3,
            "speedup": base / seconds, "analytic_speedup": analytic,
            "efficiency": base / seconds / analytic, "reps": reps, "sanity": check,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main_in_llm(args, on_gpu: bool, dtype: torch.dtype) -> None:
    depth = args.layers or (32 if on_gpu else 4)
    model = build_llava(depth, dtype, args.device)
    rows = [
        r
        for b in args.batch_sizes
        for r in time_in_llm(model, b, args.reps, args.device, depth, args.tolerance)
    ]
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    meta = {
        "device": args.device, "device_name": device_name, "dtype": str(dtype), "layers": depth,
        "threads": torch.get_num_threads(), "text_tokens": TEXT_TOKENS, "torch": torch.__version__,
        "target_met": {f"{r['method']}@{r['batch']}": r["efficiency"] >= 0.8
                       for r in rows if r["method"] != "none"},
        "machine": machine_info(args.device, ("scripts/bench_prefill.py",)),
    }  # fmt: skip
    sanity = {r["batch"]: r["sanity"] for r in rows}
    tag = "cuda" if on_gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_in_llm_{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    lines = [
        f"In-LLM pruning prefill, LLaVA-1.5-7B layer shape, {depth} layer(s), "
        f"{dtype}, {device_name}, {TEXT_TOKENS} text + {N_PATCHES} image tokens; speed-up "
        f"relative to `none` in the same run (cases shuffled per round, {args.reps} timed rounds).",
        "",
        "| B | method | options | mean visual tokens over layers | prefill ms (median / min) "
        "| speed-up | analytic | measured / analytic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        opts = ", ".join(f"{k}={v}" for k, v in x["options"].items()) or "-"
        if x["retention"] is not None:
            opts = f"retention={x['retention']}, {opts}"
        lines.append(
            f"| {x['batch']} | {x['method']} | {opts} | {x['mean_visual_tokens']:.1f} | "
            f"{x['prefill_ms']:.0f} / {x['prefill_ms_min']:.0f} | {x['speedup']:.2f}x | "
            f"{x['analytic_speedup']:.2f}x | {x['efficiency']:.2f} |"
        )
    lines += ["", "Sanity (FastV timed as two cases):"]
    lines += [f"- B = {b}: {c['message']}" for b, c in sanity.items()]
    (args.out / f"prefill_in_llm_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
NEXT_IMAGE = (672, 672)  # (height, width): a 2 x 2 grid, 5 crops
PER_CROP = 64  # tokens kept per crop (64 / 576 of every crop)


def next_layout(image_size=NEXT_IMAGE, pinpoints=NEXT_PINPOINTS, crop: int = 336,
                patch: int = 14):  # fmt: skip
    """``pack_layout`` of one image on a LLaVA-NeXT config (only ``model.config`` is read)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    from recomp_eval.models.llava_next.packing import pack_layout

    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=crop, patch_size=patch),
                          image_grid_pinpoints=pinpoints)  # fmt: skip
    return pack_layout(SimpleNamespace(config=cfg), list(image_size))


def next_cases(layout, per_crop: int = PER_CROP) -> dict[str, int]:
    """label -> visual tokens: the full packing and per-crop compression with / without the
    grid newlines (``rc_per_crop_repeat``: the same count again, the noise check)."""
    kept = layout.crops * per_crop
    return {"full": layout.length, "rc_per_crop": kept + layout.newlines,
            "rc_per_crop_repeat": kept + layout.newlines,
            "rc_per_crop_no_newlines": kept}  # fmt: skip


@torch.inference_mode()
def time_next(model, batch: int, visual: dict[str, int], reps: int, warmup: int, device: str,
              seed: int) -> dict:  # fmt: skip
    """Interleaved prefill timings of ``TEXT_TOKENS + visual[label]`` tokens per case; every
    case's input is a prefix of one random embedding tensor."""
    g = torch.Generator().manual_seed(seed)
    longest = TEXT_TOKENS + max(visual.values())
    embeds = torch.randn(batch, longest, model.config.hidden_size, generator=g) * 0.02
    embeds = embeds.to(device, model.dtype)
    inputs = {label: embeds[:, : TEXT_TOKENS + k].contiguous() for label, k in visual.items()}
    masks = {label: torch.ones(x.shape[:2], dtype=torch.long, device=device)
             for label, x in inputs.items()}  # fmt: skip

    def case(label: str) -> Callable[[], None]:
        def run() -> None:
            model(inputs_embeds=inputs[label], attention_mask=masks[label], use_cache=True,
                  logits_to_keep=1)  # fmt: skip

        return run

    return time_interleaved({label: case(label) for label in visual}, warmup, reps, device, seed)


def main_next(args, on_gpu: bool, dtype: torch.dtype, threads: int) -> None:
    """``--next``: full NeXT packing vs per-crop compression, measured vs analytic."""
    if args.smoke:  # tiny decoder, real token counts: seconds on a CPU
        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                          num_key_value_heads=4, num_hidden_layers=1, vocab_size=128,
                          max_position_embeddings=4096)  # fmt: skip
        cfg._attn_implementation = "sdpa"
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        layers = 1
    else:
        layers = args.layers or (32 if on_gpu else 2)
        model = build(layers, dtype, args.device)
    shape = DecoderShape.from_config(model.config)  # the per-layer ratio: depth does not matter
    shape_7b = DecoderShape(hidden=4096, intermediate=11008, layers=32, kv_hidden=4096)
    info = machine_info(args.device, ("scripts/bench_prefill.py",))  # load before the runs
    layout = next_layout()
    visual = next_cases(layout, args.per_crop)
    rows, raw = [], []
    for batch in args.batch_sizes:
        timed = time_next(model, batch, visual, args.reps, args.warmup, args.device, args.seed)
        raw.append({"batch": batch, **timed})
        full = summarize(timed["ms"]["full"])
        quiet = quiet_reps(timed, threads) if not on_gpu else {}
        quiet_med = {label: statistics.median(v) if v else None for label, v in quiet.items()}
        for label, k in visual.items():
            st = summarize(timed["ms"][label])
            analytic = (prefill_flops(TEXT_TOKENS + visual["full"], shape)
                        / prefill_flops(TEXT_TOKENS + k, shape))  # fmt: skip
            speedup = full["median"] / st["median"]
            rows.append({
                "batch": batch, "case": label, "visual_tokens": k, "seq_len": TEXT_TOKENS + k,
                "ms_min": st["min"], "ms_median": st["median"], "ms_p90": st["p90"],
                "speedup": speedup, "speedup_min": full["min"] / st["min"],
                "analytic_speedup": analytic, "efficiency": speedup / analytic,
                "tflops_7b": prefill_flops(TEXT_TOKENS + k, shape_7b) / 1e12,
                "cpu_per_wall": statistics.median(
                    c / w for c, w in zip(timed["cpu_ms"][label], timed["ms"][label])),
                "quiet_n": len(quiet.get(label, [])), "quiet_median": quiet_med.get(label),
            })  # fmt: skip
            q_full, q = quiet_med.get("full"), quiet_med.get(label)
            rows[-1]["quiet_speedup"] = q_full / q if q_full and q else None
            rows[-1]["quiet_efficiency"] = q_full / q / analytic if q_full and q else None
            print(json.dumps(rows[-1]), flush=True)
    sanity = {str(r["batch"]): agreement(r["ms"]["rc_per_crop_repeat"], r["ms"]["rc_per_crop"],
                                         args.tolerance) for r in raw}  # fmt: skip
    valid = all(x["valid"] for x in sanity.values())
    target = {str(x["batch"]): x["efficiency"] >= 0.8 for x in rows if x["case"] == "rc_per_crop"}
    meta = {
        **info, "dtype": str(dtype),
        "layers": layers, "decoder": "smoke (tiny)" if args.smoke else "LLaVA-1.5/NeXT-7B layer",
        "text_tokens": TEXT_TOKENS, "image_size": list(NEXT_IMAGE), "pinpoints": NEXT_PINPOINTS,
        "crops": layout.crops, "patches_per_crop": layout.patches, "grid": list(layout.grid),
        "packed_full": layout.length, "newlines_full": layout.newlines, "per_crop": args.per_crop,
        "visual_tokens": visual, "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
        "threads_requested": threads, "order": "shuffled per round (time_interleaved)",
        "sanity": sanity, "measurement_valid": valid,
        "target": "rc_per_crop efficiency >= 0.8 at B = 8", "target_met": target,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    stem = args.out / f"prefill_next_{'cuda' if on_gpu else 'cpu'}"
    if args.out_stem:
        stem = Path(args.out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw},
                                                    indent=1))  # fmt: skip
    lines = [
        f"Prefill at LLaVA-NeXT token counts, {meta['decoder']} shape, {layers} layer(s), "
        f"{dtype}, {meta['device_name']} ({meta['cpu']}, {meta['threads']} threads), "
        f"torch {meta['torch']}, transformers {meta['transformers']}, commit "
        f"{meta['commit'][:7]}{' + uncommitted script changes' * meta['scripts_modified']}.",
        f"Image {NEXT_IMAGE[0]} x {NEXT_IMAGE[1]}: {layout.crops} crops, packed "
        f"{layout.length} rows ({layout.crops} x {layout.patches} patches minus unpadding, "
        f"{layout.newlines} newlines); per crop {args.per_crop} tokens -> "
        f"{layout.crops * args.per_crop} (+ {layout.newlines} newlines in `rc_per_crop`, "
        f"none in `rc_per_crop_no_newlines`); {TEXT_TOKENS} text tokens in every case.",
        f"{args.reps} timed rounds after {args.warmup} warm-up round(s), cases shuffled per "
        f"round, same input embeddings (prefixes of one tensor); speed-up vs `full` from "
        f"medians (min-based in brackets).",
        "",
        "| B | case | visual tokens | ms min / median / p90 | speed-up | analytic | "
        "measured / analytic | CPU / wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['batch']} | {x['case']} | {x['visual_tokens']} | {x['ms_min']:.0f} / "
            f"{x['ms_median']:.0f} / {x['ms_p90']:.0f} | {x['speedup']:.2f}x "
            f"({x['speedup_min']:.2f}x) | {x['analytic_speedup']:.2f}x | {x['efficiency']:.2f} | "
            f"{x['cpu_per_wall']:.2f} |"
        )
    lines += [
        "",
        f"CPU / wall: this process's CPU time over wall time, median (about "
        f"{meta['threads']} when it has the cores to itself, lower when other processes "
        f"share them). Quiet reps (CPU / wall >= {0.9 * meta['threads']:.1f}) only:",
    ]
    for x in rows:
        if x["case"] != "full" and x.get("quiet_speedup"):
            lines.append(
                f"- B = {x['batch']} {x['case']}: median {x['quiet_median']:.0f} ms "
                f"(n = {x['quiet_n']}), speed-up {x['quiet_speedup']:.2f}x, measured / "
                f"analytic {x['quiet_efficiency']:.2f}"
            )
    lines += ["",
              "Sanity (`rc_per_crop_repeat` vs `rc_per_crop`, the same computation):"]  # fmt: skip
    lines += [f"- B = {b}: {x['message']}" for b, x in sanity.items()]
    lines += [f"Target (measured / analytic >= 0.8 for `rc_per_crop` at B = 8): "
              f"{'met' if target.get('8') else 'not met' if '8' in target else 'B = 8 not run'}"
              f"{'' if valid else ' (measurement not valid: see sanity)'}."]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="default: 2 on CPU, 32 on GPU")
    parser.add_argument(
        "--dtype",
        default=None,
        help="default: float32 on CPU (bf16 matmuls are emulated and ~400x slower on CPUs without AVX512-BF16), float16 on GPU",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--in-llm", action="store_true", help="FastV, DART, PyramidDrop at ~10%")
    parser.add_argument("--next", action="store_true",
                        help="LLaVA-NeXT counts: 2,928 packed rows vs per-crop compression")  # fmt: skip
    parser.add_argument("--per-crop", type=int, default=PER_CROP, help="--next: tokens per crop")
    parser.add_argument("--warmup", type=int, default=1, help="--next: warm-up rounds")
    parser.add_argument("--seed", type=int, default=0, help="--next: inputs and case order")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="sanity-check tolerance on the repeated case's median")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="--next: tiny decoder (tests)")
    parser.add_argument("--out-stem", default=None,
                        help="--next: output path without suffix (default <out>/prefill_next_<device>)")  # fmt: skip
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    layers = args.layers or (32 if on_gpu else 2)
    dtype = getattr(torch, args.dtype or ("float16" if on_gpu else "float32"))
    if args.next:
        return main_next(args, on_gpu, dtype, pin_threads(args.threads))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.in_llm:
        return main_in_llm(args, on_gpu, dtype)
    model = build(layers, dtype, args.device)
    shape = DecoderShape(hidden=4096, intermediate=11008, layers=32, kv_hidden=4096)
    full = TEXT_TOKENS + N_PATCHES
    rows, sanity, raw = [], [], {}
    for batch in args.batch_sizes:
        # one input for every case: each case runs a prefix of it; all interleaved per round
        embeds = torch.randn(batch, full, model.config.hidden_size, dtype=model.dtype,
                             device=args.device) * 0.02  # fmt: skip
        mask = torch.ones(batch, full, dtype=torch.long, device=args.device)

        def case(length: int, embeds=embeds, mask=mask):
            @torch.inference_mode()
            def run():
                model(inputs_embeds=embeds[:, :length], attention_mask=mask[:, :length],
                      use_cache=True, logits_to_keep=1)  # fmt: skip

            return run

        kept_by = {r: budget_from_ratio(r, N_PATCHES) for r in RETENTIONS}
        cases = {f"r={r}": case(TEXT_TOKENS + k) for r, k in kept_by.items()}
        cases["r=0.1#repeat"] = case(TEXT_TOKENS + kept_by[0.1])  # the sanity check's twin
        timed = time_interleaved(cases, 1, args.reps, args.device)["ms"]
        raw[str(batch)] = timed
        check = agreement(timed["r=0.1#repeat"], timed["r=0.1"], args.tolerance)
        sanity.append({"batch": batch, "cases": "r=0.1 vs its repeat", **check})
        base = summarize(timed["r=1.0"])["median"]
        for r, kept in kept_by.items():
            ms = summarize(timed[f"r={r}"])["median"]
            analytic = prefill_flops(full, shape) / prefill_flops(TEXT_TOKENS + kept, shape)
            measured = base / ms
            rows.append({
                "batch": batch, "retention": r, "kept": kept, "seq_len": TEXT_TOKENS + kept,
                "prefill_ms": ms, "prefill_ms_min": min(timed[f"r={r}"]), "speedup": measured,
                "analytic_speedup": analytic, "efficiency": measured / analytic,
                "tflops_7b": prefill_flops(TEXT_TOKENS + kept, shape) / 1e12,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        print(f"B = {batch}: sanity {check['message']}", flush=True)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    meta = {
        "device": args.device, "device_name": device_name, "dtype": str(dtype), "layers": layers,
        "threads": torch.get_num_threads(), "text_tokens": TEXT_TOKENS, "torch": torch.__version__,
        "machine": machine_info(args.device, ("scripts/bench_prefill.py",)), "reps": args.reps,
        "method": "cases interleaved, shuffled per round after a warm-up round; medians",
        "sanity": sanity,
    }  # fmt: skip
    target = [x for x in rows if x["retention"] == 0.1]
    meta["target_met"] = {str(x["batch"]): x["efficiency"] >= 0.8 for x in target}
    tag = "cuda" if on_gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "raw_ms": raw}, indent=1)
    )
    lines = [
        f"Prefill, LLaVA-1.5-7B layer shape, {layers} layer(s), {dtype}, {device_name}, "
        f"{TEXT_TOKENS} text tokens + K visual tokens; speed-up relative to K = 576.",
        "",
        "| B | retention | K | prefill ms | speed-up | analytic | measured / analytic |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['batch']} | {x['retention']:g} | {x['kept']} | {x['prefill_ms']:.1f} | "
            f"{x['speedup']:.2f}x | {x['analytic_speedup']:.2f}x | {x['efficiency']:.2f} |"
        )
    lines += [
        "",
        f"{args.reps} timed rounds after a warm-up round, cases shuffled per round, one "
        f"input (each case a prefix); medians. Sanity (the 10 % case timed twice):",
    ]
    lines += [f"- B = {c['batch']}: {c['message']}" for c in sanity]
    (args.out / f"prefill_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
