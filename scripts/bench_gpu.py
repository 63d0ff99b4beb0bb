"""Every GPU figure in one run (`make bench-gpu`): under 10 minutes on one H100/H200.

Four parts, in this order, each with its own time budget, under one global deadline
(``--budget-s``, default 540 s from the start of the process). A part starts only while enough
of the deadline is left for it (else it is recorded as ``skipped``), stops its sub-steps early
past its own budget (``partial``) and is interrupted at a hard limit (``timed out``) that never
lies past the deadline; a part that raises is recorded as ``failed`` and the next one runs. The
JSON is rewritten after every part, so a run that is killed still leaves what it measured.

- ``compression``: every registered pre-LLM method at B = 1 and 8 (N = 576, C = 1024, fp16)
  against the loop port of the released RC code (``recomp_eval/rc_oracle.py``) run on the same
  device, and on the CPU as the release runs its scikit-learn LOF; one CLIP ViT-L/14-336 pass
  for scale. Target: RC ``official`` with the torch LOF >= 20x the loop on CUDA. Sanity: that
  case timed twice.
- ``vision``: ViT + CLIP text tower + compression + projector at LLaVA-1.5 shapes, fp16,
  through the harness's ``vision_side``, next to the vanilla tower and the release's profile
  (``bench_vision_path.release_path``: two ViT passes, scikit-learn LOF, loops). Target: RC
  ``paper`` <= 1.05x our ``none`` path; its speed-up against the release is reported. Sanity:
  the vanilla tower and our ``none`` path (the same computation).
- ``prefill``: a 32-layer LLaVA-1.5-7B-shape decoder (random weights, fp16), 40 text + K
  visual tokens for K in 576, 288, 144, 58, 29, B = 1, 8, 32: prefill speed-up against the
  analytic (SwiGLU) FLOPs ratio, decode ms per token after each prefill, peak memory. Target:
  measured / analytic >= 0.9 at K = 58, B = 32. Sanity: K = 58 timed twice.
- ``e2e``: a random-weight 7B-shape LLaVA checkpoint folder built on the fly in the real
  llava-hf layout (the hub's tokenizer, processor and chat-template files from
  ``tests/data/checkpoints``, 32 LLM / 24 vision / 12 CLIP-text layers, fp16 weights under the
  hub's tensor names), lmms-eval's own POPE task over SynthVQA: lmms-eval's ``llava_hf`` at
  batch 1 against our plugin (``recomp_llava``) at batch 1 / 16 / 32, ``none`` and RC
  ``paper`` at 10 %. Throughput from the time spent in ``generate_until`` (the model's work;
  lmms-eval's own overhead is recorded next to it). Target: >= 4x ``llava_hf`` at batch 16.
  Sanity: our ``none`` at batch 16 timed twice; predictions compared with ``llava_hf``'s.

Measurement: ``recomp_eval/efficiency/benchmark.py`` (interleaved shuffled rounds after
warm-up rounds, CUDA events on a GPU, min / median / p90, ``agreement`` sanity checks,
machine info). Writes ``results/bench/gpu/bench_gpu.json`` and ``.md`` (``--out`` sets the
stem); ``python scripts/update_bench_docs.py`` fills the docs table from the JSON.

    python scripts/bench_gpu.py                           # one H100/H200
    python scripts/bench_gpu.py --parts prefill e2e --budget-s 300
    python scripts/bench_gpu.py --smoke --out /tmp/bench_gpu_smoke   # CPU, tiny shapes, seconds

``--smoke`` runs every part at tiny shapes on the CPU (what ``tests/test_bench_gpu.py`` runs,
so the script cannot rot between GPU visits); without it the script stops at once when CUDA is
unavailable.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the global deadline counts from here when run as a script

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CHECKPOINTS = ROOT / "tests" / "data" / "checkpoints"
LLAVA_HUB = CHECKPOINTS / "llava-1.5-7b-hf"
CLIP_HUB = CHECKPOINTS / "clip-vit-large-patch14-336"
DEFAULT_OUT = ROOT / "results" / "bench" / "gpu" / "bench_gpu"
SMOKE_OUT = ROOT / "results" / "bench" / "gpu_smoke_cpu" / "bench_gpu"
SCHEMA = "bench_gpu/1"
PARTS = ("compression", "vision", "prefill", "e2e")
NO_CUDA = ("bench_gpu: CUDA is not available (torch {torch}, CUDA build {cuda}); run it on a "
           "machine with an NVIDIA GPU and a CUDA build of torch (e.g. pip install torch==2.13.0 "
           "--index-url https://download.pytorch.org/whl/cu128), or pass --smoke for the CPU "
           "smoke run")  # fmt: skip

# Seconds per part on one H100/H200: the budget past which a part stops its sub-steps, the
# estimate it was sized from (see ESTIMATE_BASIS) and the least time left that a part needs to
# start. The hard limit of a part is 1.5x its budget, never past the global deadline.
BUDGET_S = {"compression": 60.0, "vision": 75.0, "prefill": 120.0, "e2e": 270.0}
ESTIMATE_GPU_S = {"compression": 30.0, "vision": 40.0, "prefill": 70.0, "e2e": 170.0}
MIN_START_S = {"compression": 15.0, "vision": 20.0, "prefill": 30.0, "e2e": 90.0}
SMOKE_BUDGET_S = dict.fromkeys(PARTS, 60.0)
SMOKE_MIN_START_S = dict.fromkeys(PARTS, 1.0)
ESTIMATE_BASIS = {
    "compression": "15 methods + 2 release loops + one ViT-L pass, 24 rounds at B = 1 and 8; "
    "the loop about 10 ms per image on CUDA (about 700 aten calls per image at these inputs, "
    "of which about 150 launch kernels, some 15 syncs, three scikit-learn LOF fits on the "
    "CPU: counted with torch.profiler on the CPU), the methods milliseconds; about 10 s of "
    "CUDA start-up and model build",
    "vision": "5 cases x 13 rounds at B = 1 and 8: a ViT-L/14-336 fp16 pass about 5 ms at "
    "B = 1 and 15 ms at B = 8, the release profile about 20 ms per image (two B = 1 passes, "
    "three LOF fits, the centre loop); about 10 s to build the tower, text tower and projector",
    "prefill": "7B fp16 prefill at about 600 TFLOP/s: 32 x 616 tokens (264 TFLOPs) about "
    "0.45 s; 6 cases x 7 rounds x 3 batch sizes, each with 8 decode steps (about 25 ms a "
    "step, launch-bound), and one memory pass per case; about 10 s to build the decoder",
    "e2e": "7B fp16 init on the GPU + 15 GB of safetensors written about 30 s; two loads "
    "from the page cache about 15 s each; llava_hf at batch 1 about 0.25 s a sample "
    "(8 new tokens) x 64, ours at batch 1 about the same for none and for RC, batches "
    "16 / 32 a few seconds each, warm-ups a few seconds",
}

# What each part runs, on a GPU and in --smoke (tiny shapes on the CPU).
CLIP_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}  # fmt: skip
CLIP_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "image_size": 112, "patch_size": 14}  # fmt: skip
GPU: dict[str, dict[str, Any]] = {
    "compression": {"n": 576, "width": 1024, "heads": 16, "projected": 4096, "joint": 768,
                    "batches": [1, 8], "warmup": 3, "reps": 20, "vit": CLIP_L,
                    "target": "recomp[official,lof=torch]", "target_x": 20.0},
    "vision": {"vision": CLIP_L, "text": {"hidden": 768, "intermediate": 3072, "layers": 12,
                                          "heads": 12, "projection": 768},
               "llm_width": 4096, "llm_heads": 32, "batches": [1, 8], "warmup": 2, "reps": 10,
               "methods": ["none", "rc_paper", "rc_official"], "target_x_none": 1.05},
    "prefill": {"decoder": "llava-1.5-7b", "layers": 32, "batches": [1, 8, 32],
                "retentions": [1.0, 0.5, 0.25, 0.1, 0.05], "repeat": 0.1, "decode_tokens": 8,
                "warmup": 2, "reps": 5, "target_batch": 32, "target_efficiency": 0.9},
    "e2e": {"size": "real", "depths": {"text": 32, "vision": 24, "clip_text": 12},
            "samples": 64, "max_new_tokens": 8, "batches": [16, 32, 1], "target_batch": 16,
            "target_x": 4.0, "rc": {"variant": "paper", "retention": 0.1}},
}  # fmt: skip
SMOKE: dict[str, dict[str, Any]] = {
    "compression": {**GPU["compression"], "n": 64, "width": 64, "heads": 4, "projected": 128,
                    "joint": 32, "batches": [1, 2], "warmup": 1, "reps": 2, "vit": CLIP_TINY},
    "vision": {**GPU["vision"], "vision": CLIP_TINY,
               "text": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2,
                        "projection": 16},
               "llm_width": 64, "llm_heads": 4, "batches": [1, 2], "warmup": 1, "reps": 2},
    "prefill": {**GPU["prefill"], "decoder": "tiny", "layers": 2, "batches": [1, 2],
                "decode_tokens": 2, "warmup": 1, "reps": 2, "target_batch": 2},
    "e2e": {**GPU["e2e"], "size": "small", "depths": None, "samples": 2, "max_new_tokens": 2},
}  # fmt: skip


class PartTimeout(BaseException):
    """Raised by the alarm at a part's hard limit (a BaseException: no ``except Exception``
    inside a library swallows it)."""


class Context:
    """Device, settings and the clocks of one run."""

    def __init__(self, args: argparse.Namespace, start: float) -> None:
        import torch

        self.args, self.smoke = args, args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else torch.float16
        self.settings = SMOKE if args.smoke else GPU
        self.budgets = SMOKE_BUDGET_S if args.smoke else BUDGET_S
        self.min_start = SMOKE_MIN_START_S if args.smoke else MIN_START_S
        self.deadline = start + args.budget_s
        self.part_deadline = self.deadline
        self.seed, self.tolerance = args.seed, args.tolerance
        self.work = Path(args.work) if args.work else None

    def left(self) -> float:
        """Seconds left in the current part (its budget, within the global deadline)."""
        return min(self.part_deadline, self.deadline) - time.monotonic()

    def global_left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, need: float = 0.0) -> bool:
        return self.left() < need


# --- shared helpers --------------------------------------------------------------------------


def _script(name: str) -> Any:
    """The sibling ``scripts/<name>.py`` as the module ``name`` (imported once, with
    ``scripts/`` on ``sys.path`` only while it loads, as ``tests/conftest.scripts_module``
    does: its own imports of sibling scripts resolve the same way)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check(name: str, batch: Any, a_ms: list[float], b_ms: list[float], tol: float) -> dict:
    from recomp_eval.efficiency.benchmark import agreement

    return {"check": name, "batch": batch, **agreement(a_ms, b_ms, tol)}


