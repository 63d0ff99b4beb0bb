"""Vision-path cost per method at real LLaVA-1.5 shapes (random weights), vs the released RC code.

Times ViT + CLIP text tower + compression + projector per method through the harness's own
``vision_side`` (the code ``generate`` runs), next to the vanilla tower (``get_image_features``)
and a re-creation of the released RC code's cost profile (batch 1 per image, a second ViT pass,
scikit-learn LOF, a Python loop over centres). Writes JSON and a markdown table.

    .venv/bin/python scripts/bench_vision_path.py --device cuda --batch-sizes 1 8 --reps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from recomp_eval.inject.context import compress
from recomp_eval.methods import TextSpec, build_method
from recomp_eval.models.base import ModelBundle
from recomp_eval.models.llava.adapter import LlavaAdapter, add_text_signal
from recomp_eval.models.llava.conversation import render_prompt
from recomp_eval.models.llava.loader import ClipText, resolve_dtype
from recomp_eval.pipeline import vision_side
from recomp_eval.signals.text import encode_texts, first_line, select_texts
from recomp_eval.signals.vision import capture_qk, cls_attention_concat, joint_space_similarity
from recomp_eval.timing import StageTimer

METHODS = {
    "rc_paper": ("recomp", {"variant": "paper"}),
    "rc_official": ("recomp", {"variant": "official"}),
    "prumerge": ("prumerge", {}),
    "visionzip": ("visionzip", {"retention": 64 / 576}),
    "fastervlm": ("fastervlm", {"retention": 0.1}),
    "none": ("none", {}),
}
QUESTION = "What is the man holding in his left hand?"
NEIGHBOURS, LOF_K, LOF_K_REST = 32, 20, 10


def build_real_shapes(dtype: torch.dtype, device: str):
    """LLaVA-1.5 vision tower + projector (tiny 1-layer LLM stub), CLIP-L text tower, tokenizers."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from recomp_eval.models.llava.tiny import build_tiny

    folder = build_tiny()
    tok = AutoTokenizer.from_pretrained(folder)
    clip_tok = AutoTokenizer.from_pretrained(folder / "clip")
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    # The LLM is never run here; a 1-layer stub keeps the projector's real 1024->4096->4096 shape.
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = LlavaForConditionalGeneration(cfg).to(device, dtype).eval()
    text_tower = (
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
                eos_token_id=clip_tok.eos_token_id,
            )
        )
        .to(device, dtype)
        .eval()
    )
    proj = torch.nn.Linear(1024, 768, bias=False).to(device, dtype).eval()
    return model, tok, ClipText(text_tower, clip_tok, proj, "random-clip-l")


def _lof_count(values: np.ndarray, k: int) -> int:
    from sklearn.neighbors import LocalOutlierFactor

    k = max(1, min(k, len(values) - 1))
    pred = LocalOutlierFactor(n_neighbors=k).fit_predict(values.reshape(-1, 1))
    return int((pred == -1).sum())


@torch.no_grad()
def release_path(model, clip_text, pixels, prompt_ids, tok) -> list[torch.Tensor]:
    """The released RC code's cost profile, one image at a time (it supports batch 1 only)."""
    tower = model.model.vision_tower
    last = tower.config.num_hidden_layers - 1
    outs = []
    for i in range(pixels.shape[0]):
        px = pixels[i : i + 1]
        with capture_qk(tower, [last], [last]) as cap:
            hs = tower(px, output_hidden_states=True).hidden_states
        feats = hs[-2][0, 1:]  # [N,C]
        a = cls_attention_concat(cap.q[last], cap.k[last])[0]  # [N]
        z = tower(px).last_hidden_state  # second ViT pass
        line = first_line(prompt_ids[i], tok, int(model.config.image_token_id))
        e_t = encode_texts(
            clip_text, [line], TextSpec(source="first_line", max_len=20, pool="last")
        )
        s = joint_space_similarity(e_t, z, clip_text.visual_projection)[0]  # [N]
        n, width = feats.shape
        a_np = a.float().cpu().numpy()
        k_v = int(n * _lof_count(a_np, LOF_K) / n)
        i_v = torch.topk(a, k_v).indices
        s = s.clone()
        s[i_v] = s.min()
        k_t = int((n - k_v) * _lof_count(s.float().cpu().numpy(), LOF_K) / n)
        i_t = torch.topk(s, k_t).indices
        keep = torch.sort(torch.cat([i_v, i_t])).values
        rest = torch.tensor([j for j in range(n) if j not in set(keep.tolist())], device=px.device)
        a_r = a[rest]
        m = min(
            int(width * _lof_count(a_r.float().cpu().numpy(), LOF_K_REST) / len(rest)), len(rest)
        )
        centres = torch.topk(a_r, m).indices
        keys = torch.nn.functional.normalize(cap.k[last][0, 1:], dim=-1)  # [N,C]
        t = 50 * s[rest]
        merged = []
        for c in centres.tolist():  # the release's per-centre loop
            others = torch.tensor([j for j in range(len(rest)) if j != c], device=px.device)
            score = keys[rest[others]] @ keys[rest[c]] + t[others]
            nbr = others[torch.topk(score, min(NEIGHBOURS, len(others))).indices]
            merged.append(feats[rest[c]] + (a_r[nbr, None] * feats[rest[nbr]]).sum(0))
        non = torch.ones(len(rest), dtype=torch.bool, device=px.device)
        non[centres] = False
        summary = (a_r[non, None] * feats[rest[non]]).sum(0, keepdim=True)
        out = torch.cat([feats[keep], *(x[None] for x in merged), summary])
        outs.append(model.model.multi_modal_projector(out))
    return outs


