"""Vision-path cost per method at real LLaVA-1.5 shapes (random weights), vs the released RC code.

Times ViT + CLIP text tower + compression + projector per method through the harness's own
``vision_side`` (the code ``generate`` runs), next to the vanilla tower (``get_image_features``)
and a re-creation of the released RC code's cost profile (batch 1 per image, a second ViT pass,
scikit-learn LOF, a Python loop over centres). Writes JSON and a markdown table.

    .venv/bin/python scripts/bench_vision_path.py --device cuda --batch-sizes 1 8 --reps 20

``--next``: LLaVA-NeXT (anyres) shapes. One ``LlavaNextForConditionalGeneration`` (CLIP-L/336
tower, the 1024 -> 4096 -> 4096 projector, real ``image_grid_pinpoints``, a 1-layer LLM stub
that never runs), a 672 x 672 image size, so 5 crops per image, and three cases on the same
pixels: ``vanilla_tower`` (stock ``get_image_features``: every crop in one tower batch,
projector, ``pack_image_features``), ``none`` (the harness's ``vision_side`` with the crops as
batch items, then ``pack``) and ``rc_paper`` (RC ``paper`` per crop at 64 / 576, the question
repeated per crop for the CLIP text tower, the kept rows packed in NeXT order by ``pack_kept``).
Measurement: torch threads pinned, a warm-up round of every case, then rounds in a freshly
shuffled case order; min / median / p90 per case; sanity check: ``vanilla_tower`` and ``none``
run the same computation, so their medians must agree within ``--tolerance``, else the run is
recorded as not valid. ``--smoke``: tiny shapes (seconds; for tests).

    .venv/bin/python scripts/bench_vision_path.py --next --batch-sizes 1 --reps 3   # CPU

Both modes now use this measurement (the LLaVA-1.5 mode's cases also run shuffled, under
``no_grad``: its vanilla case used to build an autograd graph, which inflated it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from bench_prefill import NEXT_PINPOINTS, PER_CROP

from recomp_eval.efficiency.benchmark import (
    agreement,
    machine_info,
    pin_threads,
    quiet_reps,
    summarize,
    time_interleaved,
)
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
    return model, tok, clip_text_tower(clip_tok, REAL_TEXT, 1024, dtype, device)


@dataclass(frozen=True)
class TextTower:
    """CLIP text tower sizes (and the joint-space width)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    projection: int


REAL_TEXT = TextTower(768, 3072, 12, 12, 768)  # CLIP-L/14 text half


def clip_text_tower(clip_tok, t: TextTower, vision_width: int, dtype, device) -> ClipText:
    """A random CLIP text tower with projection and a visual projection ``[C -> D]``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=t.hidden, intermediate_size=t.intermediate,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         max_position_embeddings=77, projection_dim=t.projection,
                         eos_token_id=clip_tok.eos_token_id)  # fmt: skip
    tower = CLIPTextModelWithProjection(cfg).to(device, dtype).eval()
    proj = torch.nn.Linear(vision_width, t.projection, bias=False).to(device, dtype).eval()
    return ClipText(tower, clip_tok, proj, "random-clip-text")


@dataclass(frozen=True)
class NextShapes:
    """A LLaVA-NeXT model's sizes for ``--next`` (the LLM is a 1-layer stub, never run)."""

    crop: int  # crop side (px)
    patch: int
    vision_width: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    llm_width: int  # E: the projector's output and image_newline
    llm_heads: int
    text: TextTower
    pinpoints: tuple[tuple[int, int], ...]
    image: tuple[int, int]  # (height, width) of every image


REAL_NEXT = NextShapes(336, 14, 1024, 4096, 24, 16, 4096, 32, REAL_TEXT,
                       tuple(tuple(p) for p in NEXT_PINPOINTS), (672, 672))  # fmt: skip