def _target(name: str, batch: Any, value: float | None, op: str,
            threshold: float | None) -> dict:  # fmt: skip
    met = None
    if value is not None and threshold is not None:
        met = bool(value <= threshold) if op == "<=" else bool(value >= threshold)
    return {"name": name, "batch": batch, "value": value, "op": op, "threshold": threshold,
            "met": met}  # fmt: skip


def _raw(timed: dict[str, Any]) -> dict[str, Any]:
    return {k: timed[k] for k in ("ms", "warmup_ms", "orders", "loadavg")}


def _runnable(cases: dict[str, Callable[[], Any]], notes: list[str], where: str) -> dict:
    """The cases that run once without an error (a method under construction is noted and
    left out, never stops the part); the call doubles as an extra warm-up."""
    ok = {}
    for label, fn in cases.items():
        try:
            fn()
        except Exception as err:  # recorded, the part goes on
            notes.append(f"{label} {where}: failed ({type(err).__name__}: {err})"[:300])
            continue
        ok[label] = fn
    return ok


def _discard(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` without its result (``time_interleaved`` keeps what a case returns, per rep)."""

    def run() -> None:
        fn()

    return run


def load_real_layout():
    """``tests/real_layout.py`` (the real llava-hf layout's configs, names and files)."""
    if "real_layout" in sys.modules:
        return sys.modules["real_layout"]
    path = ROOT / "tests" / "real_layout.py"
    spec = importlib.util.spec_from_file_location("real_layout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_layout"] = module
    spec.loader.exec_module(module)
    return module


# --- compression -----------------------------------------------------------------------------


def compression_signals(batch: int, c: dict, device: str, dtype, key_width: int):
    """``bench_compression.make_signals`` at the shapes of ``c`` (N, C, E, D)."""
    import torch

    from recomp_eval.methods import VisionSignals
    from recomp_eval.rc_oracle import make_inputs

    x = make_inputs(seed=0, batch=batch, n=c["n"], width=c["width"])
    w = c["width"]

    def lin(seed: int, out: int) -> Any:
        return torch.randn(w, out, generator=torch.Generator().manual_seed(seed)) / w**0.5

    return VisionSignals(
        features=x["features"].to(device, dtype),
        cls_attn=x["attn"].to(device, dtype),
        keys=x["keys"][..., :key_width].to(device, dtype),
        text_sim=x["text_sim"].to(device, dtype),
        cls_feature=x["features"][:, 0].to(device, dtype),
        seeds=torch.arange(batch, device=device),
        projected=(x["features"] @ lin(1, c["projected"])).to(device, dtype),
        patch_embeds=(x["features"] @ lin(2, c["joint"])).to(device),
        text_embeds=torch.randn(batch, 1, c["joint"],
                                generator=torch.Generator().manual_seed(3)).to(device, dtype),
    )  # fmt: skip


def part_compression(ctx: Context, rec: dict[str, Any]) -> None:
    import torch

    build_all = _script("bench_compression").build_all
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from recomp_eval.efficiency.benchmark import summarize, time_interleaved
    from recomp_eval.rc_oracle import rc_single

    c, dev, dtype = ctx.settings["compression"], ctx.device, ctx.dtype
    methods, notes = build_all()
    target = c["target"]
    rec.update(config=c, notes=notes, methods=list(methods), raw=[],
               description=f"N = {c['n']}, C = {c['width']}, {dtype}; ratios against the "
               f"release loop on {dev} (index lists on the device, fp32) and on the CPU "
               f"(fp32, scikit-learn LOF), one image at a time; {c['reps']} rounds after "
               f"{c['warmup']} warm-up round(s), cases shuffled per round.")  # fmt: skip
    torch.manual_seed(ctx.seed)
    with torch.device(dev):
        vit = CLIPVisionModel._from_config(CLIPVisionConfig(**c["vit"]), dtype=dtype).eval()
    for b in c["batches"]:
        if ctx.expired():
            rec["truncated"] = f"B >= {b} not run (part budget)"
            break
        full = compression_signals(b, c, dev, dtype, c["width"])
        heads = compression_signals(b, c, dev, dtype, c["width"] // c["heads"])
        cases: dict[str, Callable[[], Any]] = {}
        for label, method in methods.items():
            sig = heads if method.spec.keys == "mean_heads" else full
            cases[label] = lambda m=method, s=sig: m(s)
        if target in cases:
            cases[f"{target}#repeat"] = cases[target]
        f32 = [t.float() for t in (full.features, full.cls_attn, full.keys, full.text_sim)]
        cpu = [t.cpu() for t in f32]

        def loop_device(f32=f32, b=b):  # the loop's index lists follow its inputs' device
            return [rc_single(*(t[i] for t in f32)) for i in range(b)]

        def loop_cpu(cpu=cpu, b=b):
            return [rc_single(*(t[i] for t in cpu)) for i in range(b)]

        pixels = torch.randn(b, 3, c["vit"]["image_size"], c["vit"]["image_size"], device=dev,
                             dtype=dtype)  # fmt: skip
        cases["release loop (device)"] = loop_device
        cases["release loop (CPU)"] = loop_cpu
        cases["CLIP ViT pass"] = lambda px=pixels: vit(pixel_values=px, output_hidden_states=True)
        cases = {label: _discard(fn) for label, fn in cases.items()}
        with torch.no_grad():
            cases = _runnable(cases, notes, f"at B = {b}")
            timed = time_interleaved(cases, c["warmup"], c["reps"], dev, ctx.seed + b)
        rec["raw"].append({"batch": b, **_raw(timed)})
        st = {label: summarize(ms) for label, ms in timed["ms"].items()}
        loop_d = st.get("release loop (device)", {}).get("median")
        loop_c = st.get("release loop (CPU)", {}).get("median")
        vit_ms = st.get("CLIP ViT pass", {}).get("median")
        for label, s in st.items():
            rec["rows"].append({
                "method": label, "batch": b, "ms_median": s["median"], "ms_min": s["min"],
                "ms_p90": s["p90"], "n": s["n"],
                "x_vs_release_device": loop_d / s["median"] if loop_d else None,
                "x_vs_release_cpu": loop_c / s["median"] if loop_c else None,
                "pct_of_vit": 100 * s["median"] / vit_ms if vit_ms else None,
            })  # fmt: skip
        if f"{target}#repeat" in timed["ms"]:
            rec["sanity"].append(_check(f"{target} timed twice", b,
                                        timed["ms"][f"{target}#repeat"], timed["ms"][target],
                                        ctx.tolerance))  # fmt: skip
        x = loop_d / st[target]["median"] if loop_d and target in st else None
        rec["targets"].append(_target(f"{target} x the release loop on {dev}", b, x, ">=",
                                      c["target_x"]))  # fmt: skip


# --- vision path -----------------------------------------------------------------------------


def build_vision(v: dict, dtype, device: str):
    """``bench_vision_path.build_real_shapes`` at the sizes of ``v``, with the hub's LLaVA-1.5
    and CLIP tokenizers: tower + projector (a 1-layer LLM stub that never runs), CLIP text
    tower."""
    import torch

    vp = _script("bench_vision_path")
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(LLAVA_HUB)
    clip_tok = AutoTokenizer.from_pretrained(CLIP_HUB)
    text = vp.TextTower(**v["text"])
    vision = CLIPVisionConfig(**v["vision"], projection_dim=text.projection)
    llm = LlamaConfig(vocab_size=32064, hidden_size=v["llm_width"], intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=v["llm_heads"],
                      num_key_value_heads=v["llm_heads"])  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=llm,
                      image_token_index=tok.convert_tokens_to_ids("<image>"))  # fmt: skip
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    return model, tok, vp.clip_text_tower(clip_tok, text, v["vision"]["hidden_size"], dtype, device)


def part_vision(ctx: Context, rec: dict[str, Any]) -> None:
    import torch

    vp = _script("bench_vision_path")
    METHODS, QUESTION, BenchAdapter = vp.METHODS, vp.QUESTION, vp.BenchAdapter
    _median_stages, _staged, release_path = vp._median_stages, vp._staged, vp.release_path

    from recomp_eval.efficiency.benchmark import summarize, time_interleaved
    from recomp_eval.inject.context import compress
    from recomp_eval.methods import build_method
    from recomp_eval.models.base import ModelBundle
    from recomp_eval.models.llava.conversation import render_prompt
    from recomp_eval.pipeline import vision_side

    v, dev, dtype = ctx.settings["vision"], ctx.device, ctx.dtype
    torch.manual_seed(ctx.seed)
    model, tok, clip_text = build_vision(v, dtype, dev)
    bundle = ModelBundle(model, tok, None, "bench-gpu", dtype, torch.device(dev),
                         adapter=BenchAdapter(clip_text))  # fmt: skip
    size = v["vision"]["image_size"]
    notes: list[str] = []
    rec.update(config=v, notes=notes, raw=[],
               description=f"CLIP ViT {v['vision']['hidden_size']}-wide x "
               f"{v['vision']['num_hidden_layers']} layers at {size} px, text tower "
               f"{v['text']['layers']} layers, projector to {v['llm_width']}, {dtype}, random "
               f"weights; {v['reps']} rounds after {v['warmup']} warm-up round(s), cases "
               f"shuffled per round.")  # fmt: skip
    for b in v["batches"]:
        if ctx.expired():
            rec["truncated"] = f"B >= {b} not run (part budget)"
            break
        pixels = torch.randn(b, 3, size, size, device=dev, dtype=dtype)
        prompt_ids = [tok(render_prompt("llava15", QUESTION, tok))["input_ids"]] * b

        def vanilla(timer, pixels=pixels):
            with timer.stage("vision"):
                model.model.get_image_features(pixel_values=pixels)

        cases = {"vanilla_tower": _staged(vanilla, dev)}
        for label in v["methods"]:
            name, kw = METHODS[label]
            method = build_method(name, **kw)

            def run(timer, method=method, pixels=pixels, prompt_ids=prompt_ids):
                with compress(model, method, adapter=bundle.adapter) as probe:
                    vision_side(bundle, method, probe, pixels, timer,
                                questions=[QUESTION] * len(prompt_ids), prompt_ids=prompt_ids)  # fmt: skip

            cases[label] = _staged(run, dev)
        cases["release_recreation"] = _staged(
            lambda timer, pixels=pixels, ids=prompt_ids: release_path(
                model, clip_text, pixels, ids, tok
            ),
            dev,
        )
        with torch.no_grad():
            cases = _runnable(cases, notes, f"at B = {b}")
            timed = time_interleaved(cases, v["warmup"], v["reps"], dev, ctx.seed + b)
        rec["raw"].append({"batch": b, **_raw(timed),
                           "stages_ms": {lb: [e["stages"] for e in timed["extra"][lb]]
                                         for lb in cases}})  # fmt: skip
        st = {label: summarize(ms) for label, ms in timed["ms"].items()}
        med = {label: s["median"] for label, s in st.items()}
        for label, s in st.items():
            stages = _median_stages(timed["extra"][label])
            rec["rows"].append({
                "batch": b, "case": label, "ms_median": s["median"], "ms_min": s["min"],
                "ms_p90": s["p90"], "n": s["n"],
                "x_none": s["median"] / med["none"] if "none" in med else None,
                "x_vanilla": s["median"] / med["vanilla_tower"],
                "speedup_vs_release": (med["release_recreation"] / s["median"]
                                       if "release_recreation" in med else None),
                **{f"{k}_ms": stages.get(k) for k in ("vision", "text", "compression")},
            })  # fmt: skip
        if "none" in timed["ms"]:
            rec["sanity"].append(_check("vanilla tower vs our none path (the same computation)",
                                        b, timed["ms"]["vanilla_tower"], timed["ms"]["none"],
                                        ctx.tolerance))  # fmt: skip
        rc = med.get("rc_paper")
        rec["targets"].append(_target("RC paper x our none path", b,
                                      rc / med["none"] if rc and "none" in med else None, "<=",
                                      v["target_x_none"]))  # fmt: skip
        rel = med.get("release_recreation")
        rec["targets"].append(_target("RC paper speed-up vs the release profile", b,
                                      rel / rc if rc and rel else None, ">=", None))  # fmt: skip


# --- prefill ---------------------------------------------------------------------------------


def build_decoder(p: dict, dtype, device: str):
    """The 7B-shape decoder of ``bench_prefill`` (``layers`` deep), or a tiny one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if p["decoder"] != "tiny":
        return _script("bench_prefill").build(p["layers"], dtype, device)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=p["layers"], vocab_size=128,
                      max_position_embeddings=4096)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def part_prefill(ctx: Context, rec: dict[str, Any]) -> None:
    import torch

    bp = _script("bench_prefill")
    N_PATCHES, TEXT_TOKENS = bp.N_PATCHES, bp.TEXT_TOKENS

    from recomp_eval.efficiency.benchmark import summarize, time_interleaved
    from recomp_eval.efficiency.flops import DecoderShape, prefill_flops
    from recomp_eval.methods.base import budget_from_ratio
    from recomp_eval.timing import StageTimer

    p, dev, dtype = ctx.settings["prefill"], ctx.device, ctx.dtype
    torch.manual_seed(ctx.seed)
    model = build_decoder(p, dtype, dev)
    shape = DecoderShape.from_config(model.config)
    cuda = dev.startswith("cuda")
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    steps = p["decode_tokens"]
    visual = {f"K={budget_from_ratio(r, N_PATCHES)}": budget_from_ratio(r, N_PATCHES)
              for r in p["retentions"]}  # fmt: skip
    k_rep = budget_from_ratio(p["repeat"], N_PATCHES)
    visual[f"K={k_rep}#repeat"] = k_rep
    full = f"K={N_PATCHES}"
    rec.update(config=p, raw=[], weights_gib=weights_gib, text_tokens=TEXT_TOKENS,
               shape={"hidden": shape.hidden, "intermediate": shape.intermediate,
                      "layers": shape.layers, "kv_hidden": shape.kv_hidden},
               description=f"{p['decoder']} decoder shape, {shape.layers} layers, {dtype}, "
               f"random weights; {TEXT_TOKENS} text + K visual tokens through inputs_embeds "
               f"(logits_to_keep=1), then {steps} greedy decode steps on the cache; "
               f"{p['reps']} rounds after {p['warmup']} warm-up round(s), cases shuffled per "
               f"round; speed-up of the prefill stage against K = {N_PATCHES}; peak memory "
               f"from one extra pass per case (weights "
               f"{'n/a' if weights_gib is None else f'{weights_gib:.1f} GiB'}).")  # fmt: skip
    vocab = model.config.vocab_size
    # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")  # fmt: skip

    def case(x, mask):
        @torch.inference_mode()
        def run():
            timer = StageTimer(dev)
            with timer.stage("prefill"):
                out = model(inputs_embeds=x, attention_mask=mask, use_cache=True,
                            logits_to_keep=1)  # fmt: skip
            with timer.stage("decode"):
                cache, m = _cache_of(out), mask
                token = out.logits[:, -1].argmax(-1, keepdim=True) % vocab
                for _ in range(steps):
                    m = torch.cat([m, m[:, :1]], dim=1)
                    out = model(input_ids=token, attention_mask=m, use_cache=True,
                                **{cache_kw: cache})  # fmt: skip
                    cache, token = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
            return timer.results_ms()

        return run

    for b in p["batches"]:
        if ctx.expired():
            rec["truncated"] = f"B >= {b} not run (part budget)"
            break
        g = torch.Generator().manual_seed(ctx.seed + b)
        longest = TEXT_TOKENS + max(visual.values())
        embeds = (torch.randn(b, longest, shape.hidden, generator=g) * 0.02).to(dev, dtype)
        cases = {}
        for label, k in visual.items():
            x = embeds[:, : TEXT_TOKENS + k].contiguous()
            cases[label] = case(x, torch.ones(x.shape[:2], dtype=torch.long, device=dev))
        timed = time_interleaved(cases, p["warmup"], p["reps"], dev, ctx.seed + b)
        stage = {label: {s: [e[s] for e in timed["extra"][label]] for s in ("prefill", "decode")}
                 for label in cases}  # fmt: skip
        rec["raw"].append({"batch": b, **_raw(timed), "stages_ms": stage})
        peaks: dict[str, float | None] = dict.fromkeys(cases)
        if cuda and not ctx.expired():
            for label, fn in cases.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                peaks[label] = torch.cuda.max_memory_allocated() / 2**30
        base = summarize(stage[full]["prefill"])["median"]
        for label, k in visual.items():
            s = summarize(stage[label]["prefill"])
            analytic = (prefill_flops(TEXT_TOKENS + N_PATCHES, shape)
                        / prefill_flops(TEXT_TOKENS + k, shape))  # fmt: skip
            decode = statistics.median(stage[label]["decode"]) / steps if steps else None
            rec["rows"].append({
                "batch": b, "case": label, "visual_tokens": k, "seq_len": TEXT_TOKENS + k,
                "prefill_ms_median": s["median"], "prefill_ms_min": s["min"],
                "prefill_ms_p90": s["p90"], "speedup": base / s["median"],
                "speedup_min": summarize(stage[full]["prefill"])["min"] / s["min"],
                "analytic_speedup": analytic, "efficiency": base / s["median"] / analytic,
                "decode_ms_per_token": decode, "peak_gib": peaks[label],
                "tflops_per_sample": prefill_flops(TEXT_TOKENS + k, shape) / 1e12,
            })  # fmt: skip
        rec["sanity"].append(_check(f"K = {k_rep} prefill timed twice", b,
                                    stage[f"K={k_rep}#repeat"]["prefill"],
                                    stage[f"K={k_rep}"]["prefill"], ctx.tolerance))  # fmt: skip
        if b == p["target_batch"]:
            row = next(r for r in rec["rows"] if r["batch"] == b and r["case"] == f"K={k_rep}")
            rec["targets"].append(_target(f"prefill measured / analytic speed-up at K = {k_rep}",
                                          b, row["efficiency"], ">=", p["target_efficiency"]))  # fmt: skip
    if not any(t["batch"] == p["target_batch"] for t in rec["targets"]):
        rec["targets"].append(_target(f"prefill measured / analytic speed-up at K = {k_rep}",
                                      p["target_batch"], None, ">=", p["target_efficiency"]))  # fmt: skip


# --- end to end ------------------------------------------------------------------------------


def build_checkpoint(dest: Path, size: str, depths: dict[str, int] | None, device: str) -> dict:
    """A random-weight LLaVA-1.5 folder in the real llava-hf layout (as
    ``tests/real_layout.build_real_layout``, whose configs, names and files it reuses), with
    the depths of ``depths`` (None: the size's own) and the weights made in fp16 directly on
    ``device`` (a 7B model in seconds on a GPU), then saved under the hub's tensor names."""
    import torch
    from transformers import CLIPConfig, CLIPModel, LlavaConfig, LlavaForConditionalGeneration

    rl = load_real_layout()
    dest.mkdir(parents=True)
    cfg = rl.llava_config(size)
    if depths:
        cfg["text_config"]["num_hidden_layers"] = depths["text"]
        cfg["vision_config"]["num_hidden_layers"] = depths["vision"]
    torch.manual_seed(rl.SEED)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            LlavaConfig.from_dict(copy.deepcopy(cfg)), dtype=torch.float16
        ).eval()
    with torch.no_grad():
        for p in (*model.model.language_model.parameters(), model.lm_head.weight):
            if p.dim() > 1:
                p.mul_(rl.WEIGHT_SCALE)
    rl._save_shards({rl.hub_name(k): v for k, v in model.state_dict().items()}, dest,
                    rl.NUM_SHARDS)  # fmt: skip
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in rl.LLAVA_FILES:
        shutil.copyfile(rl.LLAVA_HUB / name, dest / name)
    shutil.copyfile(rl.LLAVA_HUB / "chat_template.json", dest / "chat_template.json")
    clip_cfg = rl.clip_config(cfg, size)
    if depths:
        clip_cfg["text_config"]["num_hidden_layers"] = depths["clip_text"]
    (dest / "clip").mkdir()
    torch.manual_seed(rl.SEED + 1)
    with torch.device(device):
        clip = CLIPModel._from_config(CLIPConfig.from_dict(copy.deepcopy(clip_cfg)),
                                      dtype=torch.float16).eval()  # fmt: skip
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(dest / "clip" / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    (dest / "clip" / "config.json").write_text(json.dumps(clip_cfg, indent=2) + "\n")
    for name in rl.CLIP_FILES:
        shutil.copyfile(rl.CLIP_HUB / name, dest / "clip" / name)
    text = model.config.text_config
    record = {"size": size, "seed": rl.SEED, "weight_scale": rl.WEIGHT_SCALE,
              "text_layers": text.num_hidden_layers, "hidden": text.hidden_size,
              "vision_layers": cfg["vision_config"]["num_hidden_layers"],
              "clip_text_layers": clip_cfg["text_config"]["num_hidden_layers"],
              "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
              "bytes": sum(f.stat().st_size for f in dest.rglob("*.safetensors"))}  # fmt: skip
    (dest / "real_layout.json").write_text(json.dumps(record, indent=2) + "\n")
    del model, clip
    _free()
    return record


def _evaluate(model: Any, tasks_dir: Path, task: str, limit: int, batch: int,
              device: str) -> tuple[dict, float, float]:  # fmt: skip
    """(answers by doc id, lmms-eval seconds, seconds inside ``generate_until``); the model
    stays loaded."""
    run = _script("bench_peer").run

    spans: list[float] = []
    inner = model.generate_until

    def timed(requests):
        _sync(device)
        start = time.perf_counter()
        try:
            return inner(requests)
        finally:
            _sync(device)
            spans.append(time.perf_counter() - start)

    model.generate_until = timed  # run() keeps the model loaded after lmms-eval's clean()
    try:
        result = run(model, tasks_dir, task, limit, batch)
    finally:
        del model.generate_until
    return result["answers"], result["seconds"], sum(spans)


def part_e2e(ctx: Context, rec: dict[str, Any]) -> None:
    from recomp_eval.lmms_plugin.tasks import write_tasks
    from recomp_eval.synth.writers import write_benchmark

    e, dev = ctx.settings["e2e"], ctx.device
    dt = "float32" if ctx.smoke else "float16"
    own = ctx.work is None
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_e2e_")) if own else ctx.work / "e2e"
    rec.update(config=e, notes=[], skipped_runs=[], work=str(work))
    try:
        if work.exists() and not own:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "llava-1.5-7b-shape"
        started = time.monotonic()
        rec["checkpoint"] = build_checkpoint(folder, e["size"], e["depths"], dev)
        rec["build_s"] = time.monotonic() - started
        limit = e["samples"]
        write_benchmark("pope", work / "synth", n_images=limit // 6 + 1)
        tasks_dir = work / "tasks"
        (task,) = write_tasks(work / "synth", tasks_dir, ("pope",))
        with open(tasks_dir / f"{task}.yaml", "a") as f:  # the same short answers for both
            f.write(f"generation_kwargs:\n  max_new_tokens: {e['max_new_tokens']}\n"
                    f"  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n")  # fmt: skip
        ck = rec["checkpoint"]
        rec["description"] = (
            f"Random-weight LLaVA-1.5 folder in the llava-hf layout ({ck['text_layers']} LLM "
            f"layers of width {ck['hidden']}, {ck['vision_layers']} vision, "
            f"{ck['clip_text_layers']} CLIP-text; {ck['params_b']:.2f} B parameters, built in "
            f"{rec['build_s']:.0f} s), lmms-eval's POPE task over {limit} SynthVQA questions, "
            f"max_new_tokens {e['max_new_tokens']}, {dt}. samples/s from the time inside "
            f"generate_until; lmms-eval's whole evaluate call in `eval_s`.")  # fmt: skip
        from lmms_eval.models import get_model

        # the device goes in the extra config only (lmms-eval passes both to the class: the
        # same key in the argument string too is a TypeError)
        placement = f"device_map={dev}"
        started = time.monotonic()
        ref_model = get_model("llava_hf").create_from_arg_string(
            f"pretrained={folder},dtype={dt},{placement}", {"batch_size": 1, "device": dev}
        )
        load_ref = time.monotonic() - started
        warm = min(limit, 2)  # an untimed warm-up evaluation of each model first
        _evaluate(ref_model, tasks_dir, task, warm, 1, dev)
        reference, ref_eval, ref_s = _evaluate(ref_model, tasks_dir, task, limit, 1, dev)
        del ref_model
        _free()
        n = len(reference)
        ref_sps = n / ref_s
        rec["rows"].append({"harness": "lmms-eval llava_hf", "method": "none", "batch": 1,
                            "samples": n, "model_s": ref_s, "eval_s": ref_eval,
                            "load_s": load_ref, "samples_per_s": ref_sps,
                            "speedup_vs_llava_hf": 1.0, "same_answers": f"{n}/{n}"})  # fmt: skip
        from recomp_eval.lmms_plugin.args import parse_model_args
        from recomp_eval.lmms_plugin.model import RecompLlava

        started = time.monotonic()
        ours = {"none": RecompLlava(pretrained=str(folder), method="none", dtype=dt, device=dev,
                                    batch_size=1, requests_file="none")}  # fmt: skip
        load_ours = time.monotonic() - started
        rc = copy.copy(ours["none"])  # the same loaded bundle, RC as the method
        rc.args = parse_model_args({"pretrained": str(folder), "method": "recomp", "dtype": dt,
                                    "requests_file": "none",
                                    **{k: str(v) for k, v in e["rc"].items()}}, device=dev)  # fmt: skip
        rc.method, rc.side_rows = rc.args.build(), []
        ours["recomp"] = rc
        tb = e["target_batch"]
        for lm in ours.values():  # untimed warm-up (the CLIP text tower loads for RC here)
            lm.batch_size_per_gpu = tb
            _evaluate(lm, tasks_dir, task, min(limit, tb), tb, dev)
        # batch 1 last (the slowest), the target case again after the batched runs
        big = [(m, b, "") for b in e["batches"] if b != 1 for m in ("none", "recomp")]
        plan = [*big, ("none", tb, "#repeat")]
        plan += [(m, 1, "") for m in ("none", "recomp") if 1 in e["batches"]]
        seconds: dict[tuple[str, int, str], float] = {}
        for method, b, tag in plan:
            est = ref_s * 1.3 if b == 1 else ref_s / 3  # a batch-1 run costs about llava_hf's
            if ctx.expired(est):
                rec["skipped_runs"].append(f"ours {method} batch {b}{tag}: {ctx.left():.0f} s "
                                           f"left, about {est:.0f} s needed")  # fmt: skip
                rec["truncated"] = "runs skipped (part budget): " + "; ".join(rec["skipped_runs"])
                continue
            lm = ours[method]
            lm.batch_size_per_gpu = b
            first = len(lm.side_rows)
            answers, eval_s, model_s = _evaluate(lm, tasks_dir, task, limit, b, dev)
            seconds[(method, b, tag)] = model_s
            same = sum(answers.get(k) == v for k, v in reference.items())
            new = [r["new_tokens"] for r in lm.side_rows[first:]]
            kept = [float(r["kept_tokens"]) for r in lm.side_rows[first:]]
            rec["rows"].append({
                "harness": "recomp_llava (ours)" + (" again" if tag else ""),
                "method": method if method == "none" else
                f"{method} {e['rc']['variant']} at {e['rc']['retention']:g}",
                "batch": b, "samples": len(answers), "model_s": model_s, "eval_s": eval_s,
                "load_s": load_ours if (method, b, tag) == plan[0] else None,
                "warmup": f"{min(limit, tb)} samples at batch {tb}, untimed",
                "samples_per_s": len(answers) / model_s,
                "speedup_vs_llava_hf": len(answers) / model_s / ref_sps,
                "same_answers": f"{same}/{n}", "identical": same == n == len(answers),
                "mean_new_tokens": statistics.fmean(new) if new else None,
                "mean_kept_tokens": statistics.fmean(kept) if kept else None,
            })  # fmt: skip
            if b == tb and not tag:  # the target, recorded as soon as it is measured
                rec["targets"].append(_target(f"ours ({method}) x llava_hf batch 1", tb,
                                              n / model_s / ref_sps, ">=", e["target_x"]))  # fmt: skip
            if tag and ("none", tb, "") in seconds:
                rec["sanity"].append(_check(f"our none at batch {tb} timed twice", tb,
                                            [model_s * 1e3], [seconds[("none", tb, "")] * 1e3],
                                            ctx.tolerance))  # fmt: skip
        for method in ("none", "recomp"):
            if (method, tb, "") not in seconds:
                rec["targets"].append(_target(f"ours ({method}) x llava_hf batch 1", tb, None,
                                              ">=", e["target_x"]))  # fmt: skip
        del ours, rc
        _free()
    finally:
        if own and not ctx.args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


PART_FNS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "compression": part_compression,
    "vision": part_vision,
    "prefill": part_prefill,
    "e2e": part_e2e,
}


# --- orchestration ---------------------------------------------------------------------------


def _alarm(_signum, _frame) -> None:
    raise PartTimeout


def run_part(name: str, fn: Callable[[Context, dict[str, Any]], None], ctx: Context,
             record: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Run one part under its budget and the global deadline; the part's record (status,
    reason, wall_s, rows, sanity, targets, valid) is stored in ``record["parts"][name]``."""
    budget = ctx.budgets.get(name, 60.0)
    part: dict[str, Any] = {"status": None, "reason": None, "budget_s": budget,
                            "estimate_gpu_s": ESTIMATE_GPU_S.get(name),
                            "estimate_basis": ESTIMATE_BASIS.get(name), "wall_s": 0.0,
                            "rows": [], "sanity": [], "targets": [], "valid": None}  # fmt: skip
    record["parts"][name] = part
    left = ctx.global_left()
    need = ctx.min_start.get(name, 1.0)
    if left < need:
        part["status"] = "skipped"
        part["reason"] = (f"global deadline: {max(left, 0):.0f} s of the --budget-s "
                          f"{ctx.args.budget_s:g} left, the part needs at least {need:g} s")  # fmt: skip
        return part
    now = time.monotonic()
    ctx.part_deadline = now + min(budget, left)
    hard = min(now + 1.5 * budget, ctx.deadline) - now
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(hard, 0.01))
    try:
        fn(ctx, part)
        part["status"] = "partial" if part.get("truncated") else "done"
        part["reason"] = part.get("truncated")
    except PartTimeout:
        part["status"] = "timed out"
        part["reason"] = (f"interrupted at its hard limit ({hard:.0f} s: 1.5x the budget or the "
                          f"global deadline); the rows before it are kept")  # fmt: skip
    except Exception as err:  # recorded; the next part runs
        part["status"] = "failed"
        part["reason"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        part["traceback"] = traceback.format_exc()[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ctx.part_deadline = ctx.deadline
        part["wall_s"] = time.monotonic() - now
        _free()
    if part["sanity"]:
        part["valid"] = all(s["valid"] for s in part["sanity"])
    return part


def _summary(record: dict[str, Any]) -> list[str]:
    lines = []
    for name, part in record["parts"].items():
        bits = [f"{name}: {part['status']} ({part['wall_s']:.1f} s)"]
        if part.get("reason"):
            bits.append(part["reason"])
        if part["valid"] is not None:
            bits.append("sanity " + ("valid" if part["valid"] else "NOT VALID"))
        for t in part["targets"]:
            if t["threshold"] is not None:
                met = {True: "met", False: "not met", None: "not measured"}[t["met"]]
                value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
                bits.append(f"{t['name']} B={t['batch']}: {value} {t['op']} "
                            f"{t['threshold']:g} {met}")  # fmt: skip
        lines.append("; ".join(bits))
    return lines


def write(record: dict[str, Any], stem: Path, start: float) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` (rendered as the docs block renders it)."""
    render_record = _script("update_bench_docs").render_record

    from recomp_eval.efficiency.benchmark import write_results

    record["wall_s"] = time.monotonic() - start
    return write_results(stem, record, render_record(record))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="every part at tiny shapes on the CPU (tests; seconds)")  # fmt: skip
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="the parts to run (always in the order compression, vision, prefill, e2e)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="global deadline in seconds from the start; parts that do not fit "
                         "are skipped and recorded as skipped (default 540)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output stem (default {DEFAULT_OUT.relative_to(ROOT)}, --smoke: "
                         f"{SMOKE_OUT.relative_to(ROOT)})")  # fmt: skip
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the e2e checkpoint and tasks (default: a temporary one)",
    )
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary e2e folder")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: every core; --smoke: 1)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="sanity checks: two timings of the same computation agree within this")  # fmt: skip
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = SMOKE_OUT if args.smoke else DEFAULT_OUT
    args.out = Path(str(args.out).removesuffix(".json"))
    return args


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    start = time.monotonic() if start is None else start
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    from recomp_eval.efficiency.benchmark import machine_info, pin_threads

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # --smoke: one thread unless asked (two spinning OpenMP threads on a shared 2-core machine
    # ran the smoke 5x slower); a GPU run: every core (the release loop's LOF, preprocessing)
    threads = pin_threads(args.threads or (1 if args.smoke else None))
    ctx = Context(args, start)
    record: dict[str, Any] = {
        "schema": SCHEMA, "smoke": args.smoke, "started": datetime.now(timezone.utc)
        .strftime("%Y-%m-%d %H:%M UTC"), "budget_s": args.budget_s,
        "parts_requested": [p for p in PARTS if p in args.parts],
        "machine": {**machine_info(ctx.device, ("scripts/bench_gpu.py",)),
                    "threads_requested": threads},
        "method": "recomp_eval/efficiency/benchmark.py: interleaved shuffled rounds after "
                  "warm-up, CUDA events on a GPU, median / min / p90, agreement sanity checks",
        "tolerance": args.tolerance, "parts": {},
    }  # fmt: skip
    for name in record["parts_requested"]:
        print(f"bench_gpu: {name} ({ctx.global_left():.0f} s left)", flush=True)
        run_part(name, PART_FNS[name], ctx, record)
        write(record, args.out, start)
    json_path, md_path = write(record, args.out, start)
    print("\n".join(["bench_gpu summary:", *_summary(record)]))
    print(f"wrote {json_path} and {md_path} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(start=T0))