class BenchAdapter(LlavaAdapter):
    """The LLaVA adapter with the CLIP text tower built in memory (no checkpoint folder)."""

    def __init__(self, clip_text: ClipText) -> None:
        self.clip_text = clip_text

    def add_text_signal(self, bundle, tower_out, spec, questions, prompt_ids) -> None:
        texts = select_texts(spec.text, questions, prompt_ids, bundle.tokenizer,
                             bundle.image_token_id)  # fmt: skip
        e_t = encode_texts(self.clip_text, texts, spec.text)  # [B,D]
        add_text_signal(tower_out, e_t, self.clip_text.visual_projection)


def _time_interleaved(
    cases: dict, device: str, warmup: int, reps: int
) -> dict[str, tuple[float, dict[str, float]]]:
    """Median total and per-stage ms of every case, timed round-robin (case A, B, C, A, B, C, ...)
    so that drift in machine load affects all cases alike."""
    totals: dict[str, list[float]] = {k: [] for k in cases}
    stages: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    for r in range(warmup + reps):
        for label, fn in cases.items():
            timer = StageTimer(device)
            start = timer.mark()
            fn(timer)
            timer.add("total", start, timer.mark())
            res = timer.results_ms()
            if r >= warmup:
                totals[label].append(res.pop("total"))
                stages[label].append(res)
    out = {}
    for label in cases:
        keys = stages[label][0] if stages[label] else {}
        med = {k: statistics.median(s[k] for s in stages[label]) for k in keys}
        out[label] = (statistics.median(totals[label]), med)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default float16 on cuda, float32 on cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", default="results/bench/vision_path")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype or ("float16" if args.device == "cuda" else "float32"))
    torch.manual_seed(0)
    model, tok, clip_text = build_real_shapes(dtype, args.device)
    bundle = ModelBundle(model, tok, None, "bench", dtype, torch.device(args.device),
                         adapter=BenchAdapter(clip_text))  # fmt: skip
    size = model.config.vision_config.image_size
    rows = []
    for b in args.batch_sizes:
        pixels = torch.randn(b, 3, size, size, device=args.device, dtype=dtype)
        prompt = render_prompt("llava15", QUESTION, tok)
        prompt_ids = [tok(prompt)["input_ids"]] * b

        def vanilla(timer, pixels=pixels):
            with timer.stage("vision"):
                model.model.get_image_features(pixel_values=pixels)

        cases = {"vanilla_tower": vanilla}
        for label in args.methods:
            name, kw = METHODS[label]
            method = build_method(name, **kw)

            def run(timer, method=method, pixels=pixels, prompt_ids=prompt_ids):
                with compress(model, method, adapter=bundle.adapter) as probe:
                    vision_side(
                        bundle,
                        method,
                        probe,
                        pixels,
                        timer,
                        questions=[QUESTION] * len(prompt_ids),
                        prompt_ids=prompt_ids,
                    )

            cases[label] = run
        cases["release_recreation"] = lambda timer, pixels=pixels, ids=prompt_ids: release_path(
            model, clip_text, pixels, ids, tok
        )
        timed = _time_interleaved(cases, args.device, args.warmup, args.reps)
        base = timed["vanilla_tower"][0]
        for label, (total, stages) in timed.items():
            rows.append(
                {
                    "batch": b,
                    "case": label,
                    "ms": total,
                    "x_vanilla": total / base,
                    **{
                        f"{k}_ms": v
                        for k, v in stages.items()
                        if k in ("vision", "text", "compression")
                    },
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for b in args.batch_sizes:
        rel = next(r["ms"] for r in rows if r["batch"] == b and r["case"] == "release_recreation")
        for r in rows:
            if r["batch"] == b:
                r["speedup_vs_release"] = rel / r["ms"]
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name,
        "dtype": str(dtype),
        "reps": args.reps,
        "warmup": args.warmup,
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"Device: {device_name}, {dtype}, median of {args.reps} (after {args.warmup} warm-up)",
        "",
        "| B | case | total ms | vision | text | compression | x vanilla tower | "
        "speed-up vs release |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['case']} | {r['ms']:.1f} | {r.get('vision_ms', 0):.1f} | "
            f"{r.get('text_ms', 0):.1f} | {r.get('compression_ms', 0):.1f} | "
            f"{r['x_vanilla']:.2f} | {r['speedup_vs_release']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