# tiny: 112 px crops (8 x 8 patches), the real pinpoints scaled by 1/3, a 224 x 224 image (5 crops)
SMOKE_NEXT = NextShapes(112, 14, 32, 64, 2, 2, 64, 4, TextTower(32, 64, 2, 2, 16),
                        tuple((h // 3, w // 3) for h, w in NEXT_PINPOINTS), (224, 224))  # fmt: skip


def build_next(shapes: NextShapes, dtype: torch.dtype, device: str):
    """``LlavaNextForConditionalGeneration`` at ``shapes`` (random weights), the tiny LLaVA
    fixture's tokenizers, and a random CLIP text tower."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from recomp_eval.models.llava.tiny import build_tiny

    folder = build_tiny()
    tok = AutoTokenizer.from_pretrained(folder)
    clip_tok = AutoTokenizer.from_pretrained(folder / "clip")
    vision = CLIPVisionConfig(hidden_size=shapes.vision_width,
                              intermediate_size=shapes.vision_intermediate,
                              num_hidden_layers=shapes.vision_layers,
                              num_attention_heads=shapes.vision_heads, image_size=shapes.crop,
                              patch_size=shapes.patch, projection_dim=shapes.text.projection)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=shapes.llm_width, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=shapes.llm_heads,
                       num_key_value_heads=shapes.llm_heads)  # fmt: skip
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=[list(p) for p in shapes.pinpoints],
        image_seq_length=(shapes.crop // shapes.patch) ** 2,
    )
    model = LlavaNextForConditionalGeneration(cfg).to(device, dtype).eval()
    clip = clip_text_tower(clip_tok, shapes.text, shapes.vision_width, dtype, device)
    return model, tok, clip


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

    def add_text_signal(self, bundle, tower_out, spec, questions, prompt_ids,
                        user_texts=()) -> None:  # fmt: skip
        texts = select_texts(spec.text, questions, prompt_ids, bundle.tokenizer,
                             bundle.image_token_id, user_texts)  # fmt: skip
        e_t = encode_texts(self.clip_text, texts, spec.text)  # [B,D]
        add_text_signal(tower_out, e_t, self.clip_text.visual_projection)


RAW_KEYS = ("ms", "warmup_ms", "cpu_ms", "orders", "loadavg")


def cpu_per_wall(timed: dict, label: str) -> float:
    """Median of this process's CPU ms over wall ms (about the thread count when idle)."""
    return statistics.median(c / w for c, w in zip(timed["cpu_ms"][label], timed["ms"][label]))


def _staged(fn, device: str):
    """A case for :func:`time_interleaved`: ``fn(timer)`` -> (per-stage ms, ``fn``'s result)."""

    def run():
        timer = StageTimer(device)
        result = fn(timer)
        return {"stages": timer.results_ms(), "result": result}

    return run


def _median_stages(extra: list[dict]) -> dict[str, float]:
    keys = extra[0]["stages"] if extra else {}
    return {k: statistics.median(e["stages"][k] for e in extra) for k in keys}


def sanity_line(check: dict) -> str:
    return f"Sanity (vanilla_tower vs none, the same computation): {check['message']}."


def main_llava15(args, dtype: torch.dtype, meta_base: dict) -> None:
    """The LLaVA-1.5 mode (576 patches per image), shuffled rounds, sanity-checked."""
    torch.manual_seed(args.seed)
    model, tok, clip_text = build_real_shapes(dtype, args.device)
    bundle = ModelBundle(model, tok, None, "bench", dtype, torch.device(args.device),
                         adapter=BenchAdapter(clip_text))  # fmt: skip
    size = model.config.vision_config.image_size
    rows, raw, sanity = [], [], {}
    for b in args.batch_sizes or [1, 8]:
        pixels = torch.randn(b, 3, size, size, device=args.device, dtype=dtype)
        prompt = render_prompt("llava15", QUESTION, tok)
        prompt_ids = [tok(prompt)["input_ids"]] * b

        def vanilla(timer, pixels=pixels):
            with timer.stage("vision"):
                model.model.get_image_features(pixel_values=pixels)

        cases = {"vanilla_tower": _staged(vanilla, args.device)}
        for label in args.methods:
            name, kw = METHODS[label]
            method = build_method(name, **kw)

            def run(timer, method=method, pixels=pixels, prompt_ids=prompt_ids):
                with compress(model, method, adapter=bundle.adapter) as probe:
                    vision_side(bundle, method, probe, pixels, timer,
                                questions=[QUESTION] * len(prompt_ids), prompt_ids=prompt_ids)  # fmt: skip

            cases[label] = _staged(run, args.device)
        cases["release_recreation"] = _staged(
            lambda timer, pixels=pixels, ids=prompt_ids: release_path(
                model, clip_text, pixels, ids, tok
            ),
            args.device,
        )
        with torch.no_grad():
            timed = time_interleaved(cases, args.warmup, args.reps, args.device, args.seed + b)
        raw.append({"batch": b, **{key: timed[key] for key in RAW_KEYS}})
        if "none" in timed["ms"]:
            sanity[str(b)] = agreement(timed["ms"]["vanilla_tower"], timed["ms"]["none"],
                                       args.tolerance)  # fmt: skip
        base = statistics.median(timed["ms"]["vanilla_tower"])
        for label, ms in timed["ms"].items():
            st = summarize(ms)
            stages = _median_stages(timed["extra"][label])
            rows.append({
                "batch": b, "case": label, "ms": st["median"], "ms_min": st["min"],
                "ms_p90": st["p90"], "x_vanilla": st["median"] / base,
                "cpu_per_wall": cpu_per_wall(timed, label),
                **{f"{k}_ms": v for k, v in stages.items()
                   if k in ("vision", "text", "compression")},
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    for b in args.batch_sizes or [1, 8]:
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
    out = Path(args.out or "results/bench/vision_path")
    out.parent.mkdir(parents=True, exist_ok=True)
    valid = all(x["valid"] for x in sanity.values()) if sanity else None
    meta = {**meta_base, "device": device_name, "dtype": str(dtype), "reps": args.reps,
            "warmup": args.warmup, "sanity": sanity, "measurement_valid": valid}  # fmt: skip
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1)
    )
    lines = [
        f"Device: {device_name}, {dtype}, median of {args.reps} (after {args.warmup} warm-up), "
        f"cases shuffled per round",
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
    lines += [""] + [f"B = {b}: {sanity_line(x)}" for b, x in sanity.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- LLaVA-NeXT (anyres) ---------------------------------------------------------------------


def pack_compressed(model, compressed, features, sizes, crops: list[int]) -> list[torch.Tensor]:
    """Per image the projected per-crop outputs in NeXT order: every row with a source patch
    goes where ``pack_kept`` puts that patch (newlines of the grid rows that keep a patch
    included), the rows without one (RC's summary token per crop) after them in crop order.

    ``features``: the ``sum K_i`` per-crop ``[T_c, E]`` rows of ``vision_side``; ``compressed``
    their :class:`Compressed` (``source`` per row).
    """
    from recomp_eval.models.llava_next.packing import pack_kept

    n = compressed.members.shape[-1]
    sources = compressed.source.tolist()
    out, c = [], 0
    for size, k in zip(sizes, crops):
        rows = features[c : c + k]
        width = rows[0].shape[-1]
        canvas = rows[0].new_zeros(k, n, width)  # pack_kept gathers from full [K,N,E] features
        keep = torch.zeros(k, n, dtype=torch.bool)
        tail = []
        for j, r in enumerate(rows):
            src = torch.tensor(sources[c + j][: r.shape[0]], dtype=torch.int64)
            has = src >= 0
            canvas[j, src[has].to(canvas.device)] = r[has.to(r.device)]
            keep[j, src[has]] = True
            tail.append(r[~has.to(r.device)])
        packed, _ = pack_kept(model, [canvas], [size], [keep])
        out.append(torch.cat([packed[0], *tail]))
        c += k
    return out


def main_next(args, dtype: torch.dtype, meta_base: dict) -> None:
    """``--next``: vanilla tower over 5 crops vs our ``none`` path vs RC ``paper`` per crop."""
    from recomp_eval.models.llava_next.packing import crops_per_image, pack, pack_layout

    shapes = SMOKE_NEXT if args.smoke else REAL_NEXT
    torch.manual_seed(args.seed)
    model, tok, clip_text = build_next(shapes, dtype, args.device)
    bundle = ModelBundle(model, tok, None, "bench-next", dtype, torch.device(args.device),
                         adapter=BenchAdapter(clip_text))  # fmt: skip
    n = (shapes.crop // shapes.patch) ** 2
    retention = args.per_crop / 576  # 64 / 576 of every crop (a budget of 64 at N = 576)
    methods = {"none": build_method("none"),
               "rc_paper": build_method("recomp", variant="paper", retention=retention)}  # fmt: skip
    layout = pack_layout(model, list(shapes.image))
    rows, raw, sanity, sanity_quiet, checks = [], [], {}, {}, {}
    for b in args.batch_sizes or ([1, 8] if args.device == "cuda" else [1]):
        sizes = [list(shapes.image)] * b
        image_sizes = torch.tensor(sizes, device=args.device)
        k = crops_per_image(model, sizes)
        g = torch.Generator().manual_seed(args.seed + b)
        pixels5 = torch.randn(b, k[0], 3, shapes.crop, shapes.crop, generator=g)
        pixels5 = pixels5.to(args.device, dtype)  # the processor's [B, K, 3, S, S]
        flat = pixels5.reshape(-1, *pixels5.shape[2:])  # the same pixels, crops as batch items
        prompt_ids = [tok(render_prompt("llava15", QUESTION, tok))["input_ids"]] * flat.shape[0]
        questions = [QUESTION] * flat.shape[0]  # the question repeated per crop

        def vanilla(timer, pixels5=pixels5, image_sizes=image_sizes):
            with timer.stage("vision"):
                out = model.model.get_image_features(pixel_values=pixels5, image_sizes=image_sizes)
            return out.pooler_output

        def ours(timer, method, flat=flat, sizes=sizes, k=k, prompt_ids=prompt_ids,
                 questions=questions):  # fmt: skip
            with compress(model, method, adapter=bundle.adapter) as probe:
                compressed, feats = vision_side(bundle, method, probe, flat, timer,
                                                questions=questions, prompt_ids=prompt_ids)  # fmt: skip
            with timer.stage("pack"):
                if method.name == "none":
                    per_image = [
                        torch.stack(feats[i * k[0] : (i + 1) * k[0]]) for i in range(len(k))
                    ]
                    return pack(model, per_image, sizes)
                return pack_compressed(model, compressed, feats, sizes, k)

        cases = {
            "vanilla_tower": _staged(vanilla, args.device),
            "none": _staged(lambda t: ours(t, methods["none"]), args.device),
            "rc_paper": _staged(lambda t: ours(t, methods["rc_paper"]), args.device),
        }
        with torch.no_grad():
            timed = time_interleaved(cases, args.warmup, args.reps, args.device, args.seed + b)
            # outputs of the last timed rep of each case (same pixels every rep)
            stock = timed["extra"]["vanilla_tower"][-1]["result"]
            mine = timed["extra"]["none"][-1]["result"]
            rc = timed["extra"]["rc_paper"][-1]["result"]
        diff = max(float((a.float() - m.float()).abs().max()) for a, m in zip(stock, mine))
        checks[str(b)] = {
            "none_vs_stock_max_abs_diff": diff,
            "none_packed_rows": [int(x.shape[0]) for x in mine],
            "stock_packed_rows": [int(x.shape[0]) for x in stock],
            "rc_packed_rows": [int(x.shape[0]) for x in rc],
        }
        for label in cases:  # strip the feature tensors before the record
            for e in timed["extra"][label]:
                e.pop("result", None)
        raw.append({"batch": b, **{key: timed[key] for key in RAW_KEYS},
                    "stages_ms": {lb: [e["stages"] for e in timed["extra"][lb]]
                                  for lb in cases}})  # fmt: skip
        sanity[str(b)] = agreement(timed["ms"]["vanilla_tower"], timed["ms"]["none"],
                                   args.tolerance)  # fmt: skip
        st = {label: summarize(ms) for label, ms in timed["ms"].items()}
        quiet = {} if args.device.startswith("cuda") else quiet_reps(timed, meta_base["threads"])
        q_med = {label: statistics.median(v) if v else None for label, v in quiet.items()}

        def q_ratio(label, base, q_med=q_med):
            return q_med[label] / q_med[base] if q_med.get(label) and q_med.get(base) else None

        if quiet.get("vanilla_tower") and quiet.get("none"):
            sanity_quiet[str(b)] = agreement(quiet["vanilla_tower"], quiet["none"], args.tolerance)
        for label in cases:
            stages = _median_stages(timed["extra"][label])
            rows.append({
                "batch": b, "crops": sum(k), "case": label, "ms_min": st[label]["min"],
                "ms_median": st[label]["median"], "ms_p90": st[label]["p90"],
                "x_vanilla": st[label]["median"] / st["vanilla_tower"]["median"],
                "x_vanilla_min": st[label]["min"] / st["vanilla_tower"]["min"],
                "x_none": st[label]["median"] / st["none"]["median"],
                "x_none_min": st[label]["min"] / st["none"]["min"],
                "cpu_per_wall": cpu_per_wall(timed, label),
                "quiet_n": len(quiet.get(label, [])), "quiet_median": q_med.get(label),
                "quiet_x_vanilla": q_ratio(label, "vanilla_tower"),
                "quiet_x_none": q_ratio(label, "none"),
                **{f"{s}_ms": v for s, v in stages.items()
                   if s in ("vision", "text", "compression", "pack")},
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    valid = all(x["valid"] for x in sanity.values())
    rc_rows = {r["batch"]: r for r in rows if r["case"] == "rc_paper"}
    target = {str(b): r["x_vanilla"] <= 1.10 for b, r in rc_rows.items()}
    meta = {
        **meta_base, "dtype": str(dtype), "mode": "next", "smoke": args.smoke,
        "shapes": asdict(shapes), "patches_per_crop": n, "per_crop": args.per_crop,
        "rc": methods["rc_paper"].config, "layout": {"image": list(shapes.image),
        "crops": layout.crops, "packed_rows": layout.length, "newlines": layout.newlines,
        "grid": list(layout.grid)}, "newlines_policy": "row (pack_kept default)",
        "summary_rows": "after the packed rows of their image, in crop order",
        "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
        "order": "shuffled per round (time_interleaved)", "checks": checks, "sanity": sanity,
        "sanity_quiet_reps": sanity_quiet, "quiet_rule": "CPU / wall >= 0.9 x threads",
        "measurement_valid": valid, "target": "rc_paper x vanilla_tower <= 1.10 (medians)",
        "target_met": target,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or f"results/bench/vision_path_next_{tag}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1)
    )
    dirty = " + uncommitted script changes" if meta.get("scripts_modified") else ""
    lines = [
        f"LLaVA-NeXT vision path, {'tiny smoke' if args.smoke else 'CLIP-L/336'} shapes, random "
        f"weights, {dtype}, {meta['device_name']} ({meta['cpu']}, {meta['threads']} threads), "
        f"torch {meta['torch']}, transformers {meta['transformers']}, commit "
        f"{meta['commit'][:7]}{dirty}.",
        f"Image {shapes.image[0]} x {shapes.image[1]} on pinpoints {list(shapes.pinpoints)}: "
        f"{layout.crops} crops x {n} patches, {layout.length} packed rows ({layout.newlines} "
        f"newlines). RC `paper` per crop at {args.per_crop} / 576 (question repeated per crop), "
        f"packed by `pack_kept` (newlines of the grid rows that keep a patch; the summary rows "
        f"after them).",
        f"{args.reps} timed rounds after {args.warmup} warm-up round(s) of every case, cases "
        f"shuffled per round, the same pixels for every case; ms min / median / p90.",
        "",
        "| B | crops | case | ms min / median / p90 | vision | text | compression | pack | "
        "x vanilla tower | x none | CPU / wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['crops']} | {r['case']} | {r['ms_min']:.0f} / "
            f"{r['ms_median']:.0f} / {r['ms_p90']:.0f} | {r.get('vision_ms', 0):.0f} | "
            f"{r.get('text_ms', 0):.1f} | {r.get('compression_ms', 0):.1f} | "
            f"{r.get('pack_ms', 0):.1f} | {r['x_vanilla']:.3f} ({r['x_vanilla_min']:.3f}) | "
            f"{r['x_none']:.3f} ({r['x_none_min']:.3f}) | {r['cpu_per_wall']:.2f} |"
        )
    lines.append("")
    lines.append(f"Ratios from medians (from minima in brackets). CPU / wall: this process's "
                 f"CPU time over wall time, median (about {meta['threads']} when it has the "
                 f"cores to itself, lower when other processes share them).")  # fmt: skip
    for b, x in sanity.items():
        c = checks[b]
        lines.append(f"- B = {b}: {sanity_line(x)} `none` output vs stock: max abs diff "
                     f"{c['none_vs_stock_max_abs_diff']:.2e}; packed rows stock "
                     f"{c['stock_packed_rows'][0]}, RC {c['rc_packed_rows']}.")  # fmt: skip
    for b, r in rc_rows.items():
        if r["quiet_x_vanilla"] is not None and r["quiet_x_none"] is not None:
            q = sanity_quiet.get(str(b))
            counts = ", ".join(f"{x['case']} {x['quiet_n']}" for x in rows if x["batch"] == b)
            lines.append(f"- B = {b}, quiet reps only (CPU / wall >= "
                         f"{0.9 * meta['threads']:.1f}; n = {counts}): "
                         f"rc_paper {r['quiet_x_vanilla']:.3f}x vanilla tower, "
                         f"{r['quiet_x_none']:.3f}x none"
                         f"{'; vanilla vs none ' + q['message'] if q else ''}.")  # fmt: skip
        met = "met" if target[str(b)] else "not met"
        lines.append(f"- B = {b}: target rc_paper <= 1.10x vanilla tower: {met} "
                     f"({r['x_vanilla']:.3f}x){'' if valid else ' (measurement not valid)'}.")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default float16 on cuda, float32 on cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="images per batch (default 1 8; --next on CPU: 1)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default results/bench/vision_path, "
                         "--next: results/bench/vision_path_next_<device>)")  # fmt: skip
    ap.add_argument("--next", action="store_true", help="LLaVA-NeXT anyres shapes (5 crops)")
    ap.add_argument("--smoke", action="store_true", help="--next: tiny shapes (tests)")
    ap.add_argument("--per-crop", type=int, default=PER_CROP, help="--next: RC tokens per crop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="weights, pixels and case order")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="sanity check: vanilla tower vs none medians within this fraction")  # fmt: skip
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype or ("float16" if args.device == "cuda" else "float32"))
    threads = pin_threads(args.threads)
    meta = {**machine_info(args.device, ("scripts/bench_vision_path.py",)),
            "threads_requested": threads}  # fmt: skip
    if args.next:
        return main_next(args, dtype, meta)
    return main_llava15(args, dtype, meta)


if __name__ == "__main__":
    main()
