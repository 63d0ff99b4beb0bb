"""Prefill latency against kept visual tokens, compared with the analytic FLOPs ratio.

A Llama decoder with LLaVA-1.5-7B's layer shape (hidden 4096, FFN 11008, 32 heads; vocabulary
32000) and random weights runs the prefill of ``text + K`` tokens through ``inputs_embeds`` with
``logits_to_keep=1``, as the harness's two-phase path does. On CPU only a few of the 32 layers are
built (the ratio per layer is what matters); on a GPU the full 32 layers.

    python scripts/bench_prefill.py                    # CPU, fp32, 2 layers, B in {1, 8}
    python scripts/bench_prefill.py --device cuda --layers 32 --dtype float16

Writes ``results/bench/prefill_<device>.json`` and ``.md``. Target: at retention 0.1 the measured
speed-up over K = 576 is at least 0.8x the analytic (SwiGLU-aware) FLOPs ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recomp_eval.efficiency.flops import DecoderShape, prefill_flops
from recomp_eval.methods.base import budget_from_ratio

RETENTIONS = (1.0, 0.5, 0.25, 0.1, 0.05)
N_PATCHES = 576
TEXT_TOKENS = 40  # system prompt + question + answer format, as in LLaVA-1.5 prompts


def build(layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
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
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_prefill(model, batch: int, length: int, reps: int, device: str) -> float:
    """Median seconds of one prefill forward of ``batch`` x ``length`` tokens."""
    hidden = model.config.hidden_size
    embeds = torch.randn(batch, length, hidden, dtype=model.dtype, device=device) * 0.02
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    times = []
    for i in range(reps + 1):  # the first run is a warm-up
        sync(device)
        start = time.perf_counter()
        model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    layers = args.layers or (32 if on_gpu else 2)
    dtype = getattr(torch, args.dtype or ("float16" if on_gpu else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(layers, dtype, args.device)
    shape = DecoderShape(hidden=4096, intermediate=11008, layers=32, kv_hidden=4096)
    full = TEXT_TOKENS + N_PATCHES
    rows = []
    for batch in args.batch_sizes:
        base = None
        for r in RETENTIONS:
            kept = budget_from_ratio(r, N_PATCHES)
            seconds = time_prefill(model, batch, TEXT_TOKENS + kept, args.reps, args.device)
            base = base or seconds
            analytic = prefill_flops(full, shape) / prefill_flops(TEXT_TOKENS + kept, shape)
            measured = base / seconds
            rows.append({
                "batch": batch, "retention": r, "kept": kept, "seq_len": TEXT_TOKENS + kept,
                "prefill_ms": seconds * 1e3, "speedup": measured, "analytic_speedup": analytic,
                "efficiency": measured / analytic,
                "tflops_7b": prefill_flops(TEXT_TOKENS + kept, shape) / 1e12,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    meta = {
        "device": args.device, "device_name": device_name, "dtype": str(dtype), "layers": layers,
        "threads": torch.get_num_threads(), "text_tokens": TEXT_TOKENS, "torch": torch.__version__,
    }  # fmt: skip
    target = [x for x in rows if x["retention"] == 0.1]
    meta["target_met"] = {str(x["batch"]): x["efficiency"] >= 0.8 for x in target}
    tag = "cuda" if on_gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
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
    (args.out / f"prefill_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
